"""ORM tables (SQLAlchemy 2.0). Every tenant-owned row carries `tenant_id`."""

from __future__ import annotations

import secrets
from datetime import datetime, timezone
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(timezone.utc) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime, dict[str, Any]: JSON}


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ten"))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Signs this tenant's webhooks (store/webhooks.py); the tenant can read it.
    webhook_secret: Mapped[str | None] = mapped_column(String(64), default=None)


class TenantSecret(Base):
    """A named credential of a tenant (`hf_token`, ...), AES-GCM encrypted (store/secrets.py).
    The API never returns `ciphertext` nor what it decrypts to."""

    __tablename__ = "tenant_secrets"

    tenant_id: Mapped[str] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    ciphertext: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    lookup: Mapped[str] = mapped_column(String(32), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)

    tenant: Mapped[Tenant] = relationship(lazy="joined")


class File(Base):
    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("file"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    purpose: Mapped[str] = mapped_column(String(16))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    samples: Mapped[int] = mapped_column(Integer)
    storage_key: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Deleted: the stored object is gone and every route answers 404; the row stays (a
    # tombstone) because finished jobs reference it.
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)


class Job(Base):
    __tablename__ = "repair_jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_job_idempotency"),
        Index("ix_job_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_job_status_lease", "status", "lease_expires_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("job"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    # Written only by store/job_state.py, which lists the states and their transitions.
    status: Mapped[str] = mapped_column(String(16), default="validating")
    stage: Mapped[str | None] = mapped_column(String(32), default=None)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    eta_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    base_ref: Mapped[str] = mapped_column(String(1000))
    finetuned_ref: Mapped[str] = mapped_column(String(1000))
    method: Mapped[str] = mapped_column(String(16), default="hcnr", server_default="hcnr")
    honesty_file_id: Mapped[str] = mapped_column(ForeignKey("files.id"))
    task_file_id: Mapped[str] = mapped_column(ForeignKey("files.id"))
    eval_file_id: Mapped[str | None] = mapped_column(ForeignKey("files.id"), default=None)
    validation_file_id: Mapped[str | None] = mapped_column(ForeignKey("files.id"), default=None)
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    webhook_url: Mapped[str | None] = mapped_column(String(2000), default=None)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), default=None)
    request_hash: Mapped[str | None] = mapped_column(String(64), default=None)
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    # Structured details of a validation refusal: {"source", "problems": [{line, message}]}
    # for data, {"limit", "value", "allowed"} for a limit (the API's error details).
    error_details: Mapped[Any | None] = mapped_column(JSON, default=None)
    stage_seconds: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(255), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    webhook_status: Mapped[str | None] = mapped_column(String(32), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column(default=None)
    # When the job's validation task was last sent (the reconciler re-sends a lost one).
    validation_sent_at: Mapped[datetime | None] = mapped_column(default=None)
    # When the broker accepted the follow-up tasks of the finished job (webhook, Hub push);
    # NULL on a finished job = that message was lost, and the reconciler sends it again.
    notified_at: Mapped[datetime | None] = mapped_column(default=None)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    # Set when the retention period (artifact_retention_days) removed what it published.
    artifacts_expired_at: Mapped[datetime | None] = mapped_column(default=None)
    # The exact versions the job runs, pinned by its validation: `hf:org/name@<commit>`
    # for a hub reference, `s3://bucket/prefix#<digest of the listing's ETags>` for S3,
    # None for `path:` (the runner reads these, never the moving reference).
    base_resolved: Mapped[str | None] = mapped_column(String(1100), default=None)
    finetuned_resolved: Mapped[str | None] = mapped_column(String(1100), default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    labels: Mapped[list[JobLabel]] = relationship(
        cascade="all, delete-orphan", lazy="selectin", order_by="JobLabel.key"
    )

    @property
    def metadata_dict(self) -> dict[str, str]:
        return {label.key: label.value for label in self.labels}

    # A job's tracker integrations (issue 17) ride in its `config` JSON under this key
    # rather than a column of their own (no migration); `hyperparameters` is the rest,
    # which is what the method's config, the API and the model card read.
    INTEGRATIONS_KEY: ClassVar[str] = "_integrations"

    # The Hub repository a succeeded job's checkpoint is pushed to (issue 17), likewise;
    # the push's outcome goes into its report (worker/hub_push.py).
    PUSH_KEY: ClassVar[str] = "_push_to_hub"

    @property
    def hyperparameters(self) -> dict[str, Any]:
        private = (self.INTEGRATIONS_KEY, self.PUSH_KEY)
        return {k: v for k, v in (self.config or {}).items() if k not in private}

    @property
    def integrations(self) -> list[dict[str, Any]]:
        return list((self.config or {}).get(self.INTEGRATIONS_KEY) or [])

    @property
    def push_target(self) -> dict[str, Any] | None:
        return (self.config or {}).get(self.PUSH_KEY)


class JobLabel(Base):
    """One `metadata` key/value of a job; a table so that list filters are indexable."""

    __tablename__ = "repair_job_metadata"
    __table_args__ = (Index("ix_job_metadata_kv", "key", "value"),)

    job_id: Mapped[str] = mapped_column(
        ForeignKey("repair_jobs.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(512))


class JobEvent(Base):
    __tablename__ = "repair_job_events"
    __table_args__ = (Index("ix_event_job_seq", "job_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("repair_jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    type: Mapped[str] = mapped_column(String(32))
    stage: Mapped[str | None] = mapped_column(String(32), default=None)
    progress: Mapped[float | None] = mapped_column(Float, default=None)
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_artifact_name"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[str] = mapped_column(
        ForeignKey("repair_jobs.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
