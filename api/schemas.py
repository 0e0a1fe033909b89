"""Request and response bodies: the contract published in the OpenAPI document.

Create* are what clients send, *Public what they get back; the tables live in store.models.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    create_model,
    model_validator,
)

from hcnr_core.config import (
    DEFAULT_METHOD,
    AutoConfig,
    DpoConfig,
    FileConfig,
    RaitConfig,
    RepairConfig,
)
from hcnr_core.tracking import Integration
from store.hub_push import MAX_COMMIT_MESSAGE, check_repo_id, check_revision
from store.job_state import STATES
from store.secrets import MAX_VALUE_LENGTH as MAX_SECRET_LENGTH
from store.secrets import SECRET_NAMES

FilePurpose = Literal["honesty", "task", "eval"]
JobStatus = Literal[STATES]  # type: ignore[valid-type]  # store/job_state.py lists them


def _storable(text: str) -> str:
    """Text a database can hold and JSON can carry: no NUL (PostgreSQL refuses it in text
    columns), no lone surrogates (not encodable as UTF-8)."""
    if "\x00" in text:
        raise ValueError("must not contain NUL characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no lone surrogates)") from None
    return text


Text = Annotated[str, AfterValidator(_storable)]
# Widths of the columns these land in (store.models).
Reference = Annotated[Text, Field(max_length=1000)]
FileId = Annotated[Text, Field(max_length=40)]
LabelKey = Annotated[Text, Field(min_length=1, max_length=64)]
LabelValue = Annotated[Text, Field(max_length=512)]


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. invalid_data")
    message: str
    details: Any | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class FilePublic(BaseModel):
    object: Literal["file"] = "file"
    id: str
    purpose: FilePurpose
    filename: str
    bytes: int
    sha256: str
    samples: int
    created_at: datetime


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FilePublic]
    has_more: bool
    # The last file of this page: pass it as `after` for the next one (OpenAI's paging).
    last_id: str | None


class RepairJobDeleted(BaseModel):
    object: Literal["repair_job"] = "repair_job"
    id: str
    deleted: bool


class FileDeleted(BaseModel):
    object: Literal["file"] = "file"
    id: str
    deleted: bool


class WebhookSecret(BaseModel):
    object: Literal["webhook_secret"] = "webhook_secret"
    secret: str = Field(
        description="Signs this tenant's webhooks (Standard Webhooks: `webhook-signature: "
        'v1,<base64 HMAC-SHA256 of "<webhook-id>.<webhook-timestamp>.<body>">`, keyed by '
        "the base64-decoded part after `whsec_`)"
    )


SecretName = Literal[tuple(SECRET_NAMES)]  # type: ignore[valid-type]


class SecretSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    value: Annotated[Text, Field(min_length=1, max_length=MAX_SECRET_LENGTH)] = Field(
        description="Stored encrypted; never returned by the API"
    )

    @model_validator(mode="after")
    def _printable(self) -> SecretSet:
        if any(ord(c) < 32 or ord(c) == 127 for c in self.value):
            raise ValueError("value must not contain control characters")
        return self


class SecretPublic(BaseModel):
    """A secret's name and dates; its value is never returned."""

    object: Literal["secret"] = "secret"
    name: str = Field(
        description="; ".join(f"{name}: {what}" for name, what in SECRET_NAMES.items())
    )
    created_at: datetime
    updated_at: datetime


class SecretList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SecretPublic]


class SecretDeleted(BaseModel):
    object: Literal["secret"] = "secret"
    name: str
    deleted: bool


def _client_hyperparameters(config: type[FileConfig], doc: str) -> type[BaseModel]:
    """The library spec's fields, which a client may set (one spec for library, CLI and
    API; the run options are the worker's, `hcnr_core.config.RunOptions`), with the
    free-text fields bounded and storable."""
    fields: dict[str, Any] = {
        name: (info.annotation, info) for name, info in config.model_fields.items()
    }
    bounded = {
        "lora_targets": (
            list[Annotated[Text, Field(max_length=200)]] | Annotated[Text, Field(max_length=1000)],
            config.model_fields.get("lora_targets"),
        ),
        "target_modules": (
            Annotated[Text, Field(max_length=1000)],
            config.model_fields.get("target_modules"),
        ),
        "refusal": (
            Annotated[Text, Field(max_length=1000)] | None,
            config.model_fields.get("refusal"),
        ),
    }
    for name, (annotation, info) in bounded.items():
        if name in fields:
            fields[name] = (annotation, info)
    return create_model(
        config.__name__.replace("Config", "Hyperparameters"),
        __config__=ConfigDict(extra="forbid"),
        __doc__=doc,
        **fields,
    )


