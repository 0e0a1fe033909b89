"""The job flows both deployments must pass (embedded, and Redis + PostgreSQL + Celery),
driven over HTTP through the typed client."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from service_support import Models, digests

from hcnr_cli.client import APIError, HCNRClient


def upload_inputs(client: HCNRClient, honesty: Path, task: Path) -> dict[str, str]:
    return {
        "honesty": client.upload_file(honesty, "honesty").id,
        "task": client.upload_file(task, "task").id,
    }


def full_flow(client: HCNRClient, models: Models, direct_repair: Path, out: Path) -> str:
    """create -> poll -> events -> download -> loads, and equals a direct repair."""
    files = upload_inputs(client, models.honesty, models.task)
    body = {
        "base": "path:base",
        "finetuned": "path:finetuned-adapter",
        "honesty_file": files["honesty"],
        "task_file": files["task"],
        "metadata": {"pipeline": "ci"},
    }
    job = client.create_job(body, idempotency_key=f"flow-{out.name}")
    assert job.status == "queued"
    assert client.create_job(body, idempotency_key=f"flow-{out.name}").id == job.id
    seen_running = _poll_until_done(client, job.id)
    done = client.get_job(job.id)
    assert done.status == "succeeded", done.error
    assert done.progress == 1.0 and done.attempts == 1 and done.finished_at is not None
    assert seen_running or done.started_at is not None

    paged = client.all_events(job.id)
    assert [e.type for e in paged][:3] == ["created", "queued", "running"]
    assert paged[-1].type == "succeeded"
    assert {e.stage for e in paged if e.type == "stage"} >= {"fisher_task", "save"}
    streamed = list(client.stream_events(job.id))
    assert [e.id for e in streamed] == [e.id for e in paged]

    checkpoint = client.download_checkpoint(job.id, out)
    assert digests(checkpoint) == digests(direct_repair)  # bit for bit
    listed = {a.name: a.sha256 for a in client.artifacts(job.id).data}
    assert digests(checkpoint).items() <= listed.items()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(checkpoint)  # a loadable HF checkpoint
    return job.id


def _poll_until_done(client: HCNRClient, job_id: str, timeout: float = 180) -> bool:
    deadline, seen_running = time.monotonic() + timeout, False
    while time.monotonic() < deadline:
        job = client.get_job(job_id)
        assert 0.0 <= job.progress <= 1.0
        seen_running |= job.status == "running"
        if job.status in ("succeeded", "failed", "cancelled"):
            return seen_running
        time.sleep(0.2)
    pytest.fail(f"job {job_id} did not finish in {timeout}s")


def slow_job(client: HCNRClient, models: Models) -> str:
    files = upload_inputs(client, models.slow_honesty, models.slow_task)
    body = {
        "base": "path:slow/base",
        "finetuned": "path:slow/finetuned-adapter",
        "honesty_file": files["honesty"],
        "task_file": files["task"],
    }
    return client.create_job(body).id


def wait_running(client: HCNRClient, job_id: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get_job(job_id)
        if job.status == "running" and job.progress > 0:
            return
        assert job.status in ("queued", "running"), job
        time.sleep(0.1)
    pytest.fail(f"job {job_id} never started running")


def cancel_flow(client: HCNRClient, models: Models, artifacts_root: Path) -> None:
    """Cancel a running job: it ends `cancelled` and publishes nothing."""
    job_id = slow_job(client, models)
    wait_running(client, job_id)
    assert client.cancel_job(job_id).status in ("cancelling", "cancelled")
    job = client.wait(job_id, timeout=120, poll=0.2)
    assert job.status == "cancelled" and job.error is None
    with pytest.raises(APIError) as excinfo:
        client.artifacts(job_id)
    assert excinfo.value.code == "artifacts_not_ready"
    assert not (artifacts_root / "jobs" / job_id).exists()
    assert not [p for p in artifacts_root.rglob("*staging*")]
    assert client.all_events(job_id)[-1].type == "cancelled"


def other_tenant_flow(owner: HCNRClient, other: HCNRClient, job_id: str) -> None:
    for call in (other.get_job, other.cancel_job, other.artifacts, other.report, other.events):
        with pytest.raises(APIError) as excinfo:
            call(job_id)
        assert excinfo.value.status == 404, call
    assert owner.get_job(job_id).id == job_id
