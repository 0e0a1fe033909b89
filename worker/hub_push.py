"""The optional push of a succeeded job's checkpoint to the Hugging Face Hub (issue 17):
one attempt per call of the Celery task `hcnr.push_to_hub` (worker/tasks.py), sent with
the job's webhook when it reaches a terminal state (worker.celery_app.notify_with) and
run on the webhook queue, so a GPU worker is never held by an upload.

What is pushed is exactly what the job published (its artifact rows: weights, config,
tokenizer, README card, the method's report), read from the artifact store and checked
against the rows' sha256, with the tenant's own `hf_token` secret, to
`settings.hub_endpoint`. The outcome goes into the job's report under `hub_push`
(status, repo, commit sha and URL, or the error) with `hub_push_*` events; a failed push
never changes the job's own status — its checkpoint stays downloadable.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from store import repositories, secrets
from store.db import session_scope
from store.hub_push import HubPushError, HubTarget, push
from store.settings import Settings
from store.storage import Storage

log = logging.getLogger("hcnr.hub_push")
REPORT_KEY = "hub_push"
DONE = ("succeeded", "failed")


class RetryablePush(Exception):
    """429, 5xx or a network error: the task tries again later."""


def push_job(
    session_factory: sessionmaker[Session],
    settings: Settings,
    storage: Storage,
    job_id: str,
    *,
    final: bool,
) -> str | None:
    """One attempt at pushing a succeeded job's checkpoint (None: nothing to push, or
    already pushed — a redelivered message pushes nothing twice). A retryable failure
    raises RetryablePush unless this is the `final` attempt, which records `failed`."""
    with session_scope(session_factory) as session:
        job = repositories.get_job_by_id(session, job_id)
        if job is None or job.status != "succeeded" or job.push_target is None:
            return None
        if (job.report or {}).get(REPORT_KEY, {}).get("status") in DONE:
            return None
        target = HubTarget.from_dict(job.push_target)
        first = (job.report or {}).get(REPORT_KEY) is None
        if first:
            _record(session, job, {"status": "pushing"}, "hub_push_started", target)
        expired = job.artifacts_expired_at is not None
        token = secrets.value(session, settings, job.tenant_id, "hf_token")
        artifacts = repositories.list_artifacts(session, job_id)
        digests = {a.name: a.sha256 for a in artifacts}
        artifacts = [(a.name, a.storage_key) for a in artifacts]
    try:
        if expired:
            raise HubPushError("artifacts_expired", "the job's artifacts were removed")
        if not token:  # deleted since the job was created
            raise HubPushError(
                "hub_token_missing", "no hf_token secret: PUT /v1/secrets/hf_token, then re-run"
            )
        with _local_files(storage, artifacts, settings.scratch_dir) as files:
            _check_digests(files, digests)
            outcome = push(
                files,
                target,
                token,
                settings.hub_endpoint,
                default_message=f"Upload HCNR-repaired checkpoint ({job_id})",
            )
        outcome["status"] = "succeeded"
        event = "hub_push_succeeded"
    except HubPushError as exc:
        log.warning("hub push of %s to %s failed: %s", job_id, target.repo_id, exc)
        if exc.retryable and not final:
            _update(session_factory, job_id, {"status": "retrying"}, "hub_push_retrying", exc)
            raise RetryablePush(str(exc)) from exc
        outcome = {"status": "failed", "error": {"code": exc.code, "message": str(exc)[:2000]}}
        event = "hub_push_failed"
    _update(session_factory, job_id, outcome, event)
    return outcome["status"]


def _check_digests(files: dict[str, Path], digests: dict[str, str]) -> None:
    """What leaves for the hub is what the job published: a file changed or damaged in
    the artifact store since is refused, not pushed under the job's name."""
    from hcnr_core.writer import sha256_file

    for name, path in files.items():
        if sha256_file(path) != digests[name]:
            raise HubPushError(
                "checksum_mismatch", f"{name}: its sha256 is no longer the published one"
            )


@contextmanager
def _local_files(
    storage: Storage, artifacts: list[tuple[str, str]], scratch: Path
) -> Iterator[dict[str, Path]]:
    """name -> local path of each artifact: the store's own file when it is local, else a
    download into a scratch directory removed afterwards."""
    tmp: Path | None = None
    try:
        files: dict[str, Path] = {}
        for name, key in artifacts:
            local = storage.local_path(key)
            if local is None:
                if tmp is None:
                    scratch.mkdir(parents=True, exist_ok=True)
                    tmp = Path(tempfile.mkdtemp(prefix="hub-push-", dir=scratch))
                local = storage.get_file(key, tmp / name)
            files[name] = local
        yield files
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _update(
    session_factory: sessionmaker[Session],
    job_id: str,
    outcome: dict[str, Any],
    event: str,
    error: HubPushError | None = None,
) -> None:
    with session_scope(session_factory) as session:
        job = repositories.get_job_by_id(session, job_id)
        if job is None:  # deleted meanwhile
            return
        _record(session, job, outcome, event, HubTarget.from_dict(job.push_target), error)


def _record(
    session: Session,
    job: Any,
    outcome: dict[str, Any],
    event: str,
    target: HubTarget,
    error: HubPushError | None = None,
) -> None:
    # A new dict: the JSON column sees an assignment, not an in-place change
    job.report = {**(job.report or {}), REPORT_KEY: outcome}
    data = {"repo_id": target.repo_id, **outcome}
    if error is not None:
        data["error"] = {"code": error.code, "message": str(error)[:2000]}
    text = {
        "hub_push_started": f"pushing the checkpoint to {target.repo_id}",
        "hub_push_retrying": f"hub push to {target.repo_id} will be retried ({error})",
        "hub_push_succeeded": f"pushed to {target.repo_id} ({outcome.get('commit_sha')})",
        "hub_push_failed": f"hub push to {target.repo_id} failed ({outcome.get('error')})",
    }[event]
    repositories.add_event(session, job, event, text, data)
