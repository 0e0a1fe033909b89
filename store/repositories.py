"""Queries. Everything a tenant can reach is looked up *with* its tenant id, so another
tenant's id simply is not found."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, joinedload

from store import webhooks
from store.models import (
    ApiKey,
    Artifact,
    File,
    Job,
    JobEvent,
    JobLabel,
    Tenant,
    utcnow,
)

KEY_PREFIX = "hcnr"

# --- tenants and API keys ------------------------------------------------------------


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_api_key(session: Session, tenant_name: str, name: str = "") -> tuple[ApiKey, str]:
    """A new key for `tenant_name` (created if needed); the plaintext is returned once."""
    tenant = get_or_create_tenant(session, tenant_name)
    lookup, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    key = ApiKey(tenant_id=tenant.id, lookup=lookup, secret_hash=_hash_secret(secret), name=name)
    session.add(key)
    session.flush()
    return key, f"{KEY_PREFIX}_{lookup}_{secret}"


def authenticate(session: Session, token: str) -> Tenant | None:
    """The tenant of a valid, unrevoked key; None otherwise (constant-time compare)."""
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX:
        return None
    key = session.scalar(select(ApiKey).where(ApiKey.lookup == parts[1]))
    if key is None or key.revoked_at is not None:
        return None
    if not hmac.compare_digest(key.secret_hash, _hash_secret(parts[2])):
        return None
    return key.tenant


def webhook_secret(session: Session, tenant_id: str, rotate: bool = False) -> str:
    """The tenant's webhook signing secret, created on first use (or replaced)."""
    tenant = session.get(Tenant, tenant_id, with_for_update=True)
    if tenant.webhook_secret is None or rotate:
        tenant.webhook_secret = webhooks.new_secret()
        session.flush()
    return tenant.webhook_secret


def revoke_api_key(session: Session, key_id: str) -> bool:
    key = session.scalar(select(ApiKey).where((ApiKey.id == key_id) | (ApiKey.lookup == key_id)))
    if key is None or key.revoked_at is not None:
        return False
    key.revoked_at = utcnow()
    return True


def list_api_keys(session: Session) -> Sequence[ApiKey]:
    return session.scalars(select(ApiKey).order_by(ApiKey.created_at)).all()


# --- files ---------------------------------------------------------------------------


def get_file(session: Session, tenant_id: str, file_id: str) -> File | None:
    """The tenant's file, unless deleted."""
    query = select(File).where(
        File.id == file_id, File.tenant_id == tenant_id, File.deleted_at.is_(None)
    )
    return session.scalar(query)


def get_files(session: Session, tenant_id: str, file_ids: Iterable[str]) -> dict[str, File]:
    """The tenant's live files among `file_ids`, by id (others' and deleted ones absent)."""
    wanted = set(file_ids)
    if not wanted:
        return {}
    query = select(File).where(
        File.id.in_(wanted), File.tenant_id == tenant_id, File.deleted_at.is_(None)
    )
    return {file.id: file for file in session.scalars(query)}


def list_files(
    session: Session,
    tenant_id: str,
    *,
    limit: int,
    purpose: str | None = None,
    after: File | None = None,
) -> list[File]:
    """The tenant's files, newest first; `after`: those listed after that file."""
    query = select(File).where(File.tenant_id == tenant_id, File.deleted_at.is_(None))
    if purpose is not None:
        query = query.where(File.purpose == purpose)
    if after is not None:
        query = query.where(
            (File.created_at < after.created_at)
            | ((File.created_at == after.created_at) & (File.id < after.id))
        )
    query = query.order_by(File.created_at.desc(), File.id.desc()).limit(limit)
    return list(session.scalars(query).all())


def jobs_using_file(session: Session, file_id: str, statuses: Iterable[str]) -> list[Job]:
    """Jobs in `statuses` that read the file (any of their four file references)."""
    uses = (
        (Job.honesty_file_id == file_id)
        | (Job.task_file_id == file_id)
        | (Job.eval_file_id == file_id)
        | (Job.validation_file_id == file_id)
    )
    return list(session.scalars(select(Job).where(uses, Job.status.in_(list(statuses)))).all())


# --- jobs ----------------------------------------------------------------------------


def get_job(session: Session, tenant_id: str, job_id: str) -> Job | None:
    """The tenant's job with its labels in one query (a job's page and its events are the
    routes clients poll: the labels' own SELECT was a second round trip on each)."""
    query = select(Job).options(joinedload(Job.labels))
    query = query.where(Job.id == job_id, Job.tenant_id == tenant_id)
    return session.execute(query).unique().scalar_one_or_none()


def get_job_by_id(session: Session, job_id: str, lock: bool = False) -> Job | None:
    """For the worker and reconciler only: they act on ids, not on behalf of a tenant."""
    query = select(Job).where(Job.id == job_id)
    return session.scalar(query.with_for_update() if lock else query)


def find_idempotent_job(session: Session, tenant_id: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))


def list_jobs(
    session: Session,
    tenant_id: str,
    *,
    limit: int,
    after: tuple[datetime, str] | None = None,
    status: str | None = None,
    labels: dict[str, str] | None = None,
) -> list[Job]:
    """Newest first; `after` is the (created_at, id) of the last job of the previous page."""
    query = select(Job).where(Job.tenant_id == tenant_id)
    if status:
        query = query.where(Job.status == status)
    for key, value in (labels or {}).items():
        query = query.where(Job.labels.any((JobLabel.key == key) & (JobLabel.value == value)))
    if after is not None:
        created, job_id = after
        query = query.where(
            (Job.created_at < created) | ((Job.created_at == created) & (Job.id < job_id))
        )
    query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
    return list(session.scalars(query).all())


def add_event(
    session: Session,
    job: Job,
    type_: str,
    message: str = "",
    data: dict[str, Any] | None = None,
) -> JobEvent:
    event = JobEvent(
        job_id=job.id,
        type=type_,
        stage=job.stage,
        progress=job.progress,
        message=message,
        data=data,
    )
    session.add(event)
    return event


def list_events(session: Session, job_id: str, after: int, limit: int) -> list[JobEvent]:
    query = (
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.id > after)
        .order_by(JobEvent.id)
        .limit(limit)
    )
    return list(session.scalars(query).all())


def storage_bytes_by_tenant(session: Session) -> dict[tuple[str, str], int]:
    """{(tenant name, "files" | "artifacts"): bytes stored}: live uploads and what jobs
    published (deleted files and expired artifacts no longer count)."""
    files = (
        select(Tenant.name, func.coalesce(func.sum(File.bytes), 0))
        .join(File, File.tenant_id == Tenant.id)
        .where(File.deleted_at.is_(None))
        .group_by(Tenant.name)
    )
    artifacts = (
        select(Tenant.name, func.coalesce(func.sum(Artifact.bytes), 0))
        .join(Job, Job.tenant_id == Tenant.id)
        .join(Artifact, Artifact.job_id == Job.id)
        .group_by(Tenant.name)
    )
    out: dict[tuple[str, str], int] = {}
    for kind, query in (("files", files), ("artifacts", artifacts)):
        for name, total in session.execute(query).all():
            out[(name, kind)] = int(total)
    return out


def count_jobs_by_status(session: Session) -> dict[str, int]:
    rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
    return {status: count for status, count in rows}


# --- artifacts -------------------------------------------------------------------------


def list_artifacts(session: Session, job_id: str) -> list[Artifact]:
    query = select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)
    return list(session.scalars(query).all())


def get_artifact(session: Session, job_id: str, name: str) -> Artifact | None:
    return session.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))
