"""Retention: what a succeeded job published is removed `artifact_retention_days` after it
finished (setting unset: kept until the job is deleted). The job row, its report and its
events stay; its artifact routes answer 410 `artifacts_expired`. Run by the reconciler
(worker/reconciler.py) on every pass, a bounded batch at a time."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import delete, select

from store import repositories
from store.db import session_scope
from store.models import Artifact, Job, utcnow
from store.settings import Settings
from store.storage import Storage, job_prefix

log = logging.getLogger("hcnr.retention")


def expire_artifacts(
    session_factory, storage: Storage, settings: Settings, now: datetime | None = None,
    batch: int = 100,
) -> list[str]:  # fmt: skip
    """Expire the artifacts of succeeded jobs finished before the retention cutoff;
    returns their ids. The rows are marked first (readers get 410 from then on), the
    stored files removed after."""
    days = settings.artifact_retention_days
    if days is None:
        return []
    now = now or utcnow()
    cutoff = now - timedelta(days=days)
    query = (
        select(Job)
        .where(
            Job.status == "succeeded",
            Job.finished_at < cutoff,
            Job.artifacts_expired_at.is_(None),
        )
        .order_by(Job.finished_at)
        .limit(batch)
        .with_for_update(skip_locked=True)
    )
    with session_scope(session_factory) as session:
        jobs = list(session.scalars(query).all())
        for job in jobs:
            job.artifacts_expired_at = now
            session.execute(delete(Artifact).where(Artifact.job_id == job.id))
            message = f"artifacts removed after the {days:g}-day retention period"
            repositories.add_event(session, job, "artifacts_expired", message)
        expired = [job.id for job in jobs]
    for job_id in expired:
        try:
            storage.delete_prefix(job_prefix(job_id))
        except Exception:  # marked already: a later delete of the job removes the rest
            log.exception("could not remove the artifacts of job %s", job_id)
    return expired
