"""The one settings class of the service (environment variables prefixed `HCNR_`)."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from hcnr_core.config import RunOptions
from hcnr_core.limits import Limits

DEFAULT_SECRET = "hcnr-insecure-development-secret"


class Settings(Limits):
    """Everything the API, the worker and the CLI need; defaults give the embedded mode.

    The work limits of one repair (`max_parameters`, `max_tokens_per_job`,
    `validation_timeout_seconds`, ...) are inherited from `hcnr_core.limits.Limits`,
    which the library and the CLI read from the same environment variables."""

    model_config = SettingsConfigDict(env_prefix="HCNR_", env_file=None, extra="ignore")

    env: Literal["development", "test", "production"] = "development"
    data_dir: Path = Field(Path("hcnr-data"), description="Root of embedded-mode state")
    database_url: str | None = Field(None, description="SQLAlchemy URL; SQLite in data_dir")
    broker_url: str | None = Field(None, description="Celery broker; kombu SQLAlchemy default")
    models_root: Path | None = Field(None, description="`path:` references resolve under it")
    artifacts_url: str | None = Field(
        None, description="Local directory or fsspec URL (s3://bucket/prefix) for artifacts"
    )
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO...)")
    secret_key: str = Field(
        DEFAULT_SECRET,
        description="The operator's service-wide secret (webhooks are signed with each "
        "tenant's own secret instead: GET /v1/webhook-secret)",
    )
    previous_secret_keys: list[str] = Field(
        default_factory=list,
        description="Earlier values of secret_key (JSON list): tenant secrets encrypted under "
        "them stay readable after a rotation (store/secrets.py re-encrypts on the next write)",
    )
    model_cache_dir: Path | None = Field(
        None,
        description="Shared cache of `hf:` and `s3://` models (default data_dir/model-cache); "
        "the validation task writes it, GPU workers read it: one volume for both",
    )
    hub_endpoint: str | None = Field(
        None, description="Hugging Face Hub (or mirror) URL for `hf:` references; unset: the hub"
    )
    hub_offline: bool = Field(
        False, description="Never contact the hub: `hf:` references resolve from the cache only"
    )
    models_s3_prefixes: list[str] = Field(
        default_factory=list,
        description="JSON list of s3://bucket/prefix under which `s3://` model references may "
        "lie (read with s3_endpoint_url and the service's AWS credentials); empty: `s3://` "
        "references are refused",
    )
    max_remote_model_files: int = Field(
        64, ge=1, le=10_000, description="Most files an `hf:`/`s3://` model may download"
    )
    max_upload_bytes: int = Field(64 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    min_samples: int = Field(8, ge=1, description="Fewest samples an honesty/task file may have")
    max_line_bytes: int = Field(
        1024 * 1024, ge=256, description="Longest JSONL line (one sample) an upload may have"
    )
    worker_device: str = Field(
        "cpu", description="Device(s) repairs run on: cpu, cuda, cuda:N, cuda:0,cuda:1 (replicas)"
    )
    # What a worker can hold, for POST /v1/repair-jobs/estimate (hcnr_core/estimate.py).
    # Operator settings, not announced by the workers: the API and the workers read the
    # same HCNR_* environment, and `hcnr serve` runs both on this machine.
    worker_memory_gib: float | None = Field(
        None,
        gt=0,
        description="Host memory one repair may use on a worker (GiB); unset: this machine's "
        "physical memory (right for `hcnr serve`, where the worker runs here)",
    )
    worker_device_memory_gib: float | None = Field(
        None,
        gt=0,
        description="Memory of each GPU of worker_device (GiB); unset: read from the device "
        "when this process sees it, else unknown (not checked)",
    )
    worker_max_tasks_per_child: int | None = Field(
        None, ge=1, description="Replace the pool child after N jobs (1: fresh CUDA context)"
    )
    lease_seconds: int = Field(120, ge=5, description="A running job's lease on its worker")
    heartbeat_seconds: float = Field(10.0, gt=0)
    reconcile_seconds: float = Field(30.0, gt=0, description="Period of the lease reconciler")
    requeue_queued_seconds: float = Field(
        900, gt=0, description="Re-send a job queued (or validating) this long: a lost message"
    )
    max_attempts: int = Field(3, ge=1, description="Runs of one job before it is failed")
    artifact_retention_days: float | None = Field(
        None,
        gt=0,
        description="Remove what a finished job published this many days after it finished "
        "(the job and its report stay; its artifacts answer 410 artifacts_expired); "
        "unset: keep them until the job is deleted",
    )
    visibility_timeout: int = Field(24 * 3600, description="Broker redelivery delay (seconds)")
    webhook_attempts: int = Field(4, ge=1)
    webhook_backoff_seconds: float = Field(2.0, ge=0)
    webhook_allow_private: bool = Field(
        False, description="Allow webhooks to loopback/private addresses (SSRF guard when off)"
    )
    job_timeout_seconds: float = Field(
        12 * 3600,
        gt=0,
        description="Wall-clock limit of one job run (repair + evaluation); past it the job "
        "is stopped and failed with code timeout, and its lease is no longer renewed",
    )
    job_timeout_grace_seconds: float = Field(
        30,
        ge=0,
        description="After job_timeout_seconds, how long a job may take to stop by itself "
        "before the worker records it failed (timeout) anyway",
    )
    shutdown_grace_seconds: float = Field(
        5,
        ge=0,
        description="`hcnr serve` on SIGTERM: seconds in-flight requests and the worker's "
        "running job get before they are cut off (the job is re-queued by its lease)",
    )
    keep_alive_seconds: float = Field(
        65,
        ge=1,
        le=3600,
        description="`hcnr serve`: how long an idle keep-alive connection stays open. Longer "
        "than clients' pool expiry (httpx 5 s) and load balancers' idle timeout (60 s), so "
        "the server never closes a connection a client is just reusing (uvicorn's 5 s "
        "default raced httpx's 5 s: a POST failed with ReadError under load)",
    )
    validation_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="`hcnr serve`: niceness of its validation worker (and the validations' "
        "child processes). Validations tokenise every sample on the API's cores; below the "
        "API's priority, a burst of new jobs waits longer in `validating` instead of making "
        "every request wait (0: same priority)",
    )
    db_pool_size: int = Field(
        40,
        ge=1,
        le=1000,
        description="The API's pooled PostgreSQL connections (per process). At least its "
        "request threads (AnyIO's 40): with SQLAlchemy's default of 5 (+10 overflow), 200 "
        "users made the API open and close a connection for most requests",
    )
    db_max_overflow: int = Field(
        10, ge=0, le=1000, description="Connections beyond db_pool_size, closed when returned"
    )
    auth_cache_seconds: float = Field(
        5.0,
        ge=0,
        le=300,
        description="How long an API process remembers a verified API key (api/key_cache.py): "
        "a key revoked meanwhile keeps working that long at most; 0 checks the database on "
        "every request",
    )
    auto_migrate: bool = Field(True, description="Upgrade the schema when the API starts")
    progress_interval_seconds: float = Field(0.5, ge=0, description="Row update throttle")
    worker_metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Port of a worker's own Prometheus endpoint (worker/metrics.py); unset: "
        "off. `hcnr serve` gives its validation worker this port + 1",
    )
    worker_metrics_host: str = Field(
        "127.0.0.1", description="Address the worker metrics endpoint binds (0.0.0.0: container)"
    )
    task_events: bool = Field(
        True,
        description="Celery task events (task-sent/received/started/succeeded, for Flower) "
        "when the broker can carry them (Redis, AMQP); never on the embedded broker",
    )

    @field_validator("worker_device")
    @classmethod
    def _valid_worker_device(cls, value: str) -> str:
        from hcnr_core.devices import parse_devices  # torch only when a setting is checked

        return ",".join(parse_devices(value))

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> Settings:
        if self.heartbeat_seconds * 2 > self.lease_seconds:
            raise ValueError("heartbeat_seconds must be at most half of lease_seconds")
        return self

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        if self.env != "production":
            return self
        problems = []
        if self.db_url.startswith("sqlite"):
            problems.append("HCNR_DATABASE_URL must not be SQLite in production")
        if self.secret_key == DEFAULT_SECRET or len(self.secret_key) < 32:
            problems.append("HCNR_SECRET_KEY must be set to a random value of 32+ characters")
        if self.models_root is None or os.path.realpath(self.models_root) == "/":
            problems.append("HCNR_MODELS_ROOT must be set to a dedicated directory, not /")
        if self.celery_broker_url.startswith(("sqla+", "filesystem")):
            problems.append("HCNR_BROKER_URL must be a real broker (redis://) in production")
        if problems:
            raise ValueError("unsafe production settings: " + "; ".join(problems))
        return self

    @cached_property
    def limits(self) -> Limits:
        """The work limits of one repair, as the library reads them."""
        return Limits.model_construct(**{name: getattr(self, name) for name in Limits.model_fields})

    @cached_property
    def run_options(self) -> RunOptions:
        """How the worker runs every job: its device, the other run options at their
        defaults. Never a client's to choose: the API's hyper-parameters are the specs."""
        return RunOptions(device=self.worker_device)

    @cached_property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir.resolve() / 'hcnr.db'}"

    @cached_property
    def celery_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.data_dir.resolve() / 'broker.db'}"

    @cached_property
    def models_dir(self) -> Path:
        return (self.models_root or self.data_dir / "models").resolve()

    @cached_property
    def model_cache(self) -> Path:
        return (self.model_cache_dir or self.data_dir / "model-cache").resolve()

    @cached_property
    def artifacts_location(self) -> str:
        return self.artifacts_url or str((self.data_dir / "artifacts").resolve())

    @property
    def scratch_dir(self) -> Path:
        return self.data_dir.resolve() / "scratch"

    def ensure_dirs(self) -> None:
        """Create the local directories the embedded mode writes to."""
        for path in (self.data_dir, self.scratch_dir, self.models_dir):
            path.mkdir(parents=True, exist_ok=True)
