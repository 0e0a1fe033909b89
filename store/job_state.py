"""The job state machine: the one writer of `Job.status`.

    validating ──► queued ──claim──► running ──finish──► succeeded | failed | cancelled
        │  │         │  ▲              │  │
        │  └──cancel─┴──┼──► cancelled │  └──cancel──► cancelling ──finish/recover──►
        │               │              │                  succeeded | failed | cancelled
        │               └───requeue────┘  (lease expired, attempts < max_attempts)
        └──fail_validation──► failed  (the validation task refused the inputs)

Every status change is one conditional UPDATE (`... WHERE status IN (<allowed from>)`),
so two actors racing for a row (two workers claiming, a cancel and a finish) cannot both
win: the loser's operation returns False (or None) and changes nothing. `TRANSITIONS`
lists the allowed moves once; `transition` refuses every other one. The operations add
the rules of each move (who may make it, what else changes, the job event) and are what
the API, the worker and the reconciler call; nothing else writes `Job.status`.

Attempt rules: `claim` counts an attempt; a job whose lease expired is re-queued by
`recover_expired` while `attempts < max_attempts`, failed (`worker_lost`) after that,
failed (`timeout`) if the lost attempt had already run past the job's time limit, and
cancelled if it was being cancelled.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import ColumnElement, delete, select, update
from sqlalchemy.orm import Session

from store import repositories
from store.models import Job, utcnow

STATES = ("validating", "queued", "running", "cancelling", "succeeded", "failed", "cancelled")
INITIAL = "validating"  # the column default of a new row (store/models.py)
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE_STATES = frozenset({"running", "cancelling"})  # held by a worker's lease

TRANSITIONS: dict[str, frozenset[str]] = {
    "validating": frozenset({"queued", "failed", "cancelled"}),
    "queued": frozenset({"running", "cancelled"}),
    "running": frozenset({"cancelling", "succeeded", "failed", "cancelled", "queued"}),
    "cancelling": frozenset({"succeeded", "failed", "cancelled"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}


class TransitionRefused(Exception):
    """An operation the job's current status does not allow (e.g. cancelling a finished
    job); `status` is the status the job has."""

    def __init__(self, job_id: str, status: str | None, wanted: str):
        self.job_id, self.status, self.wanted = job_id, status, wanted
        super().__init__(f"job {job_id} is {status}: cannot become {wanted}")


def sources(target: str) -> frozenset[str]:
    """The states from which a job may move to `target`."""
    return frozenset(state for state, targets in TRANSITIONS.items() if target in targets)


def transition(
    session: Session,
    job_id: str,
    target: str,
    *,
    only_from: Iterable[str] | None = None,
    where: Iterable[ColumnElement[bool]] = (),
    **values: Any,
) -> Job | None:
    """Move the job to `target` if its status allows it (and `only_from`, `where` hold),
    setting `values` too; the refreshed job, or None when nothing moved. The primitive of
    the operations below: call them, not this."""
    if target not in TRANSITIONS:
        raise ValueError(f"unknown job status {target!r}")
    allowed = sources(target)
    if only_from is not None:
        wanted = frozenset(only_from)
        if not wanted <= allowed:  # a programming error, not a race
            raise ValueError(f"{sorted(wanted - allowed)} -> {target} is not a transition")
        allowed = wanted
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(sorted(allowed)), *where)
        .values(status=target, updated_at=now, **values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return None
    return session.get(Job, job_id, populate_existing=True)


def _status(session: Session, job_id: str) -> str | None:
    return session.scalar(select(Job.status).where(Job.id == job_id))


# --- the operations ----------------------------------------------------------------------


def queue(session: Session, job_id: str, pinned: dict[str, str | None] | None = None) -> Job:
    """validating -> queued: the job passed validation and waits for a worker. `pinned`:
    the exact model versions the validation fetched (base_resolved, finetuned_resolved)."""
    job = transition(
        session, job_id, "queued", only_from={"validating"}, queued_at=utcnow(), **(pinned or {})
    )
    if job is None:
        raise TransitionRefused(job_id, _status(session, job_id), "queued")
    repositories.add_event(session, job, "queued", "validated; waiting for a worker")
    return job


def fail_validation(
    session: Session, job_id: str, code: str, message: str, details: Any = None
) -> Job | None:
    """validating -> failed: the validation task refused the job's inputs (the codes and
    line-numbered messages a synchronous check would have answered with). None when the
    job is no longer validating (cancelled meanwhile, or validated by a duplicate task)."""
    job = transition(
        session,
        job_id,
        "failed",
        only_from={"validating"},
        finished_at=utcnow(),
        error_code=code,
        error_message=message[:4000],
        error_details=details,
    )
    if job is not None:
        repositories.add_event(session, job, "failed", message[:4000], {"code": code})
    return job


def delete_finished(session: Session, job_id: str) -> bool:
    """Remove a finished job's row (its events, artifacts and labels go with it). One
    conditional DELETE: a job that is not in a terminal state is never removed."""
    result = session.execute(delete(Job).where(Job.id == job_id, Job.status.in_(TERMINAL_STATES)))
    return result.rowcount == 1


def validation_sent(session: Session, job_id: str, now: datetime) -> None:
    """Record that the job's validation task was (re-)sent; not a status change."""
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "validating")
        .values(validation_sent_at=now)
    )


