"""client.repair_jobs: create, estimate, retrieve, list, cancel, list_events, stream_events,
wait, list_artifacts, retrieve_report, artifact_content and download (resumable,
sha256-checked)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from hcnr_client._base import (
    NOT_GIVEN,
    NotGiven,
    Timeout,
    artifact_path,
    event_list_params,
    job_create_body,
    job_list_params,
    job_path,
    range_start,
    retry_delay,
    safe_name,
    sha256_prefix,
    sse,
    stream_timeout,
)
from hcnr_client._exceptions import APIConnectionError, ChecksumMismatchError, WaitTimeoutError
from hcnr_client.pagination import AsyncPage, AsyncPaginator, SyncPage
from hcnr_client.types import (
    TERMINAL_STATUSES,
    Artifact,
    ArtifactList,
    JobEvent,
    JobStatus,
    RepairJob,
    RepairJobDeleted,
    RepairJobEstimate,
)

if TYPE_CHECKING:
    from hcnr_client._client import AsyncHCNRClient, HCNRClient


def _sleep(seconds: float) -> None:
    from hcnr_client import _client

    _client._sleep(seconds)


async def _asleep(seconds: float) -> None:
    from hcnr_client import _client

    await _client._asleep(seconds)


async def _asse(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, str]]:
    """sse() over an async stream of lines."""
    event_type, data = "message", []
    async for line in lines:
        if not line:
            if data:
                yield event_type, "\n".join(data)
            event_type, data = "message", []
        elif line.startswith("event:"):
            event_type = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


class _Download:
    """The state of one artifact's download into `<name>.part`."""

    def __init__(self, artifact: Artifact, target: Path) -> None:
        self.artifact, self.target = artifact, target
        self.part = target.with_name(target.name + ".part")

    def done(self) -> bool:
        """The target already holds the listed bytes (an earlier download finished)."""
        if not self.target.is_file() or self.target.stat().st_size != self.artifact.bytes:
            return False
        return sha256_prefix(self.target)[0].hexdigest() == self.artifact.sha256

    def start(self, resume: bool) -> tuple[Any, int]:
        """sha256 state and size of what is kept; a .part longer than the file is dropped."""
        if not resume or (self.part.exists() and self.part.stat().st_size > self.artifact.bytes):
            self.part.unlink(missing_ok=True)
        self.part.touch()
        return sha256_prefix(self.part)

    def range_header(self, offset: int) -> dict[str, str]:
        return {"Range": f"bytes={offset}-"} if offset else {}

    def accept(self, response: httpx.Response, offset: int) -> bool:
        """Whether the answer continues at `offset` (206 from there); a 200 restarts."""
        return response.status_code == 206 and range_start(response) == offset

    def finish(self, digest: str) -> None:
        if digest != self.artifact.sha256:
            self.part.unlink(missing_ok=True)
            raise ChecksumMismatchError(self.artifact.name, self.artifact.sha256, digest)
        self.part.replace(self.target)


