"""Reconciler: re-queues jobs whose worker died (expired lease), up to `max_attempts` runs,
and re-sends jobs queued for too long (a lost message)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from store import repositories
from store.db import session_scope
from store.models import Job, utcnow
from store.settings import Settings
from worker.cleanup import remove_leftovers
from worker.webhooks import notify_job

log = logging.getLogger("hcnr.reconciler")


def reconcile_once(
    session_factory: sessionmaker[Session], settings: Settings, enqueue: Callable[[str], None]
) -> dict[str, str]:
    """One pass; returns {job_id: new status} for every job it touched."""
    changed: dict[str, str] = {}
    now = utcnow()
    with session_scope(session_factory) as session:
        for job in repositories.expired_jobs(session, now):
            changed[job.id] = _recover(session, job, settings)
        stale = now - timedelta(seconds=settings.requeue_queued_seconds)
        for job in repositories.stale_queued_jobs(session, stale):
            # The message may be lost (broker down at create time, broker data lost): send
            # it again. A duplicate is harmless: only one worker can claim a queued job.
            waited = (now - job.queued_at).total_seconds()
            job.queued_at = now
            repositories.add_event(session, job, "resent", f"re-sent after {waited:.0f}s queued")
            changed[job.id] = "queued"
    for job_id, status in changed.items():
        if status == "queued":
            enqueue(job_id)
        else:  # failed or cancelled for good: what its dead attempts left must go
            _remove_leftovers(settings, job_id)
            notify_job(session_factory, settings, job_id)
    return changed


def _remove_leftovers(settings: Settings, job_id: str) -> None:
    try:
        remove_leftovers(settings, job_id)
    except Exception:
        log.exception("could not remove the leftovers of job %s", job_id)


def _past_job_timeout(job: Job, settings: Settings) -> bool:
    """Did the lost attempt run past job_timeout_seconds? Then another run would too."""
    if job.started_at is None:
        return False
    limit = settings.job_timeout_seconds + settings.job_timeout_grace_seconds
    return utcnow() - _aware(job.started_at) > timedelta(seconds=limit)


def _aware(moment):
    from datetime import timezone

    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def _recover(session: Session, job: Job, settings: Settings) -> str:
    lost, max_attempts = job.worker_id, settings.max_attempts
    job.worker_id, job.lease_expires_at = None, None
    if job.status == "cancelling":
        job.status, job.finished_at = "cancelled", utcnow()
        repositories.add_event(session, job, "cancelled", f"worker {lost} lost while cancelling")
    elif _past_job_timeout(job, settings):
        job.status, job.finished_at = "failed", utcnow()
        job.error_code = "timeout"
        job.error_message = (
            f"the job ran past its {settings.job_timeout_seconds:g}-second limit "
            f"(job_timeout_seconds) and its worker {lost} stopped answering"
        )
        repositories.add_event(session, job, "failed", job.error_message, {"code": "timeout"})
    elif job.attempts >= max_attempts:
        job.status, job.finished_at = "failed", utcnow()
        job.error_code = "worker_lost"
        job.error_message = f"the worker died {job.attempts} times (limit {max_attempts})"
        repositories.add_event(session, job, "failed", job.error_message, {"code": "worker_lost"})
    else:
        job.status, job.stage, job.progress, job.eta_seconds = "queued", None, 0.0, None
        job.queued_at = utcnow()
        repositories.add_event(session, job, "requeued", f"worker {lost} lost its lease")
    return job.status


class ReconcilerThread(threading.Thread):
    """Runs `reconcile_once` every `settings.reconcile_seconds` until stopped."""

    def __init__(self, session_factory, settings: Settings, enqueue: Callable[[str], None]):
        super().__init__(daemon=True, name="hcnr-reconciler")
        self.args_ = (session_factory, settings, enqueue)
        self.stopped = threading.Event()

    def run(self) -> None:
        settings = self.args_[1]
        while not self.stopped.wait(settings.reconcile_seconds):
            try:
                changed = reconcile_once(*self.args_)
                if changed:
                    log.warning("reconciled jobs: %s", changed)
            except Exception:
                log.exception("reconciler pass failed")
