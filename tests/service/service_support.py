"""Helpers shared by the service tests (the fixtures live in conftest.py)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient


@dataclass
class Models:
    root: Path
    honesty: Path
    task: Path
    slow_honesty: Path
    slow_task: Path


def digests(directory: Path, pattern: str = "*") -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.glob(pattern))
        if path.is_file() and path.name != "hcnr_report.json" and path.name != "README.md"
    }


def job_body(files: dict[str, str], **overrides) -> dict:
    body = {
        "method": "hcnr",
        "base": "path:base",
        "finetuned": "path:finetuned-adapter",
        "honesty_file": files["honesty"],
        "task_file": files["task"],
    }
    return {**body, **overrides}


# --- in-process app (TestClient) ----------------------------------------------------------


@dataclass
class InProcess:
    app: object
    settings: object
    queued: list[str]
    clients: dict[str, TestClient] = field(default_factory=dict)

    def upload(self, tenant: str, path: Path, purpose: str):
        files = {"file": (path.name, path.read_bytes(), "application/jsonl")}
        return self.clients[tenant].post("/v1/files", files=files, data={"purpose": purpose})

    def run_queued(self) -> list[str]:
        """What the Celery task does, in this process: runner.run_job per queued id."""
        from store.storage import make_storage
        from worker.runner import Context, run_job

        factory = self.app.state.session_factory
        notify = self.app.state.notify  # the delivery task, run in this process
        ctx = Context(self.settings, factory, make_storage(self.settings), notify=notify)
        statuses = [run_job(job_id, ctx) for job_id in self.queued]
        self.queued.clear()
        return statuses


def make_inprocess(tmp: Path, models: Models, **settings) -> InProcess:
    from api.app import create_app
    from store import repositories
    from store.db import session_scope
    from store.settings import Settings
    from worker.tasks import deliver_inline

    config = Settings(env="test", data_dir=tmp / "data", models_root=models.root, **settings)
    queued: list[str] = []
    app = create_app(config, enqueue=queued.append)
    app.state.notify = deliver_inline(app.state.session_factory, config)
    env = InProcess(app, config, queued)
    with session_scope(app.state.session_factory) as session:
        for tenant in ("alice", "bob"):
            _, key = repositories.create_api_key(session, tenant)
            env.clients[tenant] = TestClient(app, headers={"Authorization": f"Bearer {key}"})
    return env


def outcome(client: Any, response: Any) -> tuple[int | str, str | None]:
    """What became of a `POST /v1/repair-jobs`: (HTTP status, error code) when the quick
    checks refused it at once, ("failed", code) when the validation task refused it (the
    response was 201 `validating`), ("queued", None) when it was validated. In-process,
    the validation has run by the time the response comes back."""
    if response.status_code != 201:
        body = response.json() if response.content else {}
        error = body.get("error") if isinstance(body, dict) else None
        return response.status_code, (error or {}).get("code")
    created = response.json()
    assert created["status"] == "validating", created  # POST never waits for validation
    job = client.get(f"/v1/repair-jobs/{created['id']}").json()
    return job["status"], (job.get("error") or {}).get("code")


def refusal_message(client: Any, response: Any) -> str:
    """The error message of a refused job: the 4xx answer's, or the failed job's."""
    if response.status_code >= 400:
        return (response.json().get("error") or {}).get("message", "")
    job = client.get(f"/v1/repair-jobs/{response.json()['id']}").json()
    return (job.get("error") or {}).get("message", "")


def add_tenant_with_a_file(session: Any) -> None:
    """Tenant ten_1 and its file file_1: what a job row needs to exist (store-level tests)."""
    from store.models import File, Tenant

    session.add(Tenant(id="ten_1", name="t"))
    session.flush()
    session.add(
        File(
            id="file_1",
            tenant_id="ten_1",
            purpose="honesty",
            filename="h",
            bytes=1,
            sha256="0",
            samples=1,
            storage_key="k",
        )
    )
    session.flush()


def job_row(job_id: str, status: str, **fields: Any) -> Any:
    """A job of ten_1 reading file_1 (see add_tenant_with_a_file), with `fields` set."""
    from store.models import Job

    return Job(
        id=job_id,
        tenant_id="ten_1",
        status=status,
        base_ref="path:b",
        finetuned_ref="path:f",
        honesty_file_id="file_1",
        task_file_id="file_1",
        **fields,
    )
