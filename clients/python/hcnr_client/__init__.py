"""hcnr_client: the Python SDK of the HCNR repair-job API (httpx + pydantic only).

from hcnr_client import HCNRClient

client = HCNRClient(base_url="http://127.0.0.1:8000", api_key="hcnr_...")
honesty = client.files.create(file="honesty.jsonl", purpose="honesty")
task = client.files.create(file="task.jsonl", purpose="task")
job = client.repair_jobs.create(
    base="path:base", finetuned="path:finetuned-adapter",
    honesty_file=honesty, task_file=task,
)
for event in client.repair_jobs.stream_events(job.id):
    print(event.type, event.message)
client.repair_jobs.download(job.id, "repaired/")  # resumable, sha256-checked
"""

from hcnr_client._base import NOT_GIVEN, NotGiven, __version__
from hcnr_client._client import AsyncHCNRClient, HCNRClient
from hcnr_client._exceptions import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ChecksumMismatchError,
    ConflictError,
    HCNRError,
    InternalServerError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RangeNotSatisfiableError,
    RateLimitError,
    UnprocessableEntityError,
    WaitTimeoutError,
)
from hcnr_client.pagination import AsyncPage, AsyncPaginator, SyncPage
from hcnr_client.types import (
    TERMINAL_STATUSES,
    Artifact,
    ArtifactList,
    FileDeleted,
    FileObject,
    HubPush,
    JobEvent,
    RepairJob,
    RepairJobDeleted,
    RepairJobError,
    RepairJobEstimate,
    WebhookSecret,
)

__all__ = [
    "NOT_GIVEN",
    "TERMINAL_STATUSES",
    "APIConnectionError",
    "APIError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "Artifact",
    "ArtifactList",
    "AsyncHCNRClient",
    "AsyncPage",
    "AsyncPaginator",
    "AuthenticationError",
    "BadRequestError",
    "ChecksumMismatchError",
    "ConflictError",
    "FileDeleted",
    "FileObject",
    "HCNRClient",
    "HCNRError",
    "HubPush",
    "InternalServerError",
    "JobEvent",
    "NotFoundError",
    "NotGiven",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RangeNotSatisfiableError",
    "RateLimitError",
    "RepairJob",
    "RepairJobDeleted",
    "RepairJobError",
    "RepairJobEstimate",
    "SyncPage",
    "UnprocessableEntityError",
    "WaitTimeoutError",
    "WebhookSecret",
    "__version__",
]
