"""Fixtures of the service tests: toy checkpoints under a models root, a direct repair to
compare with, an in-process app with two tenants, and real servers (see service_procs)."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import service_procs as procs
from fastapi.testclient import TestClient

CHECKPOINT_FILES_COMPARED = "*.safetensors"


@dataclass
class Models:
    root: Path
    honesty: Path
    task: Path
    slow_honesty: Path
    slow_task: Path


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    """models_root/{base,finetuned-adapter,finetuned}: the toy; other/: an incompatible one;
    slow/: a bigger toy whose repair runs long enough to be cancelled or killed."""
    from hcnr_core.toy import build_toy

    root = tmp_path_factory.mktemp("models_root")
    toy = build_toy(root, seed=0)
    build_toy(root / "other", seed=1, hidden=48)
    slow = build_toy(root / "slow", seed=2, hidden=256, layers=4, n_samples=64)
    return Models(root, toy["honesty"], toy["task"], slow["honesty"], slow["task"])


@pytest.fixture(scope="session")
def direct_repair(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`hcnr repair` of the toy adapter through the library, for bit-for-bit comparisons."""
    from hcnr_core import RepairConfig
    from hcnr_core.pipeline import RepairPipeline

    out = tmp_path_factory.mktemp("direct") / "repaired"
    pipeline = RepairPipeline(RepairConfig())
    prepared = pipeline.prepare(
        models.root / "base", models.root / "finetuned-adapter", models.honesty, models.task
    )
    pipeline.run(prepared, out)
    return out


def digests(directory: Path, pattern: str = "*") -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.glob(pattern))
        if path.is_file() and path.name != "hcnr_report.json" and path.name != "README.md"
    }


def job_body(files: dict[str, str], **overrides) -> dict:
    body = {
        "base": "path:base",
        "finetuned": "path:finetuned-adapter",
        "honesty_file": files["honesty"],
        "task_file": files["task"],
    }
    return {**body, **overrides}


# --- in-process app (TestClient) ---------------------------------------------------------


@dataclass
class InProcess:
    app: object
    settings: object
    queued: list[str]
    clients: dict[str, TestClient] = field(default_factory=dict)

    def upload(self, tenant: str, path: Path, purpose: str):
        files = {"file": (path.name, path.read_bytes(), "application/jsonl")}
        return self.clients[tenant].post("/v1/files", files=files, data={"purpose": purpose})

    def run_queued(self) -> list[str]:
        """What the Celery task does, in this process: runner.run_job per queued id."""
        from store.storage import make_storage
        from worker.runner import Context, run_job

        ctx = Context(self.settings, self.app.state.session_factory, make_storage(self.settings))
        statuses = [run_job(job_id, ctx) for job_id in self.queued]
        self.queued.clear()
        return statuses


def make_inprocess(tmp: Path, models: Models, **settings) -> InProcess:
    from api.app import create_app
    from store import repositories
    from store.db import session_scope
    from store.settings import Settings

    config = Settings(env="test", data_dir=tmp / "data", models_root=models.root, **settings)
    queued: list[str] = []
    app = create_app(config, enqueue=queued.append)
    env = InProcess(app, config, queued)
    with session_scope(app.state.session_factory) as session:
        for tenant in ("alice", "bob"):
            _, key = repositories.create_api_key(session, tenant)
            env.clients[tenant] = TestClient(app, headers={"Authorization": f"Bearer {key}"})
    return env


@pytest.fixture(scope="module")
def inproc(models: Models, tmp_path_factory: pytest.TempPathFactory) -> InProcess:
    return make_inprocess(tmp_path_factory.mktemp("inproc"), models)


# --- real servers -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if procs.redis_binary() is None:
        pytest.skip("redis-server is not installed (run scripts/install-services.sh)")
    process, url = procs.start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    procs.stop(process)


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if procs.postgres_bindir() is None:
        pytest.skip("PostgreSQL binaries are not installed (run scripts/install-services.sh)")
    # Not under pytest's 0700 temp root: the `postgres` user must reach the cluster dir.
    workdir = Path(tempfile.mkdtemp(prefix="hcnr-test-pg-"))
    server = procs.Postgres(workdir)
    url = server.start()
    yield url
    server.stop()
    remove_tree(workdir)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
