"""`hcnr serve` tuned for load (issue 16): several API processes on one port, the
validation worker below the API's CPU priority, and a database pool as large as the
request threads."""

from __future__ import annotations

from pathlib import Path

import httpx
import psutil
import pytest

from tests.service import service_procs as procs
from tests.service.service_support import Models


def _niceness(pid: int) -> int:
    return psutil.Process(pid).nice()


def test_serve_workers_share_the_port_and_stop_with_the_validator(models: Models, tmp_path):
    env = procs.service_env(
        env="test", data_dir=tmp_path, models_root=models.root, api_workers=2, validation_nice=7
    )
    key = procs.create_key(env, "alice")
    process, url = procs.start_api(env, tmp_path / "serve.log", worker=False)
    try:
        children = psutil.Process(process.pid).children(recursive=True)
        api = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
        # The validation worker is the server's own child; a process it forks for a moment
        # (a pool or forkserver start) carries the same command line and is not a second one.
        validator = [
            c for c in children if "hcnr.validation" in c.cmdline() and c.ppid() == process.pid
        ]
        assert len(api) == 2, [c.cmdline() for c in children]
        assert len(validator) == 1, [c.cmdline() for c in children]
        # the API processes keep the server's priority; the validations run below it
        assert {_niceness(c.pid) for c in api} == {_niceness(process.pid)}
        assert _niceness(validator[0].pid) == _niceness(process.pid) + 7
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
            # a new connection per request: the kernel spreads them over both processes
            for _ in range(6):
                response = client.get("/v1/repair-jobs", headers={"Connection": "close"})
                assert response.status_code == 200, response.text
                assert response.json()["data"] == []
    finally:
        procs.stop(process)
    assert process.returncode is not None
    gone = psutil.wait_procs([*api, *validator], timeout=30)[1]
    assert gone == [], f"still running after hcnr serve stopped: {gone}"


@pytest.mark.parametrize("size", [7])
def test_the_api_pool_holds_db_pool_size_connections(
    models: Models, postgres_url: str, tmp_path: Path, size: int
):
    from api.app import create_app
    from store.settings import Settings

    settings = Settings(
        env="test",
        data_dir=tmp_path / "data",
        models_root=models.root,
        database_url=postgres_url,
        db_pool_size=size,
        db_max_overflow=3,
    )
    app = create_app(settings, enqueue=lambda job_id: None)
    pool = app.state.engine.pool
    assert (pool.size(), pool._max_overflow) == (size, 3)
    app.state.engine.dispose()


def test_sqlite_keeps_its_own_pool():
    from store.db import pool_options

    assert pool_options("sqlite:///x.db", 40, 10) == {}
    assert pool_options("postgresql+psycopg://h/db", 40, 10) == {
        "pool_size": 40,
        "max_overflow": 10,
    }
