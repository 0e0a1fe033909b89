"""The job state machine (store/job_state.py) alone, on a real database (SQLite, and
PostgreSQL when its binaries are installed): every allowed transition works, every other
one is refused, the operations' rules (holder, attempts, cancel) hold, and nothing else in
the service writes `Job.status`."""

from __future__ import annotations

import ast
import secrets
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, get_args

import pytest
from sqlalchemy import create_engine, select, text

from store import job_state
from store.db import make_engine, make_session_factory, migrate, session_scope
from store.job_state import STATES, TERMINAL_STATES, TRANSITIONS, TransitionRefused
from store.models import Job, JobEvent, utcnow
from tests.service.service_support import add_tenant_with_a_file

ROOT = Path(__file__).resolve().parents[2]
# The documented diagram (README, store/job_state.py), written out independently.
ALLOWED = {
    ("validating", "queued"),
    ("validating", "failed"),
    ("validating", "cancelled"),
    ("queued", "running"),
    ("queued", "cancelled"),
    ("running", "cancelling"),
    ("running", "succeeded"),
    ("running", "failed"),
    ("running", "cancelled"),
    ("running", "queued"),  # requeue: the worker lost its lease
    ("cancelling", "succeeded"),
    ("cancelling", "failed"),
    ("cancelling", "cancelled"),
}


