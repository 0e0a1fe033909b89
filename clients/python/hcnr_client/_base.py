"""What the sync and async clients share: options, retry decisions, request bodies,
server-sent events and file helpers (no I/O on the network here)."""

from __future__ import annotations

import email.utils
import hashlib
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Union
from urllib.parse import quote

import httpx

from hcnr_client._exceptions import HCNRError

__version__ = "0.1.0"

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
DEFAULT_MAX_RETRIES = 2
INITIAL_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 8.0
MAX_RETRY_AFTER = 60.0
# 409s that a retry cannot resolve: the job's state decides them, not a race.
FINAL_CONFLICTS = frozenset({"job_not_cancellable", "artifacts_not_ready", "file_in_use"})


class NotGiven:
    """Marks an argument left out (None is a value: `timeout=None` means no timeout)."""

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN = NotGiven()
Timeout = Union[float, httpx.Timeout, None]  # noqa: UP007 (a runtime alias on 3.10)
FileContent = Union[bytes, IO[bytes]]  # noqa: UP007
FileInput = Union[str, os.PathLike, bytes, IO[bytes], tuple[str, FileContent]]  # noqa: UP007


class ClientOptions:
    """api_key, base_url, timeout, max_retries and extra headers of a client."""

    def __init__(
        self,
        api_key: str | None,
        base_url: str | httpx.URL | None,
        timeout: Timeout | NotGiven,
        max_retries: int,
        default_headers: dict[str, str] | None,
    ) -> None:
        api_key = api_key if api_key is not None else os.environ.get("HCNR_API_KEY")
        if not api_key:
            raise HCNRError(
                "The api_key client option must be set either by passing api_key to the "
                "client or by setting the HCNR_API_KEY environment variable"
            )
        base_url = base_url or os.environ.get("HCNR_API_URL") or DEFAULT_BASE_URL
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.api_key = api_key
        self.base_url = str(base_url).rstrip("/")
        self.timeout: Timeout = DEFAULT_TIMEOUT if isinstance(timeout, NotGiven) else timeout
        self.max_retries = max_retries
        self.default_headers = dict(default_headers or {})

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self.api_key}",
            "Accept": "application/json",
            "User-Agent": f"hcnr-client/{__version__}",
            **self.default_headers,
            **(extra or {}),
        }

    def timeout_of(self, timeout: Timeout | NotGiven) -> Timeout:
        return self.timeout if isinstance(timeout, NotGiven) else timeout


# --- retries -------------------------------------------------------------------------------


def error_code_of(response: httpx.Response) -> str | None:
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def should_retry(response: httpx.Response) -> bool:
    """408, 409 (unless final, see FINAL_CONFLICTS), 429 and 5xx; `x-should-retry: true/false`
    from the server overrides. The body must have been read."""
    override = response.headers.get("x-should-retry", "").lower()
    if override in ("true", "false"):
        return override == "true"
    status = response.status_code
    if status == 409:
        return error_code_of(response) not in FINAL_CONFLICTS
    return status in (408, 429) or status >= 500


def retry_after(headers: httpx.Headers | None) -> float | None:
    """Seconds the server asks for: `retry-after-ms`, `Retry-After` as seconds or an HTTP
    date."""
    if headers is None:
        return None
    try:
        if "retry-after-ms" in headers:
            return float(headers["retry-after-ms"]) / 1000
    except ValueError:
        pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return when.timestamp() - time.time()


def retry_delay(retries_taken: int, headers: httpx.Headers | None = None) -> float:
    """Retry-After when the server gives one within a minute, else exponential backoff
    (0.5 s, 1 s, 2 s, ... capped at 8 s) with up to 25% jitter."""
    asked = retry_after(headers)
    if asked is not None and 0 <= asked <= MAX_RETRY_AFTER:
        return asked
    delay = min(INITIAL_RETRY_DELAY * 2.0**retries_taken, MAX_RETRY_DELAY)
    return delay * (1 - 0.25 * random.random())


# --- request bodies ------------------------------------------------------------------------


def object_id(value: Any) -> str:
    """An id, or the id of a FileObject / RepairJob passed instead."""
    return value if isinstance(value, str) else value.id