def notified(session: Session, job_id: str, now: datetime) -> None:
    """Record that the broker accepted the finished job's follow-up tasks (its webhook and
    Hub push); not a status change."""
    session.execute(
        update(Job).where(Job.id == job_id, Job.status.in_(TERMINAL_STATES)).values(notified_at=now)
    )


def unnotified_jobs(session: Session, before: datetime) -> list[Job]:
    """Jobs finished before `before` whose follow-up message never reached the broker (a
    worker died between recording the outcome and sending it, or the broker was down)."""
    query = (
        select(Job)
        .where(Job.status.in_(TERMINAL_STATES), Job.finished_at < before)
        .where(Job.notified_at.is_(None))
        .with_for_update(skip_locked=True)
    )
    return list(session.scalars(query).all())


def stale_validating_jobs(session: Session, before: datetime) -> list[Job]:
    """Jobs validating since before `before` whose task was not sent since (lost)."""
    sent = Job.validation_sent_at
    query = (
        select(Job)
        .where(Job.status == "validating", Job.created_at < before)
        .where(sent.is_(None) | (sent < before))
        .with_for_update(skip_locked=True)
    )
    return list(session.scalars(query).all())


def claim(session: Session, job_id: str, worker_id: str, lease_seconds: float) -> Job | None:
    """queued -> running for `worker_id`, one more attempt, a fresh lease; None if
    someone else (or nobody) may run it."""
    now = utcnow()
    job = transition(
        session,
        job_id,
        "running",
        only_from={"queued"},
        worker_id=worker_id,
        attempts=Job.attempts + 1,
        lease_expires_at=now + timedelta(seconds=lease_seconds),
        started_at=now,
    )
    if job is not None:
        repositories.add_event(session, job, "running", f"attempt {job.attempts} on {worker_id}")
    return job


