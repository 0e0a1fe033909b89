"""Jobs survive the broker and the API going down: redis-server SIGKILLed and restarted on
its port and AOF directory, then the API SIGKILLed and restarted, with jobs queued and
running (and one created while the broker is down)."""

from __future__ import annotations

import pytest

from tests.reliability import reliability_scenarios as scenarios
from tests.reliability.reliability_cluster import Cluster

pytestmark = pytest.mark.reliability


@pytest.mark.slow  # ~50 s of broker and API restarts; `make test-all` runs it
def test_broker_and_api_restarts_lose_no_job(fresh: Cluster):
    result = scenarios.restarts(fresh, n_jobs=3, timeout=120)
    assert result["jobs"] == 5, result
    assert result["lost"] == 0 and result["succeeded"] == 5, result
    assert result["max_attempts"] <= 3 and result["leftovers"] == [], result
