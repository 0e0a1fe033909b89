"""Jobs survive worker deaths: SIGKILL storms, a poison job, cancellation mid-run."""

from __future__ import annotations

import pytest

from tests.reliability import reliability_scenarios as scenarios
from tests.reliability.reliability_cluster import Cluster, Inputs

pytestmark = pytest.mark.reliability


@pytest.mark.slow  # ~40-80 s of worker restarts; `make test-all` runs it
def test_kill_storm_loses_nothing_and_changes_no_byte(fresh: Cluster):
    reference = scenarios.reference_run(fresh, n_jobs=4, timeout=240)
    assert reference["succeeded"] == 4, reference
    storm = scenarios.kill_storm(fresh, reference, n_kills=2, seed=0, timeout=120)
    assert storm["kills"] >= 1, storm
    assert storm["lost"] == 0 and storm["succeeded"] == 4, storm
    assert storm["identical"] == 4, storm  # sha256 of every published file
    assert 1 <= storm["max_attempts"] <= 3, storm
    assert storm["leftovers"] == [], storm


@pytest.mark.slow  # ~40-80 s of worker restarts; `make test-all` runs it
def test_poison_job_fails_after_the_cap_and_the_rest_finish(fresh: Cluster):
    result = scenarios.healthy_throughput(fresh, n_jobs=2, poison=True, timeout=300)
    assert result["succeeded"] == 2 and result["lost"] == 0, result
    poison = result["poison"]
    assert poison["status"] == "failed" and poison["error_code"] == "worker_lost", poison
    assert poison["attempts"] == 3, poison  # HCNR_MAX_ATTEMPTS (default 3)
    assert poison["events"].count("requeued") == 2, poison
    assert poison["leftovers"] == [], poison


def test_cancel_running_job_frees_everything(fresh: Cluster, slow_models: Inputs):
    result = scenarios.cancel_running(fresh, slow_models, timeout=180)
    assert result["status"] == "cancelled", result
    assert result["artifacts_api"] == "artifacts_not_ready", result
    assert result["artifact_rows"] == 0 and not result["job_dir_exists"], result
    assert result["leftovers"] == [], result
    assert result["events"][-1] == "cancelled", result


@pytest.mark.slow  # ~40-80 s of worker restarts; `make test-all` runs it
def test_stalled_worker_that_comes_back_leaves_the_new_attempt_alone(
    fresh: Cluster, slow_models: Inputs
):
    result = scenarios.stalled_worker(fresh, slow_models, timeout=240)
    assert result["status"] == "succeeded" and result["attempts"] == 2, result
    assert result["first_worker_gave_up"], result
    assert result["files_match_artifact_rows"], result
    assert result["leftovers"] == [], result
    assert result["events"].count("succeeded") == 1, result


def test_a_worker_frozen_mid_transaction_does_not_block_recovery(fresh: Cluster):
    """The reconciler skips locked rows; a worker frozen while its transaction holds the
    job row must lose that transaction (idle_in_transaction_session_timeout = lease)."""
    import contextlib
    import time
    from datetime import timedelta

    from sqlalchemy import update

    from store.db import make_engine, make_session_factory, session_scope, worker_engine_options
    from store.models import Job, utcnow
    from store.settings import Settings
    from tests.reliability.reliability_cluster import submit, upload
    from worker.reconciler import reconcile_once

    client = fresh.client("frozen")
    job_id = submit(client, fresh.inputs, upload(client, fresh.inputs), 1)[0]  # no worker
    settings = Settings(database_url=fresh.database_url, lease_seconds=5, heartbeat_seconds=1)
    options = worker_engine_options(settings.db_url, settings.lease_seconds)
    factory = make_session_factory(make_engine(settings.db_url, **options))
    row = update(Job).where(Job.id == job_id)
    expired = utcnow() - timedelta(seconds=1)
    with session_scope(factory) as session:  # claimed by a worker whose lease has expired
        session.execute(
            row.values(status="running", worker_id="frozen:1", attempts=1, lease_expires_at=expired)
        )
    frozen = factory()
    frozen.execute(row.values(progress=0.5))  # a progress write, frozen before its commit
    time.sleep(settings.lease_seconds + 2)
    sent: list[str] = []
    try:
        changed = reconcile_once(factory, settings, sent.append)
    finally:
        with contextlib.suppress(Exception):  # the server has ended that connection
            frozen.close()
        with session_scope(factory) as session:  # no later test should run it
            session.execute(row.values(status="cancelled"))
    assert changed == {job_id: "queued"} and sent == [job_id]
