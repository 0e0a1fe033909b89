"""A short load run (the bench runs 200 users for 60 s): no errors, and every job a user
was told was created is a row in PostgreSQL, and nothing more. No latency thresholds."""

from __future__ import annotations

import pytest

from tests.reliability import reliability_load
from tests.reliability.reliability_cluster import Cluster

pytestmark = pytest.mark.reliability


def test_concurrent_users_get_no_errors_and_every_job_is_a_row(fresh: Cluster):
    result = reliability_load.load(fresh, users=50, seconds=10, think=0.2)
    assert result["errors"] == 0, result["error_samples"]
    assert result["submitted"] > 0
    assert result["submitted"] == result["rows"], result


def test_sdk_shaped_users_get_no_errors_and_every_job_is_a_row(fresh: Cluster):
    """The `load_sdk` shape (create a job, then poll it at the SDK's interval), small."""
    result = reliability_load.load(
        fresh, users=20, seconds=6, think=0.5, tenants=20, shape="sdk", polls=3
    )
    assert result["errors"] == 0, result["error_samples"]
    assert result["submitted"] > 0
    assert result["submitted"] == result["rows"], result
    used = {route for route, figures in result["routes"].items() if figures["requests"]}
    # uploads happen in the untimed ramp-up, mostly; no listing, no events
    assert {"POST /v1/repair-jobs", "GET /v1/repair-jobs/{id}"} <= used
    assert used <= {"POST /v1/files", "POST /v1/repair-jobs", "GET /v1/repair-jobs/{id}"}
