"""Signed (HMAC-SHA256) webhooks on terminal states, with retries."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from service_support import InProcess, Models, job_body, make_inprocess

from worker.webhooks import sign, verify

SECRET = "webhook-test-secret-" + "x" * 20


class Receiver:
    """A local HTTP endpoint answering with scripted status codes."""

    def __init__(self, statuses: list[int]):
        self.statuses, self.requests = statuses, []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((dict(self.headers), body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver([500, 200])  # the first delivery fails: it must be retried
    yield receiver
    receiver.server.shutdown()


@pytest.fixture
def hooked(models: Models, tmp_path: Path) -> InProcess:
    return make_inprocess(
        tmp_path,
        models,
        secret_key=SECRET,
        webhook_backoff_seconds=0,
        webhook_allow_private=True,
    )


def upload_pair(env: InProcess, models: Models) -> dict[str, str]:
    return {
        purpose: env.upload("alice", path, purpose).json()["id"]
        for purpose, path in (("honesty", models.honesty), ("task", models.task))
    }


def test_succeeded_job_sends_a_signed_webhook_with_retry(hooked, receiver, models):
    files = upload_pair(hooked, models)
    body = job_body(files, webhook_url=receiver.url, metadata={"run": "w"})
    job_id = hooked.clients["alice"].post("/v1/repair-jobs", json=body).json()["id"]
    assert hooked.run_queued() == ["succeeded"]
    assert len(receiver.requests) == 2  # 500, then 200
    headers, raw = receiver.requests[-1]
    assert headers["X-HCNR-Event"] == "repair_job.succeeded"
    assert verify(SECRET, headers["X-HCNR-Signature"], raw)
    # As a receiver would check it from the documented format alone (not our verify()):
    # `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">`, keyed by the secret.
    import hashlib
    import hmac
    import time

    fields = dict(part.split("=", 1) for part in headers["X-HCNR-Signature"].split(","))
    assert set(fields) == {"t", "v1"} and abs(time.time() - int(fields["t"])) < 600
    expected = hmac.new(SECRET.encode(), fields["t"].encode() + b"." + raw, hashlib.sha256)
    assert hmac.compare_digest(fields["v1"], expected.hexdigest())
    assert not verify("another-secret", headers["X-HCNR-Signature"], raw)
    assert not verify(SECRET, headers["X-HCNR-Signature"], raw + b" ")
    payload = json.loads(raw)
    assert payload["data"]["id"] == job_id and payload["data"]["metadata"] == {"run": "w"}
    job = hooked.clients["alice"].get(f"/v1/repair-jobs/{job_id}").json()
    assert job["webhook_status"] == "delivered"


def test_cancelled_queued_job_sends_a_webhook(hooked, receiver, models):
    receiver.statuses = []
    files = upload_pair(hooked, models)
    body = job_body(files, webhook_url=receiver.url)
    job_id = hooked.clients["alice"].post("/v1/repair-jobs", json=body).json()["id"]
    hooked.clients["alice"].post(f"/v1/repair-jobs/{job_id}/cancel")
    headers, raw = receiver.requests[-1]
    assert headers["X-HCNR-Event"] == "repair_job.cancelled"
    assert json.loads(raw)["data"]["status"] == "cancelled"


def test_private_webhook_addresses_are_refused_by_default(inproc: InProcess, models):
    files = upload_pair(inproc, models)
    body = job_body(files, webhook_url="http://127.0.0.1:9/hook")
    response = inproc.clients["alice"].post("/v1/repair-jobs", json=body)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_webhook_url"


def test_signature_format():
    header = sign("k", 1700000000, b"{}")
    assert header.startswith("t=1700000000,v1=") and len(header.split("v1=")[1]) == 64
    assert not verify("k", header, b"{}")  # too old
