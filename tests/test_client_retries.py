"""hcnr_client's retries, backoff, Retry-After, timeouts, typed errors and resumable
downloads against a fake transport (httpx.MockTransport): the failures a real server
cannot be made to produce on demand. Everything else runs against the real API in
tests/service/test_client_sdk.py."""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import hcnr_client
import httpx
import pytest
from hcnr_client import _client

JOB = {
    "object": "repair_job",
    "id": "job_1",
    "method": "hcnr",
    "status": "queued",
    "stage": None,
    "progress": 0.0,
    "eta_seconds": None,
    "base": "path:base",
    "finetuned": "path:ft",
    "honesty_file": "file_h",
    "task_file": "file_t",
    "eval_file": None,
    "validation_file": None,
    "hyperparameters": {},
    "metadata": {},
    "webhook_url": None,
    "webhook_status": None,
    "stage_seconds": {},
    "metrics": None,
    "error": None,
    "attempts": 0,
    "created_at": "2026-01-01T00:00:00Z",
    "queued_at": None,
    "started_at": None,
    "finished_at": None,
}


def error(status: int, code: str, headers: dict | None = None, **extra) -> httpx.Response:
    body = {"error": {"code": code, "message": f"{code} happened", "details": None, **extra}}
    return httpx.Response(status, json=body, headers=headers)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The delays the client waits between attempts (recorded, not slept)."""
    seen: list[float] = []

    async def asleep(seconds: float) -> None:
        seen.append(seconds)

    monkeypatch.setattr(_client, "_sleep", seen.append)
    monkeypatch.setattr(_client, "_asleep", asleep)
    return seen


def make_client(
    answers: list[httpx.Response | Exception] | Callable[[httpx.Request], httpx.Response],
    **options,
) -> tuple[hcnr_client.HCNRClient, list[httpx.Request]]:
    requests: list[httpx.Request] = []
    queue = list(answers) if isinstance(answers, list) else None

    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        requests.append(request)
        if queue is None:
            return answers(request)
        answer = queue.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    http = httpx.Client(transport=httpx.MockTransport(handler))
    client = hcnr_client.HCNRClient(
        api_key="k", base_url="http://api.test", http_client=http, **options
    )
    return client, requests


def test_5xx_is_retried_with_exponential_backoff(sleeps):
    client, requests = make_client(
        [error(503, "unavailable"), error(500, "boom"), httpx.Response(200, json=JOB)]
    )
    assert client.repair_jobs.retrieve("job_1").id == "job_1"
    assert len(requests) == 3
    assert 0.375 <= sleeps[0] <= 0.5 and 0.75 <= sleeps[1] <= 1.0  # 0.5 s, 1 s, 25% jitter


def test_retries_end_with_the_typed_error(sleeps):
    client, requests = make_client([error(500, "internal_error")] * 4, max_retries=3)
    with pytest.raises(hcnr_client.InternalServerError) as excinfo:
        client.repair_jobs.retrieve("job_1")
    assert len(requests) == 4 and len(sleeps) == 3
    err = excinfo.value
    assert err.status_code == 500 and err.code == "internal_error"
    assert err.message == "internal_error happened" and isinstance(err, hcnr_client.APIStatusError)


def test_retry_after_seconds_date_and_ms_are_respected(sleeps):
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    client, requests = make_client(
        [
            error(429, "rate_limited", {"Retry-After": "7"}),
            error(429, "rate_limited", {"Retry-After": date}),
            error(503, "unavailable", {"retry-after-ms": "250"}),
            error(429, "rate_limited", {"Retry-After": "3600"}),  # too long: backoff instead
            httpx.Response(200, json=JOB),
        ],
        max_retries=4,
    )
    client.repair_jobs.retrieve("job_1")
    assert sleeps[0] == 7 and 28 <= sleeps[1] <= 30 and sleeps[2] == 0.25
    assert sleeps[3] <= 8.0 and len(requests) == 5


def test_rate_limit_error_after_the_last_retry(sleeps):
    client, requests = make_client([error(429, "rate_limited", {"Retry-After": "1"})] * 3)
    with pytest.raises(hcnr_client.RateLimitError) as excinfo:
        client.files.retrieve("file_1")
    assert excinfo.value.code == "rate_limited" and excinfo.value.status_code == 429
    assert sleeps == [1.0, 1.0] and len(requests) == 3


@pytest.mark.parametrize("status", [408, 409, 502, 504])
def test_retried_statuses(sleeps, status):
    client, requests = make_client([error(status, "transient"), httpx.Response(200, json=JOB)])
    assert client.repair_jobs.retrieve("job_1").status == "queued"
    assert len(requests) == 2


@pytest.mark.parametrize(
    ("status", "code", "kind"),
    [
        (400, "bad_request", hcnr_client.BadRequestError),
        (401, "unauthorized", hcnr_client.AuthenticationError),
        (403, "forbidden", hcnr_client.PermissionDeniedError),
        (404, "not_found", hcnr_client.NotFoundError),
        (409, "job_not_cancellable", hcnr_client.ConflictError),  # final: not retried
        (409, "artifacts_not_ready", hcnr_client.ConflictError),
        (413, "payload_too_large", hcnr_client.PayloadTooLargeError),
        (422, "invalid_data", hcnr_client.UnprocessableEntityError),
    ],
)
def test_client_errors_are_typed_and_not_retried(sleeps, status, code, kind):
    client, requests = make_client([error(status, code), httpx.Response(200, json=JOB)])
    with pytest.raises(kind) as excinfo:
        client.repair_jobs.cancel("job_1")
    assert excinfo.value.code == code and excinfo.value.status_code == status
    assert len(requests) == 1 and sleeps == []


def test_x_should_retry_overrides(sleeps):
    client, requests = make_client(
        [error(503, "down", {"x-should-retry": "false"}), httpx.Response(200, json=JOB)]
    )
    with pytest.raises(hcnr_client.InternalServerError):
        client.repair_jobs.retrieve("job_1")
    client, requests = make_client(
        [error(400, "odd", {"x-should-retry": "true"}), httpx.Response(200, json=JOB)]
    )
    assert client.repair_jobs.retrieve("job_1").id == "job_1" and len(requests) == 2


def test_param_names_the_invalid_field(sleeps):
    details = [{"loc": ["body", "hyperparameters", "r_cw"], "message": "too big"}]
    client, _ = make_client([error(422, "invalid_request", details=details)])
    with pytest.raises(hcnr_client.UnprocessableEntityError) as excinfo:
        client.repair_jobs.create(base="b", finetuned="f", honesty_file="h", task_file="t")
    assert excinfo.value.param == "hyperparameters.r_cw"
    assert excinfo.value.details == details
    client, _ = make_client([error(422, "invalid_reference", param="base")])
    with pytest.raises(hcnr_client.UnprocessableEntityError) as excinfo:
        client.repair_jobs.create(base="b", finetuned="f", honesty_file="h", task_file="t")
    assert excinfo.value.param == "base"


def test_a_non_json_error_body_still_raises_typed(sleeps):
    client, _ = make_client([httpx.Response(502, text="<html>bad gateway</html>")], max_retries=0)
    with pytest.raises(hcnr_client.InternalServerError) as excinfo:
        client.repair_jobs.retrieve("job_1")
    assert excinfo.value.code == "http_error" and "bad gateway" in excinfo.value.message


def test_connection_errors_and_timeouts(sleeps):
    client, requests = make_client(
        [
            httpx.ConnectError("refused"),
            httpx.ConnectError("refused"),
            httpx.Response(200, json=JOB),
        ]
    )
    assert client.repair_jobs.retrieve("job_1").id == "job_1" and len(requests) == 3
    client, requests = make_client([httpx.ConnectError("refused")] * 3)
    with pytest.raises(hcnr_client.APIConnectionError) as excinfo:
        client.repair_jobs.retrieve("job_1")
    assert not isinstance(excinfo.value, hcnr_client.APITimeoutError)
    client, requests = make_client([httpx.ReadTimeout("slow")] * 2, max_retries=1)
    with pytest.raises(hcnr_client.APITimeoutError):
        client.repair_jobs.retrieve("job_1")
    assert len(requests) == 2


def test_timeouts_are_configurable(sleeps):
    client, requests = make_client(lambda request: httpx.Response(200, json=JOB), timeout=5.0)
    client.repair_jobs.retrieve("job_1")
    client.repair_jobs.retrieve("job_1", timeout=httpx.Timeout(1.0, connect=0.5))
    client.with_options(timeout=9.0).repair_jobs.retrieve("job_1")
    client.with_options(timeout=None).repair_jobs.retrieve("job_1")
    seen = [r.extensions["timeout"] for r in requests]
    assert seen[0] == {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 5.0}
    assert seen[1]["connect"] == 0.5 and seen[1]["read"] == 1.0
    assert seen[2]["read"] == 9.0 and seen[3]["read"] is None


def test_create_retries_with_one_idempotency_key_and_uploads_resend_the_file(sleeps, tmp_path):
    client, requests = make_client([error(503, "down"), httpx.Response(201, json=JOB)])
    client.repair_jobs.create(base="b", finetuned="f", honesty_file="h", task_file="t")
    keys = [r.headers["Idempotency-Key"] for r in requests]
    assert len(keys) == 2 and keys[0] == keys[1]
    assert json.loads(requests[1].content) == {
        "base": "b",
        "finetuned": "f",
        "honesty_file": "h",
        "task_file": "t",
    }
    data = tmp_path / "h.jsonl"
    data.write_bytes(b'{"prompt": "p", "response": "r"}\n')
    file_object = {
        "object": "file",
        "id": "file_1",
        "purpose": "honesty",
        "filename": "h.jsonl",
        "bytes": 33,
        "sha256": "0" * 64,
        "samples": 1,
        "created_at": "2026-01-01T00:00:00Z",
    }
    client, requests = make_client([error(500, "x"), httpx.Response(201, json=file_object)])
    assert client.files.create(file=data, purpose="honesty").id == "file_1"
    assert all(data.read_bytes() in r.content for r in requests) and len(requests) == 2


def test_an_invalid_response_body_is_an_error(sleeps):
    client, _ = make_client([httpx.Response(200, json={"id": "job_1"})])
    with pytest.raises(hcnr_client.APIResponseValidationError):
        client.repair_jobs.retrieve("job_1")


def test_the_api_key_is_required(monkeypatch):
    monkeypatch.delenv("HCNR_API_KEY", raising=False)
    with pytest.raises(hcnr_client.HCNRError, match="api_key"):
        hcnr_client.HCNRClient()
    monkeypatch.setenv("HCNR_API_KEY", "from-env")
    monkeypatch.setenv("HCNR_API_URL", "http://env.test:1/")
    with hcnr_client.HCNRClient() as client:
        assert client.api_key == "from-env" and client.base_url == "http://env.test:1"


# --- a download whose connection breaks mid-file ------------------------------------------


class Broken(httpx.SyncByteStream):
    """A body that sends `cut` bytes and then loses the connection."""

    def __init__(self, data: bytes, cut: int) -> None:
        self.data, self.cut = data, cut

    def __iter__(self) -> Iterator[bytes]:
        yield self.data[: self.cut]
        raise httpx.ReadError("connection reset")


def artifact_server(content: bytes, cuts: list[int], listed_sha: str | None = None):
    """GET artifacts (listing) and the file with Range; the first answers break after
    `cuts` bytes."""
    sha = listed_sha or hashlib.sha256(content).hexdigest()
    listing = {
        "object": "list",
        "data": [
            {
                "object": "artifact",
                "name": "model.safetensors",
                "bytes": len(content),
                "sha256": sha,
                "url": "/v1/repair-jobs/job_1/artifacts/model.safetensors",
            }
        ],
    }

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/artifacts"):
            return httpx.Response(200, json=listing)
        start = 0
        if "range" in request.headers:
            start = int(request.headers["range"].removeprefix("bytes=").split("-")[0])
        body = content[start:]
        headers = {"Content-Range": f"bytes {start}-{len(content) - 1}/{len(content)}"}
        status = 206 if start else 200
        if cuts:
            return httpx.Response(status, headers=headers, stream=Broken(body, cuts.pop(0)))
        return httpx.Response(status, headers=headers, content=body)

    return handler


def test_a_broken_download_resumes_with_range(sleeps, tmp_path: Path):
    content = bytes(range(256)) * 1000
    client, requests = make_client(artifact_server(content, cuts=[10_000, 50_000]))
    out = client.repair_jobs.download("job_1", tmp_path / "out")
    assert (out / "model.safetensors").read_bytes() == content
    ranges = [r.headers.get("range") for r in requests if "/artifacts/" in r.url.path]
    assert ranges == [None, "bytes=10000-", "bytes=60000-"]
    assert not list(out.glob("*.part"))


def test_a_download_that_keeps_breaking_keeps_its_part_file(sleeps, tmp_path: Path):
    content = bytes(range(256)) * 1000
    client, _ = make_client(artifact_server(content, cuts=[1000, 1000, 1000]))
    with pytest.raises(hcnr_client.APIConnectionError):
        client.repair_jobs.download("job_1", tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors.part").stat().st_size == 3000
    client, requests = make_client(artifact_server(content, cuts=[]))
    client.repair_jobs.download("job_1", tmp_path / "out")  # a second call continues
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == content
    assert [r.headers.get("range") for r in requests][1:] == ["bytes=3000-"]


def test_a_sha256_mismatch_raises_and_leaves_nothing(sleeps, tmp_path: Path):
    client, _ = make_client(artifact_server(b"abc" * 100, cuts=[], listed_sha="f" * 64))
    with pytest.raises(hcnr_client.ChecksumMismatchError) as excinfo:
        client.repair_jobs.download("job_1", tmp_path / "out")
    assert excinfo.value.expected == "f" * 64
    assert list((tmp_path / "out").iterdir()) == []


# --- async ----------------------------------------------------------------------------------


def test_async_client_retries_and_types_errors(sleeps):
    answers = [error(429, "rate_limited", {"Retry-After": "2"}), httpx.Response(200, json=JOB)]
    answers += [error(404, "not_found")]
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return answers.pop(0)

    async def main() -> None:
        http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        async with hcnr_client.AsyncHCNRClient(
            api_key="k", base_url="http://api.test", http_client=http
        ) as client:
            assert (await client.repair_jobs.retrieve("job_1")).id == "job_1"
            with pytest.raises(hcnr_client.NotFoundError):
                await client.repair_jobs.retrieve("job_2")
        await http.aclose()

    asyncio.run(main())
    assert sleeps == [2.0] and len(requests) == 3
