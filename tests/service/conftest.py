"""Fixtures of the service tests: toy checkpoints under a models root, a direct repair to
compare with, an in-process app with two tenants, and real servers (see service_procs)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service import service_procs as procs
from tests.service.service_support import InProcess, Models, make_inprocess


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


# --- in-process app (TestClient) ---------------------------------------------------------


@pytest.fixture(scope="module")
def inproc(models: Models, tmp_path_factory: pytest.TempPathFactory) -> InProcess:
    return make_inprocess(tmp_path_factory.mktemp("inproc"), models)


@pytest.fixture(autouse=True)
def _fresh_queue(request: pytest.FixtureRequest) -> None:
    """The module's app shares one enqueue list: empty it at the start of each test, so
    what a test asserts about `queued` is what that test (and its fixtures) enqueued,
    whatever ran before it. Jobs an earlier test left queued stay in the database, as a
    stopped worker would leave them."""
    if "inproc" in request.fixturenames:
        request.getfixturevalue("inproc").queued.clear()


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
