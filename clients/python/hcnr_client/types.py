"""Response objects of the HCNR API, mirrored from its OpenAPI document (api/openapi.json):
FilePublic -> FileObject, RepairJobPublic -> RepairJob, EventPublic -> JobEvent,
ArtifactPublic -> Artifact. Unknown fields are kept (a newer server stays readable)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

FilePurpose = Literal["honesty", "task", "eval"]
JobStatus = Literal[
    "validating", "queued", "running", "cancelling", "succeeded", "failed", "cancelled"
]
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


class BaseObject(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class RepairJobDeleted(BaseObject):
    """What `DELETE /v1/repair-jobs/{job_id}` returns."""

    object: Literal["repair_job"] = "repair_job"
    id: str
    deleted: bool


class FileDeleted(BaseObject):
    """What `DELETE /v1/files/{file_id}` returns."""

    object: Literal["file"] = "file"
    id: str
    deleted: bool


class FileObject(BaseObject):
    """An uploaded JSONL file (`POST /v1/files`, `GET /v1/files/{file_id}`)."""

    object: Literal["file"] = "file"
    id: str
    purpose: FilePurpose
    filename: str
    bytes: int
    sha256: str
    samples: int
    created_at: datetime


class WebhookSecret(BaseObject):
    """The tenant's webhook signing secret (`GET /v1/webhook-secret`, `POST .../rotate`)."""

    object: Literal["webhook_secret"] = "webhook_secret"
    secret: str


class Secret(BaseObject):
    """A tenant secret's name and dates (`/v1/secrets`); its value is never returned."""

    object: Literal["secret"] = "secret"
    name: str
    created_at: datetime
    updated_at: datetime


class SecretList(BaseObject):
    object: Literal["list"] = "list"
    data: list[Secret]


class SecretDeleted(BaseObject):
    object: Literal["secret"] = "secret"
    name: str
    deleted: bool


class RepairJobError(BaseObject):
    code: str
    message: str
    # A validation refusal's details: line-numbered `problems` for data,
    # `limit`/`value`/`allowed` for a limit; None otherwise.
    details: Any = None


class HubPush(BaseObject):
    """A job's push of its checkpoint to a Hugging Face Hub repository: the target and
    its outcome. `status`: pending, pushing, retrying, succeeded, failed (see `error`;
    the job stays succeeded) or skipped (the job did not succeed)."""

    repo_id: str
    private: bool = True
    revision: str | None = None
    commit_message: str | None = None
    status: str
    commit_sha: str | None = None
    commit_url: str | None = None
    url: str | None = None
    error: RepairJobError | None = None


class RepairJob(BaseObject):
    """A repair job (`/v1/repair-jobs`)."""

    object: Literal["repair_job"] = "repair_job"
    id: str
    method: str
    status: JobStatus
    stage: str | None
    progress: float
    eta_seconds: float | None
    base: str
    finetuned: str
    honesty_file: str
    task_file: str
    eval_file: str | None
    validation_file: str | None = None
    hyperparameters: dict[str, Any]
    metadata: dict[str, str]
    webhook_url: str | None
    webhook_status: str | None = None
    # experiment trackers the run is logged to: {"type": "wandb" | "mlflow", ...}
    integrations: list[dict[str, Any]] = []
    push_to_hub: HubPush | None = None
    stage_seconds: dict[str, float]
    metrics: dict[str, Any] | None
    error: RepairJobError | None
    attempts: int
    created_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    artifacts_expired_at: datetime | None = None
    # the exact models the job runs, pinned by its validation: hf:org/name@<commit>,
    # s3://bucket/prefix#<digest>; None for path: references and before validation
    base_resolved: str | None = None
    finetuned_resolved: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES


class JobEvent(BaseObject):
    """One event of a job (`/v1/repair-jobs/{job_id}/events`)."""

    object: Literal["event"] = "event"
    id: int
    created_at: datetime
    type: str
    stage: str | None
    progress: float | None
    message: str
    data: dict[str, Any] | None


class Artifact(BaseObject):
    """One file of a succeeded job's repaired checkpoint."""

    object: Literal["artifact"] = "artifact"
    name: str
    bytes: int
    sha256: str
    url: str


class ArtifactList(BaseObject):
    object: Literal["list"] = "list"
    data: list[Artifact]


class TokenCount(BaseObject):
    samples: int
    tokens: int
    tokens_upper: int
    longest: int
    basis: str  # "tokenizer" (counted) or "file_bytes" (~4 bytes per token)


class MemoryPeak(BaseObject):
    host_gib: float
    device_gib: float | None = None  # of each GPU; None on CPUs


class WorkerCapacity(BaseObject):
    name: str
    device: str
    host_memory_gib: float | None = None
    device_memory_gib: float | None = None
    layerwise: bool
    source: str


class RepairJobEstimate(BaseObject):
    """What `POST /v1/repair-jobs/estimate` returns (EstimatePublic): parameters, tokens,
    peak memory per device, wall time, and whether a worker can run the job."""

    object: Literal["repair_job.estimate"] = "repair_job.estimate"
    method: str
    parameters: int
    adapter_parameters: int
    total_parameters: int
    finetuned_kind: str
    devices: list[str]
    dtype: str
    tokens: dict[str, TokenCount]
    memory_whole: MemoryPeak
    memory_layerwise: MemoryPeak | None = None
    layerwise_needed: bool | None = None
    wall_seconds: float
    wall_seconds_low: float
    wall_seconds_high: float
    wall_basis: str
    workers: list[WorkerCapacity]
    runnable: bool
    notes: list[str]


__all__ = [
    "TERMINAL_STATUSES",
    "Artifact",
    "ArtifactList",
    "BaseObject",
    "FileObject",
    "FilePurpose",
    "JobEvent",
    "JobStatus",
    "RepairJob",
    "RepairJobError",
    "RepairJobEstimate",
    "Secret",
    "SecretDeleted",
    "SecretList",
]
