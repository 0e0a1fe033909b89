"""Jobs survive worker deaths: SIGKILL storms, a poison job, cancellation mid-run."""

from __future__ import annotations

import pytest
import reliability_scenarios as scenarios
from reliability_cluster import Cluster, Inputs

pytestmark = pytest.mark.reliability


def test_kill_storm_loses_nothing_and_changes_no_byte(fresh: Cluster):
    reference = scenarios.reference_run(fresh, n_jobs=4, timeout=240)
    assert reference["succeeded"] == 4, reference
    storm = scenarios.kill_storm(fresh, reference, n_kills=2, seed=0, timeout=120)
    assert storm["kills"] >= 1, storm
    assert storm["lost"] == 0 and storm["succeeded"] == 4, storm
    assert storm["identical"] == 4, storm  # sha256 of every published file
    assert 1 <= storm["max_attempts"] <= 3, storm
    assert storm["leftovers"] == [], storm


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
