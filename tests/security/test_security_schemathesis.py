"""Figure 9: Schemathesis against the app's own /openapi.json, authenticated with a valid
bearer key: 0 server errors and 0 response schema violations. Fixed seed, bounded
examples (positive and negative generation per operation), every default check except
the ones explained in UNSUITABLE_CHECKS."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest

from tests.security.hostile import AppEnv, make_app_env

pytestmark = [pytest.mark.security, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
MAX_EXAMPLES = 25
SEED = 20260505

UNSUITABLE_CHECKS = {
    # "Schema-valid input must be accepted (2xx)". Schema-valid is not business-valid here:
    # a random string is a well-formed `file_id` that does not exist (404), random bytes
    # are a well-formed upload that is not JSONL (422 invalid_data), a random `base` is a
    # well-formed reference to no model (422 invalid_reference). Those 4xx are correct.
    "positive_data_acceptance",
}


def run_schemathesis(app: Any, key: str, max_examples: int = MAX_EXAMPLES, seed: int = SEED):
    """Every operation, positive then negative examples; each response validated by the
    checks. Failures are collected (never raised inside Hypothesis: no shrinking, every
    example counts). Returns counts and failures."""
    import hypothesis
    import schemathesis
    from hypothesis import HealthCheck, Phase, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import load_all_checks
    from schemathesis.core.failures import Failure, FailureGroup

    load_all_checks()
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    headers = {"Authorization": f"Bearer {key}"}
    stats: Counter = Counter()
    failures: list[dict] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    started = time.monotonic()
    excluded = [c for c in _all_checks() if c.__name__ in UNSUITABLE_CHECKS]

    def probe_for(operation, mode):
        @hypothesis.seed(seed)
        @settings(
            max_examples=max_examples,
            database=None,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        def probe(case) -> None:
            response = case.call(headers=headers)
            stats["examples"] += 1
            stats[f"status_{response.status_code // 100}xx"] += 1
            try:
                case.validate_response(response, excluded_checks=excluded)
            except (FailureGroup, Failure) as exc:
                group = exc.exceptions if isinstance(exc, FailureGroup) else [exc]
                for failure in group:
                    failures.append(
                        {
                            "operation": operation.label,
                            "mode": mode.value,
                            "check": failure.__class__.__name__,
                            "title": getattr(failure, "title", str(failure))[:200],
                            "status": response.status_code,
                            "request": f"{case.method} {case.formatted_path}",
                        }
                    )

        return probe

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                probe_for(operation, mode)()
            except hypothesis.errors.Unsatisfiable:  # nothing to negate (no parameters)
                stats["unsatisfiable"] += 1
    return {
        "operations": len(operations),
        "examples": stats["examples"],
        "5xx": stats["status_5xx"],
        "statuses": {k: v for k, v in stats.items() if k.startswith("status_")},
        "failures": failures,
        "schema_violations": [
            f for f in failures if "schema" in f["check"].lower() or "Schema" in f["title"]
        ],
        "seconds": round(time.monotonic() - started, 1),
        "seed": seed,
        "max_examples": max_examples,
    }


def _all_checks():
    from schemathesis.checks import CHECKS

    return CHECKS.get_all()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fuzzed(request: pytest.FixtureRequest, world, tmp_path_factory) -> dict:
    """The same run on SQLite and on PostgreSQL (stricter: NUL bytes, column widths)."""
    if request.param == "sqlite":
        env: AppEnv = request.getfixturevalue("app_env")
    else:
        pg_url = request.getfixturevalue("pg_url")
        env = make_app_env(world, tmp_path_factory.mktemp("st-pg"), database_url=pg_url)
    key = env.alice.headers["Authorization"].removeprefix("Bearer ")
    return run_schemathesis(env.inproc.app, key)


def test_schemathesis_finds_no_server_error(fuzzed):
    assert fuzzed["operations"] >= 15
    assert fuzzed["examples"] >= fuzzed["operations"] * 10
    assert fuzzed["5xx"] == 0, [f for f in fuzzed["failures"] if f["status"] >= 500][:5]


def test_schemathesis_finds_no_schema_violation(fuzzed):
    assert not fuzzed["schema_violations"], fuzzed["schema_violations"][:5]


def test_schemathesis_other_checks_pass(fuzzed):
    assert not fuzzed["failures"], fuzzed["failures"][:10]
