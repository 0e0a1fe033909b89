"""Production shape on one machine: PostgreSQL + Redis (AOF, noeviction) + a real Celery
worker process + the API, all started from Debian binaries by the fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from hcnr_client import HCNRClient

from tests.service import flows
from tests.service import service_procs as procs
from tests.service.service_support import Models


@dataclass
class Stack:
    alice: HCNRClient
    bob: HCNRClient
    env: dict[str, str]
    data_dir: Path
    database_url: str
    logs: Path


@pytest.fixture(scope="module")
def stack(
    models: Models, redis_url: str, postgres_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("stack")
    env = procs.service_env(
        env="test",
        data_dir=data_dir,
        models_root=models.root,
        database_url=postgres_url,
        broker_url=redis_url,
        lease_seconds=6,
        heartbeat_seconds=1,
        reconcile_seconds=1,
    )
    keys = {tenant: procs.create_key(env, tenant) for tenant in ("alice", "bob")}
    api, url = procs.start_api(env, data_dir / "api.log", worker=False)
    clients = {tenant: HCNRClient(base_url=url, api_key=key) for tenant, key in keys.items()}
    yield Stack(clients["alice"], clients["bob"], env, data_dir, postgres_url, data_dir)
    for client in clients.values():
        client.close()
    procs.stop(api)


@pytest.fixture
def worker(stack: Stack) -> Iterator:
    process = procs.start_celery_worker(stack.env, stack.logs / "worker.log", "w1")
    yield process
    procs.stop(process)


def test_flow_with_celery_redis_postgres(
    stack: Stack, worker, models: Models, direct_repair: Path, tmp_path: Path
):
    job_id = flows.full_flow(stack.alice, models, direct_repair, tmp_path / "download")
    flows.other_tenant_flow(stack.alice, stack.bob, job_id)


def test_cancel_running_job(stack: Stack, worker, models: Models):
    flows.cancel_flow(stack.alice, models, stack.data_dir / "artifacts")


def test_dead_worker_job_is_requeued_and_finished(stack: Stack, models: Models):
    """SIGKILL the worker mid-job: the lease expires, a new worker's reconciler re-queues
    the job and runs it to the end (attempt 2)."""
    first = procs.start_celery_worker(stack.env, stack.logs / "worker-a.log", "wa")
    job_id = flows.slow_job(stack.alice, models)
    flows.wait_running(stack.alice, job_id)
    procs.kill_group(first)
    assert stack.alice.repair_jobs.retrieve(job_id).status == "running"  # the row still says so
    second = procs.start_celery_worker(stack.env, stack.logs / "worker-b.log", "wb")
    try:
        job = stack.alice.repair_jobs.wait(job_id, timeout=240, poll_interval=0.5)
    finally:
        procs.stop(second)
    assert job.status == "succeeded", job.error
    assert job.attempts == 2
    types = [e.type for e in list(stack.alice.repair_jobs.list_events(job_id, limit=1000))]
    assert "requeued" in types and types[-1] == "succeeded"


def test_attempt_cap_fails_the_job(stack: Stack, models: Models):
    """A job whose worker died `max_attempts` times is failed, not re-queued forever."""
    from store import job_state
    from store.db import make_engine, make_session_factory, session_scope
    from store.models import Job, utcnow
    from store.settings import Settings
    from worker.reconciler import reconcile_once

    files = flows.upload_inputs(stack.alice, models.honesty, models.task)
    job_id = stack.alice.repair_jobs.create(
        method="hcnr",
        base="path:base",
        finetuned="path:finetuned",
        honesty_file=files["honesty"],
        task_file=files["task"],
    ).id
    factory = make_session_factory(make_engine(stack.database_url))
    settings = Settings(database_url=stack.database_url, max_attempts=3)
    with session_scope(factory) as session:  # as if a third worker had died holding it
        job = session.get(Job, job_id)
        job.status, job.attempts, job.worker_id = "running", 3, "gone:1"
        job.lease_expires_at = utcnow() - timedelta(seconds=1)
    sent: list[str] = []
    assert reconcile_once(factory, settings, sent.append) == {job_id: "failed"}
    assert sent == []
    failed = stack.alice.repair_jobs.retrieve(job_id)
    assert failed.status == "failed" and failed.error.code == "worker_lost"
    with session_scope(factory) as session:
        assert job_state.expired_jobs(session, utcnow()) == []


def test_schema_matches_models_on_postgres(stack: Stack):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from store.db import make_engine
    from store.models import Base

    engine = make_engine(stack.database_url)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == []


def test_redis_runs_with_aof_and_noeviction(redis_url: str):
    import redis

    config = redis.Redis.from_url(redis_url).config_get("*")
    assert config["appendonly"] == "yes" and config["maxmemory-policy"] == "noeviction"