Hyperparameters = _client_hyperparameters(
    RepairConfig, "RepairConfig fields a client may set (method hcnr)"
)
RaitHyperparameters = _client_hyperparameters(
    RaitConfig, "RaitConfig fields a client may set (method rait)"
)
DpoHyperparameters = _client_hyperparameters(
    DpoConfig, "DpoConfig fields a client may set (method dpo)"
)
AutoHyperparameters = _client_hyperparameters(
    AutoConfig,
    "AutoConfig fields a client may set (method auto, the default); each candidate's "
    "hyperparameters "
    "are its method's and are checked before the job is queued",
)
MethodName = Literal["hcnr", "rait", "dpo", "auto"]
HYPERPARAMETERS: dict[str, type[BaseModel]] = {
    "hcnr": Hyperparameters,
    "rait": RaitHyperparameters,
    "dpo": DpoHyperparameters,
    "auto": AutoHyperparameters,
}


class JobError(BaseModel):
    code: str
    message: str
    # A validation refusal's details, as a synchronous 422 carries them: line-numbered
    # `problems` for data, `limit`/`value`/`allowed` for a limit; null otherwise.
    details: Any = None


class HubPushCreate(BaseModel):
    """Where a succeeded job's checkpoint is pushed (worker/hub_push.py), with the
    tenant's `hf_token` secret (it needs write access to the repository's namespace)."""

    model_config = ConfigDict(extra="forbid")

    repo_id: Annotated[Text, Field(max_length=192), AfterValidator(check_repo_id)] = Field(
        description="'org/name' (or 'user/name'); created when missing", examples=["acme/llm-hcnr"]
    )
    private: bool = Field(
        True, description="Visibility of a repository the push creates (an existing one keeps its)"
    )
    revision: Annotated[Text, Field(max_length=255), AfterValidator(check_revision)] | None = Field(
        None, description="Branch to commit to, created from main when missing; null: main"
    )
    commit_message: Annotated[Text, Field(max_length=MAX_COMMIT_MESSAGE)] | None = Field(
        None, description="null: 'Upload HCNR-repaired checkpoint (<job id>)'"
    )


HubPushStatus = Literal["pending", "pushing", "retrying", "succeeded", "failed", "skipped"]


class HubPushPublic(HubPushCreate):
    status: HubPushStatus = Field(
        description="pending (the job has not finished, or the push is queued), pushing, "
        "retrying (429/5xx/network, with backoff), succeeded, failed (see error; the job "
        "stays succeeded and its artifacts downloadable), skipped (the job did not succeed)"
    )
    commit_sha: str | None = None
    commit_url: str | None = None
    url: str | None = Field(None, description="The repository's address on the hub")
    error: JobError | None = None


class RepairJobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: MethodName = Field(
        DEFAULT_METHOD,
        description="auto (the default: try HCNR candidates, publish the most honest that "
        "beats the fine-tune within max_domain_drop on a validation split), hcnr (restore "
        "honesty-critical columns with the given hyper-parameters; the paper's by default), "
        "rait (SFT of a LoRA on the honesty set) or dpo (DPO of a LoRA on IDK pairs); "
        "hyperparameters follow the method",
    )
    base: Reference = Field(
        description="'path:<dir under the models root>', 'hf:org/name[@revision]' (downloaded "
        "by the validation, safetensors only, with the tenant's hf_token if set) or "
        "'s3://bucket/prefix' (under the operator's HCNR_MODELS_S3_PREFIXES)"
    )
    finetuned: Reference = Field(description="Full fine-tuned model or PEFT LoRA adapter reference")
    honesty_file: FileId = Field(description="Id of an uploaded file with purpose honesty")
    task_file: FileId = Field(description="Id of an uploaded file with purpose task")
    eval_file: FileId | None = Field(None, description="Optional eval set (purpose eval)")
    validation_file: FileId | None = Field(
        None,
        description="method auto: the validation set (purpose eval); without it auto "
        "carves one from the honesty and task files",
    )
    hyperparameters: (  # type: ignore[valid-type]
        Hyperparameters | RaitHyperparameters | DpoHyperparameters | AutoHyperparameters
    ) = Field(default_factory=Hyperparameters, description="The method's hyper-parameters")
    metadata: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=16)
    webhook_url: AnyHttpUrl | None = Field(
        None, max_length=2000, description="POSTed on terminal states"
    )
    integrations: list[Integration] = Field(
        default_factory=list,
        max_length=2,
        description="Experiment trackers the run is logged to (one per type): parameters, "
        "stage timings, metrics, the selected-matrix table and plots. No credentials here: "
        "the worker uses the tenant's wandb_api_key / mlflow_token secrets (PUT "
        "/v1/secrets/{name}), else the operator's. An MLflow uri must be http(s) on a "
        "public address; W&B without a key runs offline and publishes wandb-offline.tar",
    )
    push_to_hub: HubPushCreate | None = Field(
        None,
        description="Push the published checkpoint (weights, config, tokenizer, README "
        "card, report) to this Hub repository once the job succeeds, with the tenant's "
        "hf_token secret (required at creation: 422 hub_token_missing). The outcome is "
        "the job's push_to_hub.status and its hub_push_* events",
    )

    @model_validator(mode="before")
    @classmethod
    def _hyperparameters_of_the_method(cls, data: Any) -> Any:
        """Validate `hyperparameters` as the method's own kind (an unknown method fails
        on `method` itself)."""
        if isinstance(data, dict):
            method = data.get("method", DEFAULT_METHOD)
            kind = HYPERPARAMETERS.get(method)
            values = data.get("hyperparameters")
            if "method" not in data and isinstance(values, dict):
                # Clients written when hcnr was the default send its knobs without a method:
                # say what changed instead of "extra inputs are not permitted".
                theirs = sorted(set(values) - set(AutoHyperparameters.model_fields))
                if theirs and set(theirs) <= set(Hyperparameters.model_fields):
                    raise ValueError(
                        f"hyperparameters {', '.join(theirs)} are method hcnr's: set "
                        f'"method": "hcnr" (the default method is {DEFAULT_METHOD})'
                    )
            if kind is not None and (values is None or isinstance(values, dict)):
                data = {**data, "hyperparameters": kind.model_validate(values or {})}
        return data