def renew_lease(session: Session, job_id: str, worker_id: str, lease_seconds: float) -> str | None:
    """Extend the lease if `worker_id` still holds it and return the job's status; None
    when it no longer does (a stalled worker whose job was re-queued, maybe running
    elsewhere now: it must stop, whatever the status says). Changes no status."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.worker_id == worker_id, Job.status.in_(ACTIVE_STATES))
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return None
    return _status(session, job_id)


def cancel(session: Session, job_id: str) -> Job:
    """validating/queued -> cancelled at once; running -> cancelling (its worker stops
    between steps and finishes it). A job already cancelling is left as it is; a
    finished one raises TransitionRefused."""
    job = transition(
        session, job_id, "cancelled", only_from={"validating", "queued"}, finished_at=utcnow()
    )
    if job is None:
        job = transition(session, job_id, "cancelling", only_from={"running"})
    if job is not None:
        repositories.add_event(session, job, job.status, "cancellation requested")
        return job
    current = session.get(Job, job_id, populate_existing=True)
    if current is None or current.status != "cancelling":
        raise TransitionRefused(job_id, current.status if current else None, "cancelled")
    return current


def finish(
    session: Session,
    job_id: str,
    worker_id: str,
    status: str,
    *,
    message: str | None = None,
    report: dict[str, Any] | None = None,
    error_code: str | None = None,
    error_message: str | None = None,
) -> Job | None:
    """running/cancelling -> succeeded | failed | cancelled, only for the worker that
    holds the job; None when it no longer does (its lease was lost)."""
    if status not in TERMINAL_STATES:
        raise ValueError(f"{status!r} is not a terminal status")
    values: dict[str, Any] = {"finished_at": utcnow(), "eta_seconds": None}
    if status == "succeeded":
        report = report or {}
        values.update(
            progress=1.0,
            report=report,
            stage_seconds=report.get("stage_seconds", {}),
            metrics=report.get("metrics"),
        )
    elif status == "failed":
        if error_code is None:
            raise ValueError("a failed job needs an error code")
        values.update(error_code=error_code, error_message=(error_message or "")[:4000])
    job = transition(
        session,
        job_id,
        status,
        only_from=ACTIVE_STATES,
        where=[Job.worker_id == worker_id],
        **values,
    )
    if job is not None:
        data = {"code": error_code} if error_code is not None else None
        text = error_message if status == "failed" else message
        repositories.add_event(session, job, status, text or f"job {status}", data)
    return job


def requeue(session: Session, job_id: str, reason: str) -> Job | None:
    """running -> queued: the attempt was lost; the job waits for a worker again."""
    job = transition(
        session,
        job_id,
        "queued",
        only_from={"running"},
        worker_id=None,
        lease_expires_at=None,
        stage=None,
        progress=0.0,
        eta_seconds=None,
        queued_at=utcnow(),
    )
    if job is not None:
        repositories.add_event(session, job, "requeued", reason)
    return job


def _fail_lost(session: Session, job_id: str, code: str, message: str) -> Job | None:
    job = transition(
        session,
        job_id,
        "failed",
        only_from=ACTIVE_STATES,
        worker_id=None,
        lease_expires_at=None,
        finished_at=utcnow(),
        error_code=code,
        error_message=message,
    )
    if job is not None:
        repositories.add_event(session, job, "failed", message, {"code": code})
    return job


def recover_expired(
    session: Session,
    job: Job,
    *,
    max_attempts: int,
    job_timeout_seconds: float,
    grace_seconds: float,
) -> str:
    """What becomes of a job whose worker stopped renewing its lease (the attempt rules
    above); returns its new status."""
    lost, job_id = job.worker_id, job.id
    if job.status == "cancelling":
        moved = transition(
            session,
            job_id,
            "cancelled",
            only_from={"cancelling"},
            worker_id=None,
            lease_expires_at=None,
            finished_at=utcnow(),
        )
        if moved is not None:
            message = f"worker {lost} lost while cancelling"
            repositories.add_event(session, moved, "cancelled", message)
    elif _ran_past(job, job_timeout_seconds + grace_seconds):
        message = (
            f"the job ran past its {job_timeout_seconds:g}-second limit "
            f"(job_timeout_seconds) and its worker {lost} stopped answering"
        )
        moved = _fail_lost(session, job_id, "timeout", message)
    elif job.attempts >= max_attempts:
        message = f"the worker died {job.attempts} times (limit {max_attempts})"
        moved = _fail_lost(session, job_id, "worker_lost", message)
    else:
        moved = requeue(session, job_id, f"worker {lost} lost its lease")
    if moved is None:
        raise TransitionRefused(job_id, _status(session, job_id), "recovered")
    return moved.status


def expired_jobs(session: Session, now: datetime) -> list[Job]:
    """Jobs held by a worker whose lease ran out (locked; rows locked elsewhere skipped)."""
    query = (
        select(Job)
        .where(Job.status.in_(ACTIVE_STATES), Job.lease_expires_at < now)
        .with_for_update(skip_locked=True)
    )
    return list(session.scalars(query).all())


def stale_queued_jobs(session: Session, before: datetime) -> list[Job]:
    """Jobs queued since before `before` (their message may be lost)."""
    query = (
        select(Job)
        .where(Job.status == "queued", Job.queued_at < before)
        .with_for_update(skip_locked=True)
    )
    return list(session.scalars(query).all())


def resend(session: Session, job: Job, now: datetime) -> None:
    """A queued job waited too long (its message may be lost): record that it is sent
    again. The status stays queued; only one worker can claim it however many copies."""
    waited = (now - _aware(job.queued_at)).total_seconds()
    job.queued_at = now
    repositories.add_event(session, job, "resent", f"re-sent after {waited:.0f}s queued")


def _ran_past(job: Job, limit_seconds: float) -> bool:
    if job.started_at is None:
        return False
    return utcnow() - _aware(job.started_at) > timedelta(seconds=limit_seconds)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)
