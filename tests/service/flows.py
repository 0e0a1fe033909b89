"""The job flows both deployments must pass (embedded, and Redis + PostgreSQL + Celery),
driven over HTTP through the typed client."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hcnr_client import APIStatusError, HCNRClient

from tests.service import service_procs as procs
from tests.service.service_support import Models, digests


def upload_inputs(client: HCNRClient, honesty: Path, task: Path) -> dict[str, str]:
    return {
        "honesty": client.files.create(file=honesty, purpose="honesty").id,
        "task": client.files.create(file=task, purpose="task").id,
    }


def full_flow(client: HCNRClient, models: Models, direct_repair: Path, out: Path) -> str:
    """create -> poll -> events -> download -> loads, and equals a direct repair."""
    files = upload_inputs(client, models.honesty, models.task)
    body = {
        "method": "hcnr",
        "base": "path:base",
        "finetuned": "path:finetuned-adapter",
        "honesty_file": files["honesty"],
        "task_file": files["task"],
        "metadata": {"pipeline": "ci"},
    }
    job = client.repair_jobs.create(**body, idempotency_key=f"flow-{out.name}")
    assert job.status == "validating"  # validated afterwards, by the validation task
    assert client.repair_jobs.create(**body, idempotency_key=f"flow-{out.name}").id == job.id
    seen_running = _poll_until_done(client, job.id)
    done = client.repair_jobs.retrieve(job.id)
    assert done.status == "succeeded", done.error
    assert done.progress == 1.0 and done.attempts == 1 and done.finished_at is not None
    assert seen_running or done.started_at is not None

    paged = list(client.repair_jobs.list_events(job.id, limit=1000))
    assert [e.type for e in paged][:3] == ["created", "queued", "running"]
    assert paged[-1].type == "succeeded"
    assert {e.stage for e in paged if e.type == "stage"} >= {"fisher_task", "save"}
    streamed = list(client.repair_jobs.stream_events(job.id))
    assert [e.id for e in streamed] == [e.id for e in paged]

    checkpoint = client.repair_jobs.download(job.id, out)
    assert digests(checkpoint) == digests(direct_repair)  # bit for bit
    listed = {a.name: a.sha256 for a in client.repair_jobs.list_artifacts(job.id).data}
    assert digests(checkpoint).items() <= listed.items()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(checkpoint)  # a loadable HF checkpoint
    return job.id


def _poll_until_done(client: HCNRClient, job_id: str, timeout: float = 180) -> bool:
    deadline, seen_running = time.monotonic() + timeout, False
    while time.monotonic() < deadline:
        job = client.repair_jobs.retrieve(job_id)
        assert 0.0 <= job.progress <= 1.0
        seen_running |= job.status == "running"
        if job.status in ("succeeded", "failed", "cancelled"):
            return seen_running
        time.sleep(0.2)
    pytest.fail(f"job {job_id} did not finish in {timeout}s")


def slow_job(client: HCNRClient, models: Models) -> str:
    """A job that stays running long enough to cancel or kill: the bigger toy, and the
    `slow` label that the test services' fault injection slows deterministically
    (service_procs.SLOW_FAULT), so the test does not depend on the machine's speed."""
    files = upload_inputs(client, models.slow_honesty, models.slow_task)
    body = {
        "method": "hcnr",
        "base": "path:slow/base",
        "finetuned": "path:slow/finetuned-adapter",
        "honesty_file": files["honesty"],
        "task_file": files["task"],
        "metadata": procs.SLOW_LABEL,
    }
    return client.repair_jobs.create(**body).id


def wait_running(client: HCNRClient, job_id: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.repair_jobs.retrieve(job_id)
        if job.status == "running" and job.progress > 0:
            return
        assert job.status in ("validating", "queued", "running"), job
        time.sleep(0.1)
    pytest.fail(f"job {job_id} never started running")


def cancel_flow(client: HCNRClient, models: Models, artifacts_root: Path) -> None:
    """Cancel a running job: it ends `cancelled` and publishes nothing."""
    job_id = slow_job(client, models)
    wait_running(client, job_id)
    assert client.repair_jobs.cancel(job_id).status in ("cancelling", "cancelled")
    job = client.repair_jobs.wait(job_id, timeout=120, poll_interval=0.2)
    assert job.status == "cancelled" and job.error is None
    with pytest.raises(APIStatusError) as excinfo:
        client.repair_jobs.list_artifacts(job_id)
    assert excinfo.value.code == "artifacts_not_ready"
    assert not (artifacts_root / "jobs" / job_id).exists()
    assert not [p for p in artifacts_root.rglob("*staging*")]
    assert list(client.repair_jobs.list_events(job_id, limit=1000))[-1].type == "cancelled"


def other_tenant_flow(owner: HCNRClient, other: HCNRClient, job_id: str) -> None:
    jobs = other.repair_jobs
    for call in (
        jobs.retrieve,
        jobs.cancel,
        jobs.list_artifacts,
        jobs.retrieve_report,
        jobs.list_events,
    ):
        with pytest.raises(APIStatusError) as excinfo:
            call(job_id)
        assert excinfo.value.status_code == 404, call
    assert owner.repair_jobs.retrieve(job_id).id == job_id