class RepairJobPublic(BaseModel):
    object: Literal["repair_job"] = "repair_job"
    id: str
    method: str
    status: JobStatus
    stage: str | None
    progress: float = Field(ge=0.0, le=1.0)
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
    integrations: list[Integration] = Field(default_factory=list)
    push_to_hub: HubPushPublic | None = None
    webhook_status: str | None = Field(
        None,
        description="retrying, delivered, failed, rejected_<code> or refused_address "
        "(the host resolved to a non-public address at send time)",
    )
    stage_seconds: dict[str, float]
    metrics: dict[str, Any] | None
    error: JobError | None
    attempts: int
    created_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    artifacts_expired_at: datetime | None = None
    base_resolved: str | None = Field(
        None,
        description="The exact base model the job runs, pinned by its validation: "
        "'hf:org/name@<commit sha>' or 's3://bucket/prefix#<listing digest>'; null for "
        "'path:' references and before validation",
    )
    finetuned_resolved: str | None = Field(
        None, description="The exact fine-tuned model the job runs (as base_resolved)"
    )


class RepairJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[RepairJobPublic]
    has_more: bool
    next_cursor: str | None


class EventPublic(BaseModel):
    object: Literal["event"] = "event"
    id: int
    created_at: datetime
    type: str
    stage: str | None
    progress: float | None
    message: str
    data: dict[str, Any] | None


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventPublic]
    has_more: bool
    next_cursor: int | None


class ArtifactPublic(BaseModel):
    object: Literal["artifact"] = "artifact"
    name: str
    bytes: int
    sha256: str
    url: str


class ArtifactList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ArtifactPublic]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)


# --- POST /v1/repair-jobs/estimate (hcnr_core/estimate.py) -------------------------------------


class TokenCount(BaseModel):
    samples: int
    tokens: int = Field(description="The count the estimate uses")
    tokens_upper: int = Field(
        description="A bound the real count cannot exceed (samples x max_seq_len when the "
        "tokenizer was not run)"
    )
    longest: int = Field(description="The longest sample's tokens (max_seq_len when not counted)")
    basis: Literal["tokenizer", "file_bytes"] = Field(
        description="tokenizer: counted as the repair encodes; file_bytes: ~4 bytes per token"
    )


class MemoryPeak(BaseModel):
    host_gib: float = Field(description="Peak host (CPU) memory")
    device_gib: float | None = Field(description="Peak memory of each GPU; null on CPUs")


class WorkerCapacity(BaseModel):
    name: str
    device: str
    host_memory_gib: float | None = Field(description="null: unknown, not checked")
    device_memory_gib: float | None = Field(description="Of each GPU; null: unknown or CPU")
    layerwise: bool = Field(description="Whether it runs repairs layer by layer")
    source: str = Field(description="settings (HCNR_WORKER_*) or detected")


class EstimatePublic(BaseModel):
    object: Literal["repair_job.estimate"] = "repair_job.estimate"
    method: str
    parameters: int = Field(description="The base's parameters (the repaired model)")
    adapter_parameters: int = Field(description="The LoRA adapter's; 0 for a full fine-tune")
    total_parameters: int
    finetuned_kind: Literal["adapter", "full"]
    devices: list[str]
    dtype: str
    tokens: dict[str, TokenCount]
    memory_whole: MemoryPeak
    memory_layerwise: MemoryPeak | None = Field(
        description="null for methods without a layer-by-layer mode (rait, dpo)"
    )
    layerwise_needed: bool | None = Field(
        description="The whole model fits no worker and layer by layer fits one; null when "
        "no worker's memory is known"
    )
    wall_seconds: float
    wall_seconds_low: float
    wall_seconds_high: float
    wall_basis: str = Field(description="What the time is measured on and how it extrapolates")
    workers: list[WorkerCapacity]
    runnable: bool
    notes: list[str]