class RepairJobs:
    def __init__(self, client: HCNRClient) -> None:
        self._client = client

    def create(
        self,
        *,
        base: str,
        finetuned: str,
        honesty_file: Any,
        task_file: Any,
        method: str | None = None,
        eval_file: Any = None,
        validation_file: Any = None,
        hyperparameters: dict[str, Any] | None = None,
        metadata: dict[str, str] | None = None,
        webhook_url: str | None = None,
        integrations: list[dict[str, Any]] | None = None,
        push_to_hub: str | dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        extra_body: dict[str, Any] | None = None,
        timeout: Timeout | NotGiven = NOT_GIVEN,
    ) -> RepairJob:
        """Create a repair job. File arguments take ids or FileObjects. Retries re-send the
        same Idempotency-Key (a fresh one per call unless given), so they never create a
        second job. `push_to_hub` ("org/name" or a dict with repo_id, private, revision,
        commit_message) pushes the checkpoint once the job succeeds, with the tenant's
        hf_token secret (`client.secrets.set("hf_token", ...)` first)."""
        body = job_create_body(
            base=base,
            finetuned=finetuned,
            honesty_file=honesty_file,
            task_file=task_file,
            method=method,
            eval_file=eval_file,
            validation_file=validation_file,
            hyperparameters=hyperparameters,
            metadata=metadata,
            webhook_url=webhook_url,
            extra_body=extra_body,
            integrations=integrations,
            push_to_hub=push_to_hub,
        )
        headers = {"Idempotency-Key": idempotency_key or f"hcnr-client-{uuid.uuid4()}"}
        return self._client._post(
            "/v1/repair-jobs", RepairJob, json=body, headers=headers, timeout=timeout
        )

    def estimate(
        self,
        *,
        base: str,
        finetuned: str,
        honesty_file: Any,
        task_file: Any,
        method: str | None = None,
        eval_file: Any = None,
        validation_file: Any = None,
        hyperparameters: dict[str, Any] | None = None,
        extra_body: dict[str, Any] | None = None,
        timeout: Timeout | NotGiven = NOT_GIVEN,
    ) -> RepairJobEstimate:
        """What `create` with these arguments would cost, without creating a job:
        parameters, tokens, peak memory, wall time. Raises UnprocessableEntityError with
        code `no_worker_fits` (its `details`: the estimate as a dict) when no
        worker can run it."""
        body = job_create_body(
            base=base,
            finetuned=finetuned,
            honesty_file=honesty_file,
            task_file=task_file,
            method=method,
            eval_file=eval_file,
            validation_file=validation_file,
            hyperparameters=hyperparameters,
            metadata=None,
            webhook_url=None,
            extra_body=extra_body,
        )
        return self._client._post(
            "/v1/repair-jobs/estimate", RepairJobEstimate, json=body, timeout=timeout
        )

    def retrieve(self, job_id: str, *, timeout: Timeout | NotGiven = NOT_GIVEN) -> RepairJob:
        return self._client._get(job_path(job_id), RepairJob, timeout=timeout)

    def list(
        self,
        *,
        after: str | None = None,
        limit: int | None = None,
        status: JobStatus | None = None,
        metadata: dict[str, str] | None = None,
        timeout: Timeout | NotGiven = NOT_GIVEN,
    ) -> SyncPage[RepairJob]:
        """Jobs, newest first. Iterating the page walks every later page; `after` is the
        `next_cursor` of a previous page."""
        response = self._client.request(
            "GET",
            "/v1/repair-jobs",
            params=job_list_params(after, limit, status, metadata),
            timeout=timeout,
        )
        body = response.json()
        return SyncPage(
            data=[RepairJob.model_validate(item) for item in body["data"]],
            has_more=body["has_more"],
            next_cursor=body.get("next_cursor"),
            fetch=lambda cursor: self.list(
                after=cursor, limit=limit, status=status, metadata=metadata, timeout=timeout
            ),
        )

    def delete(self, job_id: str, *, timeout: Timeout | NotGiven = NOT_GIVEN) -> RepairJobDeleted:
        """Delete the job and what it published; one not yet running is cancelled first. A
        running one answers 409 job_not_finished until it has stopped (retried with
        backoff: ConflictError if it outlasts the retries)."""
        response = self._client.request("DELETE", job_path(job_id), timeout=timeout)
        return RepairJobDeleted.model_validate(response.json())

    def cancel(self, job_id: str, *, timeout: Timeout | NotGiven = NOT_GIVEN) -> RepairJob:
        """Queued jobs are cancelled at once, running ones go to `cancelling` first;
        ConflictError (job_not_cancellable) when the job already finished."""
        return self._client._post(job_path(job_id, "cancel"), RepairJob, timeout=timeout)

    def list_events(
        self,
        job_id: str,
        *,
        after: int = 0,
        limit: int | None = None,
        timeout: Timeout | NotGiven = NOT_GIVEN,
    ) -> SyncPage[JobEvent]:
        """Events oldest first with an id above `after`; iterating walks every page."""
        response = self._client.request(
            "GET",
            job_path(job_id, "events"),
            params=event_list_params(after, limit),
            timeout=timeout,
        )
        body = response.json()
        return SyncPage(
            data=[JobEvent.model_validate(item) for item in body["data"]],
            has_more=body["has_more"],
            next_cursor=body.get("next_cursor"),
            fetch=lambda cursor: self.list_events(
                job_id, after=cursor, limit=limit, timeout=timeout
            ),
        )

    def stream_events(self, job_id: str, *, after: int = 0) -> Iterator[JobEvent]:
        """Live events (server-sent events) until the job finishes; a dropped connection is
        resumed from the last event received (Last-Event-ID), up to max_retries times."""
        last, failures = after, 0
        while True:
            response = self._client.request(
                "GET",
                job_path(job_id, "events", "stream"),
                headers={"Last-Event-ID": str(last), "Accept": "text/event-stream"},
                timeout=stream_timeout(self._client.timeout),
                stream=True,
            )
            try:
                for kind, data in sse(response.iter_lines()):
                    if kind == "end":
                        return
                    event = JobEvent.model_validate_json(data)
                    last, failures = event.id, 0
                    yield event
                problem: Exception = httpx.RemoteProtocolError("stream ended before `end`")
            except httpx.TransportError as exc:
                problem = exc
            finally:
                response.close()
            if failures >= self._client.max_retries:
                raise APIConnectionError(response.request, str(problem)) from problem
            _sleep(retry_delay(failures))
            failures += 1

    def wait(
        self, job_id: str, *, timeout: float = 3600.0, poll_interval: float = 1.0
    ) -> RepairJob:
        """Poll until the job is succeeded, failed or cancelled; WaitTimeoutError after
        `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.retrieve(job_id)
            if job.status in TERMINAL_STATUSES:
                return job
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeoutError(job_id, job.status, timeout)
            _sleep(min(poll_interval, left))

    def list_artifacts(
        self, job_id: str, *, timeout: Timeout | NotGiven = NOT_GIVEN
    ) -> ArtifactList:
        """Every file of a succeeded job's checkpoint with its size and sha256 (ConflictError
        artifacts_not_ready before)."""
        return self._client._get(job_path(job_id, "artifacts"), ArtifactList, timeout=timeout)

    def retrieve_report(
        self, job_id: str, *, timeout: Timeout | NotGiven = NOT_GIVEN
    ) -> dict[str, Any]:
        return self._client.request("GET", job_path(job_id, "report"), timeout=timeout).json()

    def artifact_content(
        self,
        job_id: str,
        name: str,
        *,
        byte_range: tuple[int, int | None] | None = None,
        timeout: Timeout | NotGiven = NOT_GIVEN,
    ) -> bytes:
        """One artifact's bytes, or the inclusive `byte_range` (start, end or None)."""
        headers = {}
        if byte_range is not None:
            start, end = byte_range
            headers["Range"] = f"bytes={start}-{'' if end is None else end}"
        return self._client.request(
            "GET", artifact_path(job_id, name), headers=headers, timeout=timeout
        ).content

    def download(
        self,
        job_id: str,
        out: str | Path,
        *,
        resume: bool = True,
        timeout: Timeout | NotGiven = NOT_GIVEN,
    ) -> Path:
        """Download every artifact into the directory `out`, one file at a time with HTTP
        Range: each file grows in `<name>.part` and a second call (or a retry after a broken
        connection) continues where it stopped; every file's sha256 is checked against the
        artifact listing (ChecksumMismatchError) before it is renamed into place. Files
        already complete are not fetched again."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for artifact in self.list_artifacts(job_id, timeout=timeout).data:
            item = _Download(artifact, out / safe_name(artifact.name))
            if item.done():
                continue
            digest = self._fetch(job_id, item, resume, timeout)
            if digest != artifact.sha256 and resume:
                digest = self._fetch(job_id, item, False, timeout)  # a stale .part: refetch
            item.finish(digest)
        return out

    def _fetch(self, job_id: str, item: _Download, resume: bool, timeout: Any) -> str:
        hasher, offset = item.start(resume)
        failures = 0
        while offset < item.artifact.bytes:
            response = self._client.request(
                "GET",
                artifact_path(job_id, item.artifact.name),
                headers=item.range_header(offset),
                timeout=timeout,
                stream=True,
            )
            try:
                if offset and not item.accept(response, offset):
                    hasher, offset = item.start(resume=False)
                with item.part.open("ab") as handle:
                    for chunk in response.iter_bytes():
                        handle.write(chunk)
                        hasher.update(chunk)
                        offset += len(chunk)
                return hasher.hexdigest()
            except httpx.TransportError as exc:
                if failures >= self._client.max_retries:
                    raise APIConnectionError(response.request, str(exc)) from exc
            finally:
                response.close()
            _sleep(retry_delay(failures))
            failures += 1
            hasher, offset = item.start(resume=True)
        return hasher.hexdigest()


class AsyncRepairJobs:
    def __init__(self, client: AsyncHCNRClient) -> None:
        self._client = client

    async def create(
        self,
        *,
        base: str,
        finetuned: str,
        honesty_file: Any,
        task_file: Any,
        method: str | None = None,
        eval_file: Any = None,
        validation_file: Any = None,
        hyperparameters: dict[str, Any] | None = None,
        metadata: dict[str, str] | None = None,
        webhook_url: str | None = None,
        integrations: list[dict[str, Any]] | None = None,
        push_to_hub: str | dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        extra_body: dict[str, Any] | None = None,
        timeout: Timeout | NotGiven = NOT_GIVEN,
    ) -> RepairJob:
        body = job_create_body(
            base=base,
            finetuned=finetuned,
            honesty_file=honesty_file,
            task_file=task_file,
            method=method,
            eval_file=eval_file,
            validation_file=validation_file,
            hyperparameters=hyperparameters,
            metadata=metadata,
            webhook_url=webhook_url,
            extra_body=extra_body,
            integrations=integrations,
            push_to_hub=push_to_hub,
        )
        headers = {"Idempotency-Key": idempotency_key or f"hcnr-client-{uuid.uuid4()}"}
        return await self._client._post(
            "/v1/repair-jobs", RepairJob, json=body, headers=headers, timeout=timeout
        )

    async def estimate(
        self,
        *,
        base: str,
        finetuned: str,
        honesty_file: Any,
        task_file: Any,
        method: str | None = None,
        eval_file: Any = None,
        validation_file: Any = None,
        hyperparameters: dict[str, Any] | None = None,
        extra_body: dict[str, Any] | None = None,
        timeout: Timeout | NotGiven = NOT_GIVEN,
    ) -> RepairJobEstimate:
        body = job_create_body(
            base=base,
            finetuned=finetuned,
            honesty_file=honesty_file,
            task_file=task_file,
            method=method,
            eval_file=eval_file,
            validation_file=validation_file,
            hyperparameters=hyperparameters,
            metadata=None,
            webhook_url=None,
            extra_body=extra_body,
        )
        return await self._client._post(
            "/v1/repair-jobs/estimate", RepairJobEstimate, json=body, timeout=timeout
        )

    async def retrieve(self, job_id: str, *, timeout: Timeout | NotGiven = NOT_GIVEN) -> RepairJob:
        return await self._client._get(job_path(job_id), RepairJob, timeout=timeout)

    def list(
        self,
        *,
        after: str | None = None,
        limit: int | None = None,
        status: JobStatus | None = None,
        metadata: dict[str, str] | None = None,
        timeout: Timeout | NotGiven = NOT_GIVEN,
    ) -> AsyncPaginator[RepairJob]:
        """`await` it for one page, or `async for job in ...` for every job."""

        async def page(cursor: str | None) -> AsyncPage[RepairJob]:
            response = await self._client.request(
                "GET",
                "/v1/repair-jobs",
                params=job_list_params(cursor, limit, status, metadata),
                timeout=timeout,
            )
            body = response.json()
            return AsyncPage(
                data=[RepairJob.model_validate(item) for item in body["data"]],
                has_more=body["has_more"],
                next_cursor=body.get("next_cursor"),
                fetch=page,
            )

        return AsyncPaginator(lambda: page(after))

    async def delete(
        self, job_id: str, *, timeout: Timeout | NotGiven = NOT_GIVEN
    ) -> RepairJobDeleted:
        response = await self._client.request("DELETE", job_path(job_id), timeout=timeout)
        return RepairJobDeleted.model_validate(response.json())

    async def cancel(self, job_id: str, *, timeout: Timeout | NotGiven = NOT_GIVEN) -> RepairJob:
        return await self._client._post(job_path(job_id, "cancel"), RepairJob, timeout=timeout)

    def list_events(
        self,
        job_id: str,
        *,
        after: int = 0,
        limit: int | None = None,
        timeout: Timeout | NotGiven = NOT_GIVEN,
    ) -> AsyncPaginator[JobEvent]:
        async def page(cursor: int) -> AsyncPage[JobEvent]:
            response = await self._client.request(
                "GET",
                job_path(job_id, "events"),
                params=event_list_params(cursor, limit),
                timeout=timeout,
            )
            body = response.json()
            return AsyncPage(
                data=[JobEvent.model_validate(item) for item in body["data"]],
                has_more=body["has_more"],
                next_cursor=body.get("next_cursor"),
                fetch=page,
            )

        return AsyncPaginator(lambda: page(after))

    async def stream_events(self, job_id: str, *, after: int = 0) -> AsyncIterator[JobEvent]:
        last, failures = after, 0
        while True:
            response = await self._client.request(
                "GET",
                job_path(job_id, "events", "stream"),
                headers={"Last-Event-ID": str(last), "Accept": "text/event-stream"},
                timeout=stream_timeout(self._client.timeout),
                stream=True,
            )
            try:
                async for kind, data in _asse(response.aiter_lines()):
                    if kind == "end":
                        return
                    event = JobEvent.model_validate_json(data)
                    last, failures = event.id, 0
                    yield event
                problem: Exception = httpx.RemoteProtocolError("stream ended before `end`")
            except httpx.TransportError as exc:
                problem = exc
            finally:
                await response.aclose()
            if failures >= self._client.max_retries:
                raise APIConnectionError(response.request, str(problem)) from problem
            await _asleep(retry_delay(failures))
            failures += 1

    async def wait(
        self, job_id: str, *, timeout: float = 3600.0, poll_interval: float = 1.0
    ) -> RepairJob:
        deadline = time.monotonic() + timeout
        while True:
            job = await self.retrieve(job_id)
            if job.status in TERMINAL_STATUSES:
                return job
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeoutError(job_id, job.status, timeout)
            await _asleep(min(poll_interval, left))

    async def list_artifacts(
        self, job_id: str, *, timeout: Timeout | NotGiven = NOT_GIVEN
    ) -> ArtifactList:
        return await self._client._get(job_path(job_id, "artifacts"), ArtifactList, timeout=timeout)

    async def retrieve_report(
        self, job_id: str, *, timeout: Timeout | NotGiven = NOT_GIVEN
    ) -> dict[str, Any]:
        response = await self._client.request("GET", job_path(job_id, "report"), timeout=timeout)
        return response.json()

    async def artifact_content(
        self,
        job_id: str,
        name: str,
        *,
        byte_range: tuple[int, int | None] | None = None,
        timeout: Timeout | NotGiven = NOT_GIVEN,
    ) -> bytes:
        headers = {}
        if byte_range is not None:
            start, end = byte_range
            headers["Range"] = f"bytes={start}-{'' if end is None else end}"
        response = await self._client.request(
            "GET", artifact_path(job_id, name), headers=headers, timeout=timeout
        )
        return response.content

    async def download(
        self,
        job_id: str,
        out: str | Path,
        *,
        resume: bool = True,
        timeout: Timeout | NotGiven = NOT_GIVEN,
    ) -> Path:
        """As RepairJobs.download."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for artifact in (await self.list_artifacts(job_id, timeout=timeout)).data:
            item = _Download(artifact, out / safe_name(artifact.name))
            if item.done():
                continue
            digest = await self._fetch(job_id, item, resume, timeout)
            if digest != artifact.sha256 and resume:
                digest = await self._fetch(job_id, item, False, timeout)
            item.finish(digest)
        return out

    async def _fetch(self, job_id: str, item: _Download, resume: bool, timeout: Any) -> str:
        hasher, offset = item.start(resume)
        failures = 0
        while offset < item.artifact.bytes:
            response = await self._client.request(
                "GET",
                artifact_path(job_id, item.artifact.name),
                headers=item.range_header(offset),
                timeout=timeout,
                stream=True,
            )
            try:
                if offset and not item.accept(response, offset):
                    hasher, offset = item.start(resume=False)
                with item.part.open("ab") as handle:
                    async for chunk in response.aiter_bytes():
                        handle.write(chunk)
                        hasher.update(chunk)
                        offset += len(chunk)
                return hasher.hexdigest()
            except httpx.TransportError as exc:
                if failures >= self._client.max_retries:
                    raise APIConnectionError(response.request, str(exc)) from exc
            finally:
                await response.aclose()
            await _asleep(retry_delay(failures))
            failures += 1
            hasher, offset = item.start(resume=True)
        return hasher.hexdigest()
