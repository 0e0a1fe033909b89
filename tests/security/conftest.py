"""Fixtures of the security tests: a models root holding the toy plus hostile checkpoints,
bait outside it, and an in-process app (two tenants) over that root."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.security import hostile
from tests.service import service_procs as procs


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> hostile.World:
    """models/ (toy + hostile/*), outside/ (bait: a valid checkpoint, a secret), data/."""
    return hostile.build_world(tmp_path_factory.mktemp("security"))


@pytest.fixture(scope="module")
def app_env(world: hostile.World, tmp_path_factory: pytest.TempPathFactory) -> hostile.AppEnv:
    return hostile.make_app_env(world, tmp_path_factory.mktemp("app"))


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A real PostgreSQL server (Debian binaries), as in tests/service."""
    if procs.postgres_bindir() is None:
        pytest.skip("PostgreSQL binaries are not installed (run scripts/install-services.sh)")
    workdir = Path(tempfile.mkdtemp(prefix="hcnr-sec-pg-"))
    server = procs.Postgres(workdir)
    url = server.start()
    yield url
    server.stop()
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)