def job_create_body(
    *,
    base: str,
    finetuned: str,
    honesty_file: Any,
    task_file: Any,
    method: str | None,
    eval_file: Any,
    validation_file: Any,
    hyperparameters: dict[str, Any] | None,
    metadata: dict[str, str] | None,
    webhook_url: str | None,
    extra_body: dict[str, Any] | None,
    integrations: list[dict[str, Any]] | None = None,
    push_to_hub: str | dict[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "base": base,
        "finetuned": finetuned,
        "honesty_file": object_id(honesty_file),
        "task_file": object_id(task_file),
    }
    optional = {
        "method": method,
        "eval_file": object_id(eval_file) if eval_file is not None else None,
        "validation_file": object_id(validation_file) if validation_file is not None else None,
        "hyperparameters": hyperparameters,
        "metadata": metadata,
        "webhook_url": webhook_url,
        # [{"type": "wandb" | "mlflow", "project": ..., "uri": ...}]: no credentials
        "integrations": integrations,
        # "org/name", or {"repo_id", "private", "revision", "commit_message"}
        "push_to_hub": {"repo_id": push_to_hub} if isinstance(push_to_hub, str) else push_to_hub,
    }
    body.update({key: value for key, value in optional.items() if value is not None})
    return {**body, **(extra_body or {})}


def job_list_params(
    after: str | None, limit: int | None, status: str | None, metadata: dict[str, str] | None
) -> list[tuple[str, Any]]:
    """Query of GET /v1/repair-jobs: `after` is the `next_cursor` of the previous page (the
    API's `cursor`); `metadata` filters become repeated `metadata=key=value`."""
    params: list[tuple[str, Any]] = []
    params += [("limit", limit)] if limit is not None else []
    params += [("cursor", after)] if after else []
    params += [("status", status)] if status else []
    params += [("metadata", f"{key}={value}") for key, value in (metadata or {}).items()]
    return params


def event_list_params(after: int, limit: int | None) -> dict[str, Any]:
    return {"after": after, **({"limit": limit} if limit is not None else {})}


def upload_files(file: FileInput) -> Callable[[], dict[str, Any]]:
    """The multipart `file` field, rebuilt for every attempt (a retry re-sends it)."""
    if isinstance(file, (str, os.PathLike)):
        path = Path(file)
        return lambda: {"file": (path.name, path.read_bytes(), "application/jsonl")}
    if isinstance(file, tuple):
        name, content = file
    else:
        name, content = Path(getattr(file, "name", "") or "upload.jsonl").name, file
    data = content if isinstance(content, bytes) else content.read()
    return lambda: {"file": (name, data, "application/jsonl")}


# --- paths, events, files ------------------------------------------------------------------


def job_path(job_id: str, *rest: str) -> str:
    return "/".join(["/v1/repair-jobs", quote(job_id, safe=""), *rest])


def artifact_path(job_id: str, name: str) -> str:
    return job_path(job_id, "artifacts", quote(name, safe=""))


def safe_name(name: str) -> str:
    """An artifact name as a file name in the download directory (never a path)."""
    base = Path(name).name
    if not base or base.startswith(".") or base != name:
        raise HCNRError(f"refusing artifact name {name!r}")
    return base


def sse(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(event type, data) of a text/event-stream."""
    event_type, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield event_type, "\n".join(data)
            event_type, data = "message", []
        elif line.startswith("event:"):
            event_type = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def stream_timeout(timeout: Timeout) -> httpx.Timeout:
    """The client's timeouts with no read timeout (a live stream may be quiet for long)."""
    base = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
    return httpx.Timeout(connect=base.connect, read=None, write=base.write, pool=base.pool)


def sha256_prefix(path: Path) -> tuple[Any, int]:
    """The sha256 state over a partial download and its size."""
    hasher, size = hashlib.sha256(), 0
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            hasher.update(block)
            size += len(block)
    return hasher, size


def range_start(response: httpx.Response) -> int | None:
    """The first byte a 206 answer carries (Content-Range: bytes a-b/n)."""
    value = response.headers.get("content-range", "")
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None
