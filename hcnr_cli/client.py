"""A small typed client of the HCNR repair-job API (httpx).

client = HCNRClient("http://127.0.0.1:8000", api_key)
honesty = client.upload_file("honesty.jsonl", "honesty")
job = client.create_job(RepairJobCreate(base="path:base", ...))
job = client.wait(job.id)
client.download_checkpoint(job.id, "repaired/")
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from api.schemas import (
    ArtifactList,
    EventList,
    EventPublic,
    FilePublic,
    RepairJobCreate,
    RepairJobList,
    RepairJobPublic,
)

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


class APIError(Exception):
    """An error answer of the API: HTTP status plus the stable `code`."""

    def __init__(self, status: int, code: str, message: str, details: Any = None):
        super().__init__(f"[{code}] {message}")
        self.status, self.code, self.message, self.details = status, code, message, details


class HCNRClient:
    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ):
        base_url = base_url or os.environ.get("HCNR_API_URL", "http://127.0.0.1:8000")
        api_key = api_key or os.environ.get("HCNR_API_KEY", "")
        self.http = httpx.Client(
            base_url=base_url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout,
            transport=transport,
        )

    def __enter__(self) -> HCNRClient:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        response = self.http.request(method, url, **kwargs)
        raise_for_error(response)
        return response

    # --- files ---------------------------------------------------------------------

    def upload_file(self, path: str | Path, purpose: str) -> FilePublic:
        path = Path(path)
        with path.open("rb") as handle:
            files = {"file": (path.name, handle, "application/jsonl")}
            response = self._request("POST", "/v1/files", files=files, data={"purpose": purpose})
        return FilePublic.model_validate(response.json())

    def get_file(self, file_id: str) -> FilePublic:
        return FilePublic.model_validate(self._request("GET", f"/v1/files/{file_id}").json())

    # --- jobs ----------------------------------------------------------------------

    def create_job(
        self, job: RepairJobCreate | dict[str, Any], idempotency_key: str | None = None
    ) -> RepairJobPublic:
        body = job if isinstance(job, RepairJobCreate) else RepairJobCreate.model_validate(job)
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        response = self._request(
            "POST",
            "/v1/repair-jobs",
            content=body.model_dump_json(exclude_none=True),
            headers={**headers, "Content-Type": "application/json"},
        )
        return RepairJobPublic.model_validate(response.json())

    def get_job(self, job_id: str) -> RepairJobPublic:
        response = self._request("GET", f"/v1/repair-jobs/{job_id}")
        return RepairJobPublic.model_validate(response.json())

    def list_jobs(
        self,
        limit: int = 20,
        cursor: str | None = None,
        status: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> RepairJobList:
        params: list[tuple[str, Any]] = [("limit", limit)]
        params += [("cursor", cursor)] if cursor else []
        params += [("status", status)] if status else []
        params += [("metadata", f"{k}={v}") for k, v in (metadata or {}).items()]
        response = self._request("GET", "/v1/repair-jobs", params=params)
        return RepairJobList.model_validate(response.json())

    def cancel_job(self, job_id: str) -> RepairJobPublic:
        response = self._request("POST", f"/v1/repair-jobs/{job_id}/cancel")
        return RepairJobPublic.model_validate(response.json())

    def events(self, job_id: str, after: int = 0, limit: int = 100) -> EventList:
        params = {"after": after, "limit": limit}
        response = self._request("GET", f"/v1/repair-jobs/{job_id}/events", params=params)
        return EventList.model_validate(response.json())

    def all_events(self, job_id: str) -> list[EventPublic]:
        events, after = [], 0
        while True:
            page = self.events(job_id, after=after, limit=1000)
            events += page.data
            if not page.has_more:
                return events
            after = page.data[-1].id

    def stream_events(self, job_id: str, after: int = 0) -> Iterator[EventPublic]:
        """Live events (server-sent events) until the job is finished."""
        url = f"/v1/repair-jobs/{job_id}/events/stream"
        headers = {"Last-Event-ID": str(after)}
        with self.http.stream("GET", url, headers=headers, timeout=None) as response:
            if response.is_error:
                response.read()
                raise_for_error(response)
            for event_type, data in _sse(response.iter_lines()):
                if event_type == "end":
                    return
                yield EventPublic.model_validate_json(data)

    def wait(self, job_id: str, timeout: float = 3600, poll: float = 1.0) -> RepairJobPublic:
        deadline = time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if job.status in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job.status} after {timeout}s")
            time.sleep(poll)

    # --- artifacts -----------------------------------------------------------------

    def artifacts(self, job_id: str) -> ArtifactList:
        response = self._request("GET", f"/v1/repair-jobs/{job_id}/artifacts")
        return ArtifactList.model_validate(response.json())

    def report(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/repair-jobs/{job_id}/report").json()

    def download_artifact(
        self, job_id: str, name: str, byte_range: tuple[int, int] | None = None
    ) -> bytes:
        headers = {"Range": f"bytes={byte_range[0]}-{byte_range[1]}"} if byte_range else {}
        url = f"/v1/repair-jobs/{job_id}/artifacts/{name}"
        return self._request("GET", url, headers=headers).content

    def download_checkpoint(self, job_id: str, out: str | Path) -> Path:
        """Stream the tar archive and unpack the checkpoint files into `out`."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        url = f"/v1/repair-jobs/{job_id}/checkpoint.tar"
        with self.http.stream("GET", url, timeout=None) as response:
            if response.is_error:
                response.read()
                raise_for_error(response)
            stream = _IterStream(response.iter_bytes())
            with tarfile.open(fileobj=stream, mode="r|") as archive:
                for member in archive:
                    _extract_member(archive, member, out)
        return out


def _extract_member(archive: tarfile.TarFile, member: tarfile.TarInfo, out: Path) -> None:
    name = Path(member.name).name  # flat checkpoint: never trust directories in the archive
    if not member.isfile() or not name or name.startswith("."):
        return
    source = archive.extractfile(member)
    with (out / name).open("wb") as target:
        while block := source.read(1 << 20):
            target.write(block)


class _IterStream(io.RawIOBase):
    """A read-only file object over an iterator of byte chunks."""

    def __init__(self, chunks: Iterator[bytes]):
        self.chunks, self.buffer = chunks, b""

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        while not self.buffer:
            try:
                self.buffer = next(self.chunks)
            except StopIteration:
                return 0
        size = min(len(target), len(self.buffer))
        target[:size], self.buffer = self.buffer[:size], self.buffer[size:]
        return size


def _sse(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
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


def raise_for_error(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        error = response.json()["error"]
        raise APIError(response.status_code, error["code"], error["message"], error.get("details"))
    except (json.JSONDecodeError, KeyError, TypeError):
        raise APIError(response.status_code, "http_error", response.text[:500]) from None
