"""Webhooks on terminal states: a Celery task of their own (retried with backoff), the
address checked again at send time, signed in the Standard Webhooks format with the
tenant's own secret. The signatures are checked here from the documented format alone,
never with the service's own code."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import httpx
import pytest

from tests.service import service_procs as procs
from tests.service.service_support import InProcess, Models, job_body, make_inprocess

SERVICE_SECRET = "webhook-test-service-secret-" + "x" * 20


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


def hooked_env(models: Models, tmp_path: Path, **settings) -> InProcess:
    options = {
        "secret_key": SERVICE_SECRET,
        "webhook_backoff_seconds": 0,
        "webhook_allow_private": True,  # the receiver listens on 127.0.0.1
        **settings,
    }
    return make_inprocess(tmp_path, models, **options)


@pytest.fixture
def hooked(models: Models, tmp_path: Path) -> InProcess:
    return hooked_env(models, tmp_path)


def upload_pair(env: InProcess, models: Models) -> dict[str, str]:
    return {
        purpose: env.upload("alice", path, purpose).json()["id"]
        for purpose, path in (("honesty", models.honesty), ("task", models.task))
    }


def standard_signature(secret: str, headers: dict[str, str], raw: bytes) -> str:
    """https://www.standardwebhooks.com: base64 HMAC-SHA256 of "id.timestamp.body", keyed
    by the base64-decoded secret after `whsec_`."""
    assert secret.startswith("whsec_")
    key = base64.b64decode(secret[len("whsec_") :])
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + raw
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def lowered(headers: dict[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def events_of(env: InProcess, job_id: str) -> list[dict]:
    return env.clients["alice"].get(f"/v1/repair-jobs/{job_id}/events").json()["data"]


def test_succeeded_job_sends_a_signed_webhook_retried_after_a_500(hooked, receiver, models):
    secret = hooked.clients["alice"].get("/v1/webhook-secret").json()["secret"]
    files = upload_pair(hooked, models)
    body = job_body(files, webhook_url=receiver.url, metadata={"run": "w"})
    job_id = hooked.clients["alice"].post("/v1/repair-jobs", json=body).json()["id"]
    assert hooked.run_queued() == ["succeeded"]
    assert len(receiver.requests) == 2  # 500, then 200
    first = lowered(receiver.requests[0][0])
    headers, raw = lowered(receiver.requests[1][0]), receiver.requests[1][1]
    assert headers["webhook-id"] == first["webhook-id"] == f"msg_{job_id}_succeeded"
    assert abs(time.time() - int(headers["webhook-timestamp"])) < 600
    assert headers["webhook-signature"] == standard_signature(secret, headers, raw)
    assert "x-hcnr-signature" not in headers
    # Not the operator's service-wide secret, and not another tenant's.
    assert headers["webhook-signature"] != standard_signature(
        "whsec_" + base64.b64encode(SERVICE_SECRET.encode()).decode(), headers, raw
    )
    bob_secret = hooked.clients["bob"].get("/v1/webhook-secret").json()["secret"]
    assert bob_secret != secret
    assert headers["webhook-signature"] != standard_signature(bob_secret, headers, raw)
    payload = json.loads(raw)
    assert payload["type"] == "repair_job.succeeded"
    assert payload["data"]["id"] == job_id and payload["data"]["metadata"] == {"run": "w"}
    job = hooked.clients["alice"].get(f"/v1/repair-jobs/{job_id}").json()
    assert job["webhook_status"] == "delivered"
    hooks = [e["message"] for e in events_of(hooked, job_id) if e["type"] == "webhook"]
    assert hooks == ["webhook attempt failed (HTTP 500)", "webhook delivered"]


def test_the_sdk_reads_and_rotates_the_secret_and_verifies_a_delivery(hooked, receiver, models):
    """A receiver's whole path with the SDK alone: read the secret, verify a real delivery
    (the SDK's verifier is written apart from the server's signer), refuse a tampered,
    replayed or foreign one, and rotate."""
    from hcnr_client import HCNRClient
    from hcnr_client.webhooks import verify

    http = hooked.clients["alice"]
    key = http.headers["Authorization"].removeprefix("Bearer ")
    sdk = HCNRClient(api_key=key, base_url="http://testserver", http_client=http)
    secret = sdk.webhook_secret.retrieve().secret
    assert secret == http.get("/v1/webhook-secret").json()["secret"]
    receiver.statuses = []
    files = upload_pair(hooked, models)
    job_id = http.post("/v1/repair-jobs", json=job_body(files, webhook_url=receiver.url))
    http.post(f"/v1/repair-jobs/{job_id.json()['id']}/cancel")
    headers, raw = receiver.requests[-1]
    assert verify(secret, headers, raw)
    assert not verify(secret, headers, raw + b" ")  # the body was changed
    sent = int(lowered(headers)["webhook-timestamp"])
    assert not verify(secret, headers, raw, now=sent + 301)  # replayed later
    bob = hooked.clients["bob"].get("/v1/webhook-secret").json()["secret"]
    assert not verify(bob, headers, raw)
    rotated = sdk.webhook_secret.rotate().secret
    assert rotated.startswith("whsec_") and rotated != secret
    assert sdk.webhook_secret.retrieve().secret == rotated
    assert not verify(rotated, headers, raw)  # signed with the old one


def test_the_secret_is_stable_until_rotated(hooked, receiver, models):
    client = hooked.clients["alice"]
    first = client.get("/v1/webhook-secret").json()["secret"]
    assert client.get("/v1/webhook-secret").json()["secret"] == first
    rotated = client.post("/v1/webhook-secret/rotate").json()["secret"]
    assert rotated != first and rotated.startswith("whsec_")
    receiver.statuses = []
    files = upload_pair(hooked, models)
    job_id = client.post("/v1/repair-jobs", json=job_body(files, webhook_url=receiver.url))
    client.post(f"/v1/repair-jobs/{job_id.json()['id']}/cancel")
    headers, raw = receiver.requests[-1]
    headers = lowered(headers)
    assert headers["webhook-signature"] == standard_signature(rotated, headers, raw)
    assert (
        client.get("/v1/webhook-secret", headers={"Authorization": "Bearer x"}).status_code == 401
    )


def test_retries_stop_after_webhook_attempts(models, tmp_path):
    env = hooked_env(models, tmp_path, webhook_attempts=3)
    receiver = Receiver([500, 503, 502, 500, 500])
    try:
        files = upload_pair(env, models)
        body = job_body(files, webhook_url=receiver.url)
        job_id = env.clients["alice"].post("/v1/repair-jobs", json=body).json()["id"]
        env.clients["alice"].post(f"/v1/repair-jobs/{job_id}/cancel")
        assert len(receiver.requests) == 3
        job = env.clients["alice"].get(f"/v1/repair-jobs/{job_id}").json()
        assert job["webhook_status"] == "failed"
    finally:
        receiver.server.shutdown()


def test_a_4xx_is_not_retried(hooked, receiver, models):
    receiver.statuses = [410]
    files = upload_pair(hooked, models)
    body = job_body(files, webhook_url=receiver.url)
    job_id = hooked.clients["alice"].post("/v1/repair-jobs", json=body).json()["id"]
    hooked.clients["alice"].post(f"/v1/repair-jobs/{job_id}/cancel")
    assert len(receiver.requests) == 1
    job = hooked.clients["alice"].get(f"/v1/repair-jobs/{job_id}").json()
    assert job["webhook_status"] == "rejected_410"


def test_cancelled_queued_job_sends_a_webhook(hooked, receiver, models):
    receiver.statuses = []
    files = upload_pair(hooked, models)
    body = job_body(files, webhook_url=receiver.url)
    job_id = hooked.clients["alice"].post("/v1/repair-jobs", json=body).json()["id"]
    hooked.clients["alice"].post(f"/v1/repair-jobs/{job_id}/cancel")
    headers, raw = receiver.requests[-1]
    assert lowered(headers)["x-hcnr-event"] == "repair_job.cancelled"
    assert json.loads(raw)["data"]["status"] == "cancelled"


def test_private_webhook_addresses_are_refused_by_default(inproc: InProcess, models):
    files = upload_pair(inproc, models)
    body = job_body(files, webhook_url="http://127.0.0.1:9/hook")
    response = inproc.clients["alice"].post("/v1/repair-jobs", json=body)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_webhook_url"


def test_a_host_that_turns_private_is_refused_at_send_time(models, tmp_path, monkeypatch):
    """DNS rebinding: public when the job is created, loopback when the webhook is sent."""
    env = hooked_env(models, tmp_path, webhook_allow_private=False)
    receiver = Receiver([])
    try:
        host = "hooks.rebinding.test"
        answer = {"address": "93.184.216.34"}  # a public address at registration
        real = socket.getaddrinfo

        def fake(name, *args, **kwargs):
            if name == host:
                return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answer["address"], 0))]
            return real(name, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", fake)
        files = upload_pair(env, models)
        url = f"http://{host}:{receiver.server.server_port}/hook"
        body = job_body(files, webhook_url=url)
        response = env.clients["alice"].post("/v1/repair-jobs", json=body)
        assert response.status_code == 201, response.text
        answer["address"] = "127.0.0.1"  # ...and the receiver's address at send time
        assert env.run_queued() == ["succeeded"]
        job = env.clients["alice"].get(f"/v1/repair-jobs/{response.json()['id']}").json()
        assert job["webhook_status"] == "refused_address"
        assert receiver.requests == []
    finally:
        receiver.server.shutdown()


def test_embedded_mode_delivers_through_the_broker_with_backoff(models: Models, tmp_path: Path):
    """`hcnr serve` (kombu SQLAlchemy broker, one worker): the delivery is a task of its
    own on the broker; the 500 is retried after the backoff, by Celery."""
    receiver = Receiver([500, 200])
    env = procs.service_env(
        env="test",
        data_dir=tmp_path,
        models_root=models.root,
        webhook_allow_private="true",
        webhook_backoff_seconds="1",
    )
    key = procs.create_key(env, "alice")
    process, url = procs.start_api(env, tmp_path / "serve.log")
    try:
        auth = {"Authorization": f"Bearer {key}"}
        client = httpx.Client(base_url=url, headers=auth, timeout=120)
        secret = client.get("/v1/webhook-secret").json()["secret"]
        files = {}
        for purpose, path in (("honesty", models.honesty), ("task", models.task)):
            upload = {"file": (path.name, path.read_bytes(), "application/jsonl")}
            response = client.post("/v1/files", files=upload, data={"purpose": purpose})
            files[purpose] = response.json()["id"]
        body = job_body(files, webhook_url=receiver.url)
        job_id = client.post("/v1/repair-jobs", json=body).json()["id"]
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            job = client.get(f"/v1/repair-jobs/{job_id}").json()
            if job["webhook_status"] in ("delivered", "failed"):
                break
            time.sleep(0.5)
        assert job["status"] == "succeeded" and job["webhook_status"] == "delivered"
        assert len(receiver.requests) == 2
        first, second = (lowered(headers) for headers, _ in receiver.requests)
        assert int(second["webhook-timestamp"]) - int(first["webhook-timestamp"]) >= 1
        assert second["webhook-signature"] == standard_signature(
            secret, second, receiver.requests[1][1]
        )
    finally:
        procs.stop(process)
        receiver.server.shutdown()