@pytest.fixture(params=["sqlite", "postgresql"])
def factory(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    else:
        url = _fresh_postgres_database(request.getfixturevalue("postgres_url"))
    migrate(url)
    engine = make_engine(url)
    factory = make_session_factory(engine)
    with session_scope(factory) as session:
        add_tenant_with_a_file(session)
    yield factory
    engine.dispose()


def _fresh_postgres_database(server_url: str) -> str:
    """A database of its own on the session's server (other tests use `hcnr`)."""
    name = f"job_state_{secrets.token_hex(4)}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return server_url.rsplit("/", 1)[0] + f"/{name}"


_ids = iter(range(1_000_000))


def make_job(factory, status: str, **values: Any) -> str:
    """A row in `status`, written directly: a fixture, not a transition."""
    job_id = f"job_{next(_ids)}_{secrets.token_hex(3)}"
    fields: dict[str, Any] = {
        "id": job_id,
        "tenant_id": "ten_1",
        "base_ref": "path:b",
        "finetuned_ref": "path:f",
        "honesty_file_id": "file_1",
        "task_file_id": "file_1",
        "status": status,
    }
    if status in job_state.ACTIVE_STATES:
        fields.update(worker_id="w:1", attempts=1, started_at=utcnow())
        fields.update(lease_expires_at=utcnow() + timedelta(seconds=60))
    if status == "queued":
        fields["queued_at"] = utcnow()
    fields.update(values)
    with session_scope(factory) as session:
        session.add(Job(**fields))
    return job_id


def row(factory, job_id: str) -> Job:
    with session_scope(factory) as session:
        return session.get(Job, job_id)


def events(factory, job_id: str) -> list[str]:
    with session_scope(factory) as session:
        query = select(JobEvent.type).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
        return list(session.scalars(query))


# --- the table --------------------------------------------------------------------------------


def test_the_table_lists_every_state_once_and_terminal_states_have_no_exit():
    from api.schemas import JobStatus

    assert len(set(STATES)) == len(STATES) and set(TRANSITIONS) == set(STATES)
    assert {(src, dst) for src, targets in TRANSITIONS.items() for dst in targets} == ALLOWED
    assert all(target in STATES for targets in TRANSITIONS.values() for target in targets)
    assert {state for state in STATES if not TRANSITIONS[state]} == TERMINAL_STATES
    assert {"running", "cancelling"} == job_state.ACTIVE_STATES
    assert get_args(JobStatus) == STATES  # the API's enum is this list
    assert Job.__table__.c.status.default.arg == job_state.INITIAL
    reachable, frontier = {job_state.INITIAL}, [job_state.INITIAL]
    while frontier:
        for target in TRANSITIONS[frontier.pop()] - reachable:
            reachable.add(target)
            frontier.append(target)
    assert reachable == set(STATES)


@pytest.mark.parametrize("src", STATES)
def test_every_allowed_transition_works_and_every_other_is_refused(factory, src):
    for dst in STATES:
        job_id = make_job(factory, src)
        with session_scope(factory) as session:
            moved = job_state.transition(session, job_id, dst)
        after = row(factory, job_id).status
        if (src, dst) in ALLOWED:
            assert moved is not None and moved.status == dst == after, (src, dst)
        else:
            assert moved is None and after == src, (src, dst)


def test_transition_refuses_unknown_states_and_impossible_sources(factory):
    job_id = make_job(factory, "queued")
    with session_scope(factory) as session:
        with pytest.raises(ValueError):
            job_state.transition(session, job_id, "paused")
        with pytest.raises(ValueError):  # succeeded is never a source
            job_state.transition(session, job_id, "queued", only_from={"succeeded"})
    assert row(factory, job_id).status == "queued"


# --- the operations ---------------------------------------------------------------------------


def test_queue_only_from_validating(factory):
    job_id = make_job(factory, "validating")
    with session_scope(factory) as session:
        assert job_state.queue(session, job_id).status == "queued"
    job = row(factory, job_id)
    assert job.status == "queued" and job.queued_at is not None
    assert events(factory, job_id) == ["queued"]
    with session_scope(factory) as session, pytest.raises(TransitionRefused) as refused:
        job_state.queue(session, job_id)
    assert refused.value.status == "queued"


def test_fail_validation_only_from_validating(factory):
    job_id = make_job(factory, "validating")
    with session_scope(factory) as session:
        job = job_state.fail_validation(session, job_id, "invalid_data", "line 3: bad")
        assert job is not None
    job = row(factory, job_id)
    assert (job.status, job.error_code, job.error_message) == (
        "failed",
        "invalid_data",
        "line 3: bad",
    )
    assert job.finished_at is not None and events(factory, job_id) == ["failed"]
    queued = make_job(factory, "queued")  # a duplicate validation after it was validated
    with session_scope(factory) as session:
        assert job_state.fail_validation(session, queued, "invalid_data", "x") is None
    assert row(factory, queued).status == "queued"


def test_stale_validating_jobs_are_those_whose_task_was_not_sent_recently(factory):
    from datetime import timedelta

    now = utcnow()
    old, fresh, resent = (make_job(factory, "validating") for _ in range(3))
    with session_scope(factory) as session:
        for job_id, created, sent in (
            (old, now - timedelta(hours=1), None),
            (fresh, now, None),
            (resent, now - timedelta(hours=1), now),
        ):
            job = session.get(Job, job_id)
            job.created_at, job.validation_sent_at = created, sent
    before = now - timedelta(minutes=15)
    with session_scope(factory) as session:
        stale = [j.id for j in job_state.stale_validating_jobs(session, before)]
        assert stale == [old]
        job_state.validation_sent(session, old, now)
    with session_scope(factory) as session:
        assert job_state.stale_validating_jobs(session, before) == []


def test_claim_counts_attempts_and_only_one_worker_wins(factory):
    job_id = make_job(factory, "queued")
    with session_scope(factory) as session:
        claimed = job_state.claim(session, job_id, "w:1", 60)
        assert claimed is not None and claimed.attempts == 1
    with session_scope(factory) as session:
        assert job_state.claim(session, job_id, "w:2", 60) is None  # already running
    job = row(factory, job_id)
    assert (job.status, job.worker_id, job.attempts) == ("running", "w:1", 1)
    assert job.lease_expires_at > utcnow() and job.started_at is not None
    assert events(factory, job_id) == ["running"]


@pytest.mark.parametrize("src", [s for s in STATES if s != "queued"])
def test_claim_is_refused_unless_queued(factory, src):
    job_id = make_job(factory, src)
    with session_scope(factory) as session:
        assert job_state.claim(session, job_id, "w:9", 60) is None
    assert row(factory, job_id).status == src and events(factory, job_id) == []


def test_renew_lease_only_for_the_holder(factory):
    job_id = make_job(factory, "queued")
    with session_scope(factory) as session:
        job_state.claim(session, job_id, "w:1", 1)
    before = row(factory, job_id).lease_expires_at
    with session_scope(factory) as session:
        assert job_state.renew_lease(session, job_id, "w:1", 600) == "running"
        assert job_state.renew_lease(session, job_id, "w:2", 600) is None
    assert row(factory, job_id).lease_expires_at > before
    with session_scope(factory) as session:
        job_state.cancel(session, job_id)
    with session_scope(factory) as session:  # the holder learns of the cancellation
        assert job_state.renew_lease(session, job_id, "w:1", 600) == "cancelling"
    with session_scope(factory) as session:
        job_state.finish(session, job_id, "w:1", "cancelled")
    with session_scope(factory) as session:  # a finished job has no lease
        assert job_state.renew_lease(session, job_id, "w:1", 600) is None


@pytest.mark.parametrize(
    ("src", "expected"),
    [("validating", "cancelled"), ("queued", "cancelled"), ("running", "cancelling")],
)
def test_cancel(factory, src, expected):
    job_id = make_job(factory, src)
    with session_scope(factory) as session:
        assert job_state.cancel(session, job_id).status == expected
    job = row(factory, job_id)
    assert job.status == expected
    assert (job.finished_at is not None) == (expected == "cancelled")
    assert events(factory, job_id) == [expected]


def test_cancel_of_a_cancelling_job_changes_nothing(factory):
    job_id = make_job(factory, "cancelling")
    with session_scope(factory) as session:
        assert job_state.cancel(session, job_id).status == "cancelling"
    assert events(factory, job_id) == []


@pytest.mark.parametrize("src", sorted(TERMINAL_STATES))
def test_cancel_of_a_finished_job_is_refused(factory, src):
    job_id = make_job(factory, src)
    with session_scope(factory) as session, pytest.raises(TransitionRefused) as refused:
        job_state.cancel(session, job_id)
    assert refused.value.status == src
    assert row(factory, job_id).status == src and events(factory, job_id) == []


@pytest.mark.parametrize("src", ["running", "cancelling"])
@pytest.mark.parametrize("status", sorted(TERMINAL_STATES))
def test_finish_by_the_holder(factory, src, status):
    job_id = make_job(factory, src)
    kwargs: dict[str, Any] = {}
    if status == "failed":
        kwargs = {"error_code": "boom", "error_message": "x" * 5000}
    if status == "succeeded":
        kwargs = {"report": {"stage_seconds": {"a": 1.0}, "metrics": {"m": 1}}}
    with session_scope(factory) as session:
        assert job_state.finish(session, job_id, "w:2", status, **kwargs) is None  # not its
    assert row(factory, job_id).status == src
    with session_scope(factory) as session:
        assert job_state.finish(session, job_id, "w:1", status, **kwargs).status == status
    job = row(factory, job_id)
    assert job.status == status and job.finished_at is not None
    if status == "succeeded":
        assert job.progress == 1.0 and job.stage_seconds == {"a": 1.0}
        assert job.metrics == {"m": 1}
    if status == "failed":
        assert job.error_code == "boom" and len(job.error_message) == 4000
    assert events(factory, job_id) == [status]
    with session_scope(factory) as session:  # once finished, for good
        assert job_state.finish(session, job_id, "w:1", "failed", error_code="late") is None
    assert row(factory, job_id).status == status


@pytest.mark.parametrize("src", ["validating", "queued", *sorted(TERMINAL_STATES)])
def test_finish_is_refused_when_no_worker_holds_the_job(factory, src):
    job_id = make_job(factory, src, worker_id="w:1")
    with session_scope(factory) as session:
        assert job_state.finish(session, job_id, "w:1", "succeeded", report={}) is None
    assert row(factory, job_id).status == src


def test_finish_needs_a_terminal_status_and_a_code_to_fail(factory):
    job_id = make_job(factory, "running")
    with session_scope(factory) as session:
        with pytest.raises(ValueError):
            job_state.finish(session, job_id, "w:1", "queued")
        with pytest.raises(ValueError):
            job_state.finish(session, job_id, "w:1", "failed")
    assert row(factory, job_id).status == "running"


# --- lost workers: requeue and the attempt rules -----------------------------------------------


def _expire(factory, job_id: str, **values: Any) -> None:
    with session_scope(factory) as session:
        job = session.get(Job, job_id)
        job.lease_expires_at = utcnow() - timedelta(seconds=1)
        for name, value in values.items():
            setattr(job, name, value)


def _recover(factory, max_attempts: int = 3, timeout: float = 3600) -> dict[str, str]:
    with session_scope(factory) as session:
        return {
            job.id: job_state.recover_expired(
                session,
                job,
                max_attempts=max_attempts,
                job_timeout_seconds=timeout,
                grace_seconds=0,
            )
            for job in job_state.expired_jobs(session, utcnow())
        }


def test_lost_attempts_are_requeued_until_max_attempts_then_failed(factory):
    job_id = make_job(factory, "queued")
    for attempt in (1, 2, 3):
        with session_scope(factory) as session:
            assert job_state.claim(session, job_id, f"w:{attempt}", 60).attempts == attempt
        _expire(factory, job_id)
        expected = "queued" if attempt < 3 else "failed"
        assert _recover(factory, max_attempts=3) == {job_id: expected}
    job = row(factory, job_id)
    assert (job.status, job.error_code, job.attempts) == ("failed", "worker_lost", 3)
    assert job.worker_id is None and job.lease_expires_at is None
    assert events(factory, job_id) == [
        "running",
        "requeued",
        "running",
        "requeued",
        "running",
        "failed",
    ]
    assert _recover(factory) == {}  # nothing left to recover


def test_requeue_resets_the_run_but_keeps_the_attempt_count(factory):
    job_id = make_job(factory, "running", stage="fisher", progress=0.5, attempts=1)
    _expire(factory, job_id)
    assert _recover(factory) == {job_id: "queued"}
    job = row(factory, job_id)
    assert (job.stage, job.progress, job.worker_id, job.attempts) == (None, 0.0, None, 1)
    with session_scope(factory) as session:  # a stalled old holder cannot finish it now
        assert job_state.finish(session, job_id, "w:1", "succeeded", report={}) is None
        assert job_state.renew_lease(session, job_id, "w:1", 60) is None


def test_a_lost_cancelling_job_is_cancelled_and_a_job_past_its_limit_failed(factory):
    cancelling = make_job(factory, "cancelling")
    late = make_job(factory, "running", started_at=utcnow() - timedelta(seconds=100))
    alive = make_job(factory, "running")  # its lease has not expired
    _expire(factory, cancelling)
    _expire(factory, late)
    assert _recover(factory, timeout=10) == {cancelling: "cancelled", late: "failed"}
    assert row(factory, late).error_code == "timeout"
    assert row(factory, alive).status == "running"


def test_requeue_only_from_running(factory):
    for src in STATES:
        job_id = make_job(factory, src)
        with session_scope(factory) as session:
            moved = job_state.requeue(session, job_id, "test")
        assert (moved is not None) == (src == "running"), src


# --- nothing else writes Job.status -----------------------------------------------------------


def _status_writes(path: Path) -> Iterator[str]:
    """`x.status = ...`, `update(...).values(status=...)` and `Job(status=...)` in a file."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                elements = target.elts if isinstance(target, ast.Tuple) else [target]
                for element in elements:
                    if (
                        isinstance(element, ast.Attribute)
                        and element.attr == "status"
                        and getattr(element.value, "id", None) != "self"  # APIError's own
                    ):
                        yield f"{path.relative_to(ROOT)}:{node.lineno}"
        if isinstance(node, ast.Call) and any(k.arg == "status" for k in node.keywords):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("values", "Job"):
                yield f"{path.relative_to(ROOT)}:{node.lineno}"


def test_job_state_is_the_only_writer_of_job_status():
    sources = [
        path
        for package in ("api", "worker", "store", "hcnr_cli")
        for path in sorted((ROOT / package).rglob("*.py"))
        if path != ROOT / "store" / "job_state.py"
    ]
    assert len(sources) > 20
    assert [write for path in sources for write in _status_writes(path)] == []
    assert list(_status_writes(ROOT / "store" / "job_state.py"))  # the check sees writes
