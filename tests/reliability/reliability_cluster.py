"""A production-shaped service on one machine whose parts can be killed and restarted:
redis-server (AOF, noeviction) on a fixed port and directory, PostgreSQL, `hcnr serve
--no-worker` on a fixed port, and real `celery worker` processes (the exact command
`hcnr serve` runs). Used by tests/reliability and bench/reliability.py.

Nothing here is a mock: a "kill" is SIGKILL of a real process group, a "restart" starts
the same binary on the same port and data directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
from hcnr_client import HCNRClient  # noqa: E402

from tests.service import service_procs as procs  # noqa: E402

TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class Inputs:
    """A models root and the two JSONL files a repair job needs."""

    root: Path
    honesty: Path
    task: Path
    base: str = "path:base"
    finetuned: str = "path:finetuned-adapter"


def toy_inputs(root: Path, **shape: Any) -> Inputs:
    """The toy checkpoints of hcnr_core.toy (seconds to build, seconds to repair)."""
    from hcnr_core.toy import build_toy

    toy = build_toy(root, seed=shape.pop("seed", 0), **shape)
    return Inputs(root, toy["honesty"], toy["task"])


def organism_inputs(cache: Path) -> Inputs:
    """The tiny model organism of seed 0 (built once, ~3 min on 2 cores; then cached)."""
    from hcnr_core.organism import build_organism

    paths = build_organism(cache / "tiny-0", size="tiny", seed=0)
    return Inputs(paths["root"], paths["honesty"], paths["task"])


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- servers that restart in place ------------------------------------------------------


class Redis:
    """redis-server with AOF on a fixed port and directory: `kill()` then `start()` is a
    broker crash and restart that keeps what the AOF had."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = procs.free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [procs.redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--dir", str(self.workdir), "--appendonly", "yes", "--appendfsync"]
        command += ["everysec", "--maxmemory-policy", "noeviction", "--save", ""]
        log = (self.workdir / "redis.log").open("a")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

        def ping() -> bool:
            import redis

            return bool(redis.Redis.from_url(self.url).ping())

        procs.wait_until(ping, 30, "redis-server")

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()  # SIGKILL: no final AOF rewrite, no graceful save
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None:
            procs.stop(self.process)

    def queue_length(self, queue: str = "hcnr") -> int:
        import redis

        return int(redis.Redis.from_url(self.url).llen(queue))


