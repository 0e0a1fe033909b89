"""Reconciler: re-queues jobs whose worker died (expired lease), up to `max_attempts` runs,
and re-sends lost messages: of jobs queued or validating for too long, and the follow-up
tasks (webhook, Hub push) of finished jobs the broker never accepted."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from store import job_state
from store.db import session_scope
from store.models import utcnow
from store.settings import Settings
from worker.cleanup import remove_leftovers

log = logging.getLogger("hcnr.reconciler")


def reconcile_once(
    session_factory: sessionmaker[Session],
    settings: Settings,
    enqueue: Callable[[str], None],
    notify: Callable[[str], None] | None = None,
    validate: Callable[[str], None] | None = None,
) -> dict[str, str]:
    """One pass; returns {job_id: new status} for every job it touched. `notify` sends
    the webhook of a job it finished (worker.celery_app.notify_with), `validate` the
    validation task of a job whose validation message was lost."""
    changed: dict[str, str] = {}
    revalidate: list[str] = []
    unnotified: list[str] = []
    now = utcnow()
    with session_scope(session_factory) as session:
        for job in job_state.expired_jobs(session, now):
            changed[job.id] = job_state.recover_expired(
                session,
                job,
                max_attempts=settings.max_attempts,
                job_timeout_seconds=settings.job_timeout_seconds,
                grace_seconds=settings.job_timeout_grace_seconds,
            )
        stale = now - timedelta(seconds=settings.requeue_queued_seconds)
        for job in job_state.stale_queued_jobs(session, stale):
            # The message may be lost (broker down at create time, broker data lost): send
            # it again. A duplicate is harmless: only one worker can claim a queued job.
            job_state.resend(session, job, now)
            changed[job.id] = "queued"
        if notify is not None:
            unnotified = [job.id for job in job_state.unnotified_jobs(session, stale)]
        if validate is not None:
            for job in job_state.stale_validating_jobs(session, stale):
                job_state.validation_sent(session, job.id, now)
                revalidate.append(job.id)
    if settings.artifact_retention_days is not None:
        from store.storage import make_storage
        from worker.retention import expire_artifacts

        expired = expire_artifacts(session_factory, make_storage(settings), settings, now)
        if expired:
            log.warning("artifacts expired (retention): %s", expired)
    for job_id in revalidate:  # idempotent: a duplicate finds the job no longer validating
        try:
            validate(job_id)
        except Exception:
            log.exception("could not re-send the validation of job %s", job_id)
    for job_id in unnotified:  # records notified_at once the broker has it; else next pass
        log.warning("re-sending the follow-up tasks (webhook, hub push) of job %s", job_id)
        _notify(notify, job_id)
    for job_id, status in changed.items():
        if status == "queued":
            enqueue(job_id)
        else:  # failed or cancelled for good: what its dead attempts left must go
            _remove_leftovers(settings, job_id)
            if notify is not None:
                _notify(notify, job_id)
    return changed


def _notify(notify: Callable[[str], None], job_id: str) -> None:
    try:
        notify(job_id)
    except Exception:
        log.exception("could not send the webhook task of job %s", job_id)


def _remove_leftovers(settings: Settings, job_id: str) -> None:
    try:
        remove_leftovers(settings, job_id)
    except Exception:
        log.exception("could not remove the leftovers of job %s", job_id)


class ReconcilerThread(threading.Thread):
    """Runs `reconcile_once` every `settings.reconcile_seconds` until stopped."""

    def __init__(
        self,
        session_factory,
        settings: Settings,
        enqueue: Callable[[str], None],
        notify: Callable[[str], None] | None = None,
        validate: Callable[[str], None] | None = None,
    ):
        super().__init__(daemon=True, name="hcnr-reconciler")
        self.args_ = (session_factory, settings, enqueue, notify, validate)
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
