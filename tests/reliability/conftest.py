"""Fixtures of the reliability tests: toy checkpoints and one killable cluster (redis,
PostgreSQL, the API; workers are started and killed by each test)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.reliability.reliability_cluster import Cluster, Inputs, cluster, procs, toy_inputs

# worker/faults.py; HCNR_ENV=test only
FAULTS = "crash_on_label=poison:yes,slow_on_label=slow:yes:0.2"


@pytest.fixture(scope="session")
def toy_models(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    return toy_inputs(tmp_path_factory.mktemp("reliability-models"))


@pytest.fixture(scope="session")
def slow_models(toy_models: Inputs) -> Inputs:
    """A bigger toy under the same models root: a repair long enough to cancel."""
    slow = toy_inputs(toy_models.root / "slow", seed=2, hidden=256, layers=4, n_samples=64)
    return Inputs(
        toy_models.root, slow.honesty, slow.task, "path:slow/base", "path:slow/finetuned-adapter"
    )


@pytest.fixture(scope="session")
def service(toy_models: Inputs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if procs.redis_binary() is None or procs.postgres_bindir() is None:
        pytest.skip("redis-server / PostgreSQL are not installed (scripts/install-services.sh)")
    workdir = tmp_path_factory.mktemp("reliability-cluster")
    with cluster(workdir, toy_models, requeue_queued_seconds=10, fault_injection=FAULTS) as running:
        yield running


@pytest.fixture
def fresh(service: Cluster) -> Iterator[Cluster]:
    """The shared cluster with no worker left running after the test."""
    yield service
    service.stop_workers()
    service.cancel_unfinished()