class Api:
    """`hcnr serve --no-worker` on a fixed port (so a restart keeps the clients' URL)."""

    def __init__(self, env: dict[str, str], logs: Path):
        self.env, self.logs = env, logs
        self.port = procs.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = self.logs / f"api-{self.starts}.log"
        command = [procs.HCNR, "serve", "--no-worker", "--host", "127.0.0.1"]
        command += ["--port", str(self.port)]
        self.process = subprocess.Popen(
            command,
            env=self.env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        process = self.process

        def ready() -> bool:
            if process.poll() is not None:
                raise procs._Fatal(f"hcnr serve exited; see {log}")
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200

        procs._start_or_stop(process, lambda: procs.wait_until(ready, 120, "hcnr serve"))

    def kill(self) -> None:
        assert self.process is not None
        procs.kill_group(self.process)

    def stop(self) -> None:
        if self.process is not None:
            procs.stop(self.process)


@dataclass
class Worker:
    process: subprocess.Popen
    name: str
    log: Path

    def pool_pids(self) -> set[int]:
        import psutil

        with contextlib.suppress(psutil.NoSuchProcess):
            return {c.pid for c in psutil.Process(self.process.pid).children(recursive=True)}
        return set()


# --- the cluster ----------------------------------------------------------------------------


@dataclass
class Cluster:
    workdir: Path
    inputs: Inputs
    settings: dict[str, Any]
    redis: Redis = field(init=False)
    api: Api = field(init=False)
    env: dict[str, str] = field(init=False)
    workers: list[Worker] = field(default_factory=list)
    dead_pids: set[int] = field(default_factory=set)
    _postgres: Any = None
    _pg_dir: Path | None = None
    _session_factory: Any = None
    _clients: list[HCNRClient] = field(default_factory=list)

    def start(self, postgres_url: str | None = None) -> Cluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        if postgres_url is None:
            # Not under a 0700 temp root: the `postgres` user must reach the cluster dir.
            self._pg_dir = Path(tempfile.mkdtemp(prefix="hcnr-reliability-pg-"))
            self._postgres = procs.Postgres(self._pg_dir)
            postgres_url = self._postgres.start()
        self.database_url = postgres_url
        self.redis = Redis(self.workdir / "redis")
        self.redis.start()
        settings = {
            "env": "test",
            "data_dir": self.workdir / "data",
            "models_root": self.inputs.root,
            "database_url": postgres_url,
            "broker_url": self.redis.url,
            "lease_seconds": 5,
            "heartbeat_seconds": 1,
            "reconcile_seconds": 1,
            **self.settings,
        }
        self.env = procs.service_env(**settings)
        self.api = Api(self.env, self.workdir / "logs")
        self.api.start()
        return self

    def close(self) -> None:
        for client in self._clients:
            client.close()
        for worker in self.workers:
            procs.stop(worker.process)
        self.api.stop()
        self.redis.stop()
        if self._session_factory is not None:
            self._session_factory.kw["bind"].dispose()
        if self._postgres is not None:
            self._postgres.stop()
            import shutil

            shutil.rmtree(self._pg_dir, ignore_errors=True)

    # --- clients and the database --------------------------------------------------------

    def client(self, tenant: str = "alice") -> HCNRClient:
        client = HCNRClient(base_url=self.api.url, api_key=self.create_key(tenant), timeout=120)
        self._clients.append(client)
        return client

    def create_key(self, tenant: str) -> str:
        from store import repositories
        from store.db import session_scope

        with session_scope(self.session_factory) as session:
            return repositories.create_api_key(session, tenant)[1]

    @property
    def session_factory(self):
        if self._session_factory is None:
            from store.db import make_engine, make_session_factory

            self._session_factory = make_session_factory(make_engine(self.database_url))
        return self._session_factory

    def jobs(self, ids: list[str] | None = None) -> dict[str, Any]:
        """Job rows (detached) by id, straight from PostgreSQL: the source of truth."""
        from sqlalchemy import select

        from store.models import Job

        with self.session_factory() as session:
            query = select(Job) if ids is None else select(Job).where(Job.id.in_(ids))
            return {job.id: job for job in session.scalars(query).all()}

    def cancel_unfinished(self) -> int:
        """Cancel every job still validating or queued (a load test leaves hundreds), so the
        next test's worker does not work through another test's backlog first."""
        from sqlalchemy import select

        from store import job_state
        from store.db import session_scope
        from store.models import Job

        with session_scope(self.session_factory) as session:
            waiting = Job.status.in_(("validating", "queued"))
            ids = list(session.scalars(select(Job.id).where(waiting)).all())
            for job_id in ids:
                job_state.cancel(session, job_id)
        return len(ids)

    def event_types(self, job_id: str) -> list[str]:
        from sqlalchemy import select

        from store.models import JobEvent

        with self.session_factory() as session:
            query = select(JobEvent.type).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
            return list(session.scalars(query).all())

    def count_events(self, type_: str, ids: list[str]) -> int:
        return sum(self.event_types(job_id).count(type_) for job_id in ids)

    def wait_terminal(self, ids: list[str], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.jobs(ids)
            if all(row.status in TERMINAL for row in rows.values()) and len(rows) == len(ids):
                return rows
            time.sleep(0.5)
        return self.jobs(ids)

    # --- workers ---------------------------------------------------------------------------

    def start_worker(self, env: dict[str, str] | None = None) -> Worker:
        name = f"w{len(self.workers) + 1}"
        log = self.workdir / "logs" / f"worker-{name}.log"
        process = procs.start_celery_worker(env or self.env, log, name)
        worker = Worker(process, name, log)
        self.workers.append(worker)
        return worker

    def kill_worker(self, worker: Worker) -> float:
        """SIGKILL the worker's whole process group (parent and pool child); returns the
        monotonic time of the kill."""
        self.dead_pids |= worker.pool_pids() | {worker.process.pid}
        killed_at = time.monotonic()
        procs.kill_group(worker.process)
        return killed_at

    def stop_workers(self) -> None:
        for worker in self.workers:
            procs.stop(worker.process)

    def running_job(self, ids: list[str], progressing: bool = True) -> Any | None:
        """A job of `ids` running on a live worker (and past its first progress step)."""
        for row in self.jobs(ids).values():
            if row.status != "running" or not row.worker_id:
                continue
            if progressing and row.progress <= 0:
                continue
            if int(row.worker_id.rsplit(":", 1)[1]) not in self.dead_pids:
                return row
        return None

    def diagnose(self, ids: list[str]) -> str:
        """For assertion messages: the jobs' states and the last worker's log tail."""
        rows = self.jobs(ids)
        states = {i: (r.status, r.attempts, r.progress, r.worker_id) for i, r in rows.items()}
        tail = ""
        if self.workers:
            lines = self.workers[-1].log.read_text(errors="replace").splitlines()
            tail = "\n".join(line for line in lines[-40:] if "it/s]" not in line)
        return f"jobs: {states}\nredis queue: {self.redis.queue_length()}\nworker log:\n{tail}"

    # --- storage ---------------------------------------------------------------------------

    @property
    def artifacts_root(self) -> Path:
        return self.workdir / "data" / "artifacts"

    @property
    def scratch_root(self) -> Path:
        return self.workdir / "data" / "scratch"

    def checkpoint_digests(self, job_id: str) -> dict[str, str]:
        """sha256 of every published file of a job, read back from storage (the report,
        which holds wall-clock timings, is left out)."""
        directory = self.artifacts_root / "jobs" / job_id / "checkpoint"
        return {
            path.name: sha256(path)
            for path in sorted(directory.iterdir())
            if path.is_file() and path.name != "hcnr_report.json"
        }

    def leftovers(self, ids: list[str]) -> list[str]:
        """Staging directories and scratch files of these jobs still on disk."""
        found = [str(p) for p in self.artifacts_root.rglob("*staging*")]
        if self.scratch_root.exists():
            found += [str(p) for p in self.scratch_root.iterdir() if p.name.split("-")[0] in ids]
        return found


def submit(
    client: HCNRClient, inputs: Inputs, files: dict[str, str], n: int, **overrides: Any
) -> list[str]:
    """n jobs with different hyper-parameters (so outputs differ from job to job)."""
    ids = []
    for i in range(n):
        body = {
            "method": "hcnr",
            "base": inputs.base,
            "finetuned": inputs.finetuned,
            "honesty_file": files["honesty"],
            "task_file": files["task"],
            "hyperparameters": {"r_cw": (0.2, 0.3, 0.4, 0.5)[i % 4], "r_iw": (0.5, 0.3)[i % 2]},
            "metadata": {"index": str(i)},
        }
        for key, value in overrides.items():
            body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
        ids.append(client.repair_jobs.create(**body).id)
    return ids


def upload(client: HCNRClient, inputs: Inputs) -> dict[str, str]:
    return {
        "honesty": client.files.create(file=inputs.honesty, purpose="honesty").id,
        "task": client.files.create(file=inputs.task, purpose="task").id,
    }


def poll(check: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    """The first truthy value of `check()`, or None after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    return None


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@contextlib.contextmanager
def cluster(
    workdir: Path, inputs: Inputs, postgres_url: str | None = None, **settings: Any
) -> Iterator[Cluster]:
    running = Cluster(workdir, inputs, settings)
    try:
        yield running.start(postgres_url)
    finally:
        with contextlib.suppress(Exception):
            running.close()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


__all__ = ["Cluster", "Inputs", "cluster", "organism_inputs", "poll", "signal", "toy_inputs"]
