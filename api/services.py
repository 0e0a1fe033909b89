"""What the routes do: uploads, job creation with validation, cancellation, artifacts.

Routes stay thin and call these; every lookup here is scoped by the caller's tenant.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from fastapi import UploadFile
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.errors import APIError, not_found
from api.schemas import FilePurpose, RepairJobCreate
from hcnr_core.data import MAX_REPORTED_PROBLEMS, parse_line
from hcnr_core.errors import (
    CheckpointError,
    DataValidationError,
    InvalidConfigError,
    TooManySamplesError,
)
from hcnr_core.registry import get_method
from store import job_state, repositories, secrets, webhooks
from store.models import Artifact, File, Job, JobLabel, Tenant, TenantSecret, new_id, utcnow
from store.references import check_reference
from store.settings import Settings
from store.storage import Storage, job_prefix

log = logging.getLogger("hcnr.api")
CHUNK = 1 << 20


# --- files -----------------------------------------------------------------------------


def _spool_upload(upload: UploadFile, target: IO[bytes], limit: int) -> tuple[int, str]:
    size, digest = 0, hashlib.sha256()
    while block := upload.file.read(CHUNK):
        size += len(block)
        if size > limit:
            raise APIError("payload_too_large", f"file exceeds the {limit}-byte limit")
        digest.update(block)
        target.write(block)
    return size, digest.hexdigest()


def store_upload(
    session: Session,
    storage: Storage,
    settings: Settings,
    tenant: Tenant,
    upload: UploadFile,
    purpose: FilePurpose,
) -> File:
    """Stream the upload to disk, validate it as JSONL samples, keep it in storage."""
    filename = Path(upload.filename or "upload.jsonl").name[:255]
    settings.scratch_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=settings.scratch_dir, suffix=".jsonl") as spooled:
        size, sha256 = _spool_upload(upload, spooled, settings.max_upload_bytes)
        spooled.flush()
        spooled.seek(0)
        n_samples = validate_jsonl_stream(
            spooled,
            filename,
            min_samples=1 if purpose == "eval" else settings.min_samples,
            max_samples=settings.max_samples,
            max_line_bytes=settings.max_line_bytes,
        )
        file = File(
            id=new_id("file"),
            tenant_id=tenant.id,
            purpose=purpose,
            filename=filename,
            bytes=size,
            sha256=sha256,
            samples=n_samples,
            storage_key="",
        )
        file.storage_key = f"files/{tenant.id}/{file.id}.jsonl"
        storage.put_file(Path(spooled.name), file.storage_key)
    session.add(file)
    session.commit()
    return file


def validate_jsonl_stream(
    handle: IO[bytes],
    source: str,
    *,
    min_samples: int,
    max_samples: int,
    max_line_bytes: int,
) -> int:
    """`hcnr_core.data.parse_jsonl`'s checks, line by line: memory stays at one line (at
    most `max_line_bytes`) whatever the file size. Returns the number of samples; raises
    DataValidationError with line numbers (TooManySamplesError, code too_many_samples,
    over `max_samples`, as hcnr_core.limits). Also refuses what would break later stages:
    over-long lines, nesting too deep for the JSON decoder, lone surrogates."""
    problems: list[tuple[int, str]] = []
    count, number = 0, 0
    while len(problems) < MAX_REPORTED_PROBLEMS:
        raw = handle.readline(max_line_bytes + 1)
        if not raw:
            break
        number += 1
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            problems.append((number, f"line longer than {max_line_bytes} bytes"))
            while (rest := handle.readline(CHUNK)) and not rest.endswith(b"\n"):
                pass  # skip the rest of the line without holding it
            continue
        problem = _line_problem(raw)
        if problem is None:
            count += 1 if raw.strip() else 0
        else:
            problems.append((number, problem))
    if not problems:
        if count < min_samples:
            problems.append((0, f"{count} samples; at least {min_samples} required"))
        elif count > max_samples:  # the same code and details as hcnr_core.limits
            raise TooManySamplesError(
                f"{source}: {count} samples; the limit is {max_samples}",
                limit="max_samples",
                value=count,
                allowed=max_samples,
            )
    if problems:
        raise DataValidationError(source, problems)
    return count


def _line_problem(raw: bytes) -> str | None:
    try:
        parse_line(raw)
    except ValueError as exc:
        return str(exc)
    return None


# Ids are `<prefix>_<hex>` (store.models.new_id) in 40-character columns: anything else
# (NUL bytes, which PostgreSQL refuses in text, over-long strings) is "not found" without
# a query, exactly like an id that does not exist.
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,40}")


def _well_formed(ident: str) -> bool:
    return ID_PATTERN.fullmatch(ident) is not None


def list_files(
    session: Session, tenant: Tenant, limit: int, purpose: str | None, after: str | None
) -> tuple[list[File], bool]:
    """A page of the tenant's files (newest first) and whether more follow. `after` is a
    file id of this tenant (another's, or a deleted one, is 404 like any unknown id)."""
    anchor = get_file(session, tenant, after) if after else None
    files = repositories.list_files(
        session, tenant.id, limit=limit + 1, purpose=purpose, after=anchor
    )
    return files[:limit], len(files) > limit


def delete_file(session: Session, storage: Storage, tenant: Tenant, file_id: str) -> File:
    """Remove the stored object and tombstone the row (finished jobs keep referring to
    it). Refused (409 file_in_use) while a job that is not finished reads it."""
    file = get_file(session, tenant, file_id)
    active = repositories.jobs_using_file(
        session, file.id, [s for s in job_state.STATES if s not in job_state.TERMINAL_STATES]
    )
    if active:
        ids = ", ".join(sorted(j.id for j in active)[:5])
        raise APIError("file_in_use", f"file {file_id!r} is read by unfinished job(s) {ids}")
    file.deleted_at = utcnow()
    session.commit()  # gone for every route first, then from storage
    storage.delete_prefix(file.storage_key)
    return file


def get_file(session: Session, tenant: Tenant, file_id: str) -> File:
    if not _well_formed(file_id):
        raise not_found("file", file_id)
    file = repositories.get_file(session, tenant.id, file_id)
    if file is None:
        raise not_found("file", file_id)
    return file


# --- secrets ---------------------------------------------------------------------------------


def set_secret(
    session: Session, settings: Settings, tenant: Tenant, name: str, value: str
) -> TenantSecret:
    if name not in secrets.SECRET_NAMES:
        known = ", ".join(sorted(secrets.SECRET_NAMES))
        raise APIError("invalid_request", f"unknown secret name {name!r}; known: {known}")
    row = secrets.put(session, settings, tenant.id, name, value)
    session.commit()
    return row


def list_secrets(session: Session, tenant: Tenant) -> list[TenantSecret]:
    return secrets.list_meta(session, tenant.id)


def get_secret(session: Session, tenant: Tenant, name: str) -> TenantSecret:
    row = secrets.get_meta(session, tenant.id, name) if name in secrets.SECRET_NAMES else None
    if row is None:
        raise not_found("secret", name)
    return row


def delete_secret(session: Session, tenant: Tenant, name: str) -> None:
    if name not in secrets.SECRET_NAMES or not secrets.delete(session, tenant.id, name):
        raise not_found("secret", name)
    session.commit()


# --- job creation ------------------------------------------------------------------------


def repair_config(body: RepairJobCreate, settings: Settings) -> Any:
    """The method's spec from the client's hyper-parameters, refused when the worker cannot
    run it (RAIT/DPO on a worker with several devices). RAIT/DPO pass only what the client
    set (`epochs` alone must not meet the default `steps`); HCNR keeps the API's documented
    defaults."""
    values = body.hyperparameters.model_dump(exclude_none=True, exclude_unset=body.method != "hcnr")
    try:
        config = get_method(body.method).make_config(values)
        settings.run_options.check_for(type(config))
    except (ValidationError, InvalidConfigError) as exc:
        raise APIError("invalid_hyperparameters", str(exc)) from exc
    return config


def check_webhook_url(url: str | None, settings: Settings) -> None:
    """Refuse webhooks to loopback, private or link-local addresses unless allowed."""
    if url is None:
        return
    try:
        webhooks.check_address(url, settings.webhook_allow_private)
    except webhooks.UnsafeWebhookAddress as exc:
        raise APIError("invalid_webhook_url", str(exc)) from exc


def check_integrations(body: RepairJobCreate, settings: Settings) -> None:
    """A job's trackers: one per type; an MLflow URI over http(s) only — `file:`,
    `sqlite:` and the like would name the worker's filesystem, not the tenant's — to a
    public address, by the webhooks' SSRF rule (`webhook_allow_private` lifts both)."""
    kinds = [i.type for i in body.integrations]
    if len(set(kinds)) != len(kinds):
        raise APIError("invalid_integration", "one integration per tracker type")
    for integration in body.integrations:
        uri = integration.uri
        if uri is None:
            continue
        if urlsplit(uri).scheme not in ("http", "https") or not urlsplit(uri).hostname:
            raise APIError(
                "invalid_integration",
                f"mlflow uri {uri!r}: the service logs to an http(s) tracking server only",
            )
        try:
            webhooks.check_address(uri, settings.webhook_allow_private)
        except webhooks.UnsafeWebhookAddress as exc:
            raise APIError("invalid_integration", f"mlflow uri: {exc}") from exc


def check_push_to_hub(session: Session, tenant: Tenant, body: RepairJobCreate) -> None:
    """A push needs the tenant's own hub token: refused now rather than after the repair.
    Whether it may write to the repository only the hub can say, at push time."""
    if body.push_to_hub is not None and secrets.get_meta(session, tenant.id, "hf_token") is None:
        raise APIError(
            "hub_token_missing",
            "push_to_hub needs this tenant's Hugging Face token with write access: "
            "PUT /v1/secrets/hf_token",
        )


def _input_file(files: dict[str, File], file_id: str, purpose: str) -> File:
    """`file_id` of `files` (the tenant's live files the job names), of `purpose`."""
    file = files.get(file_id)
    if file is None:
        raise not_found("file", file_id)
    if file.purpose != purpose:
        raise APIError(
            "invalid_file_purpose",
            f"file {file_id!r} has purpose {file.purpose!r}, expected {purpose!r}",
        )
    return file


def check_job(session: Session, settings: Settings, tenant: Tenant, body: RepairJobCreate) -> Any:
    """The quick checks, answered at once (4xx): the files and their purposes, the
    hyper-parameters, the webhook address and the model references (syntax, confinement
    to the models root, existence). What reads the inputs runs afterwards, in the
    validation task (worker/validation.py)."""
    named = (body.honesty_file, body.task_file, body.eval_file, body.validation_file)
    # one query for all of them (each of its own was a round trip of every POST)
    files = repositories.get_files(session, tenant.id, [f for f in named if f and _well_formed(f)])
    _input_file(files, body.honesty_file, "honesty")
    _input_file(files, body.task_file, "task")
    if body.eval_file:
        _input_file(files, body.eval_file, "eval")
    if body.validation_file:
        if body.method != "auto":
            raise APIError("invalid_request", "validation_file is read by method auto only")
        _input_file(files, body.validation_file, "eval")
    config = repair_config(body, settings)
    if body.method == "auto":  # every candidate's hyper-parameters, before anything runs
        from hcnr_core.auto import candidate_config

        for candidate in config.tried():
            candidate_config(candidate, config, settings.run_options)
    check_webhook_url(str(body.webhook_url) if body.webhook_url else None, settings)
    check_integrations(body, settings)
    check_push_to_hub(session, tenant, body)
    for reference in (body.base, body.finetuned):
        local = check_reference(reference, settings)  # hf:/s3:// are the validation's to fetch
        if local is not None:
            _check_is_checkpoint(reference, local)
    return config


def _check_is_checkpoint(reference: str, path: Path) -> None:
    """A directory that is no checkpoint at all (the usual wrong path) is refused at once;
    what the files hold is the validation task's to read."""
    if not any((path / name).is_file() for name in ("config.json", "adapter_config.json")):
        raise CheckpointError(
            f"{reference}: not a checkpoint directory (no config.json or adapter_config.json)"
        )


def _request_hash(body: RepairJobCreate) -> str:
    return hashlib.sha256(body.model_dump_json().encode()).hexdigest()


def _idempotent_replay(
    session: Session, tenant: Tenant, key: str | None, request_hash: str
) -> Job | None:
    if not key:
        return None
    job = repositories.find_idempotent_job(session, tenant.id, key)
    if job is not None and job.request_hash != request_hash:
        raise APIError(
            "idempotency_conflict", "this Idempotency-Key was used with a different body"
        )
    return job


def create_job(
    session: Session,
    storage: Storage,
    settings: Settings,
    validate: Callable[[str], None],
    tenant: Tenant,
    body: RepairJobCreate,
    idempotency_key: str | None,
) -> tuple[Job, bool]:
    """Check, record and send a job to validation (`validate`: the route's sends the
    message after the response); returns (job, created), the job `validating`. Replays
    return the job an earlier request with the same Idempotency-Key created."""
    request_hash = _request_hash(body)
    existing = _idempotent_replay(session, tenant, idempotency_key, request_hash)
    if existing is not None:
        return existing, False
    config = check_job(session, settings, tenant, body)
    job = _new_job(tenant, body, config, idempotency_key, request_hash)
    session.add(job)
    try:
        session.flush()
    except IntegrityError:  # a concurrent request with the same key won the race
        session.rollback()
        winner = _idempotent_replay(session, tenant, idempotency_key, request_hash)
        if winner is None:
            raise
        return winner, False
    repositories.add_event(session, job, "created", "job created; validating its inputs")
    session.commit()
    validate(job.id)  # api/deps.get_validate: sent after the response
    return job, True


def _new_job(
    tenant: Tenant,
    body: RepairJobCreate,
    config: Any,
    idempotency_key: str | None,
    request_hash: str,
) -> Job:
    return Job(
        id=new_id("job"),
        tenant_id=tenant.id,
        base_ref=body.base,
        finetuned_ref=body.finetuned,
        method=body.method,
        honesty_file_id=body.honesty_file,
        task_file_id=body.task_file,
        eval_file_id=body.eval_file,
        validation_file_id=body.validation_file,
        config=_stored_config(body, config),
        webhook_url=str(body.webhook_url) if body.webhook_url else None,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        labels=[JobLabel(key=k, value=v) for k, v in body.metadata.items()],
        validation_sent_at=utcnow(),
    )


def _stored_config(body: RepairJobCreate, config: Any) -> dict[str, Any]:
    """The hyper-parameters, and the integrations under `Job.INTEGRATIONS_KEY`."""
    stored = config.model_dump()
    if body.integrations:
        stored[Job.INTEGRATIONS_KEY] = [
            i.model_dump(exclude_none=True, exclude_defaults=True) | {"type": i.type}
            for i in body.integrations
        ]
    if body.push_to_hub is not None:
        stored[Job.PUSH_KEY] = body.push_to_hub.model_dump()
    return stored


def send_webhook(notify: Callable[[str], None], job_id: str) -> None:
    try:
        notify(job_id)
    except Exception:
        log.exception("could not send the webhook task of job %s", job_id)


def send_validation(validate: Callable[[str], None], job_id: str) -> None:
    try:
        validate(job_id)
    except Exception:  # the row is recorded; the reconciler re-sends a lost validation
        log.exception("could not send job %s to validation; the reconciler will retry", job_id)


# --- reading and cancelling jobs -------------------------------------------------------------


def get_job(session: Session, tenant: Tenant, job_id: str) -> Job:
    if not _well_formed(job_id):
        raise not_found("repair job", job_id)
    job = repositories.get_job(session, tenant.id, job_id)
    if job is None:
        raise not_found("repair job", job_id)
    return job


def cancel_job(session: Session, tenant: Tenant, job_id: str) -> Job:
    """queued → cancelled at once; running → cancelling (the worker stops between steps)."""
    job = get_job(session, tenant, job_id)
    try:
        job = job_state.cancel(session, job.id)
    except job_state.TransitionRefused as exc:
        raise APIError("job_not_cancellable", f"job is already {exc.status}") from None
    session.commit()
    return job


def delete_job(session: Session, storage: Storage, tenant: Tenant, job_id: str) -> str:
    """Delete a job and everything it published. Not yet running (validating, queued): it
    is cancelled first, then deleted. Running: cancellation is requested and the answer
    is 409 `job_not_finished` (delete it again once it is cancelled; the SDK retries)."""
    job = get_job(session, tenant, job_id)
    if job.status not in job_state.TERMINAL_STATES:
        try:
            job = job_state.cancel(session, job.id)
        except job_state.TransitionRefused:  # finished meanwhile, or cancelling already
            job = get_job(session, tenant, job_id)
        session.commit()
    if not job_state.delete_finished(session, job.id):
        raise APIError(
            "job_not_finished",
            f"job is {job.status}: cancellation requested; delete it once it is cancelled",
        )
    session.commit()
    storage.delete_prefix(job_prefix(job.id))  # after the row: nothing points at it
    return job.id


# --- artifacts -------------------------------------------------------------------------------


def succeeded_job(session: Session, tenant: Tenant, job_id: str) -> Job:
    job = get_job(session, tenant, job_id)
    if job.status != "succeeded":
        raise APIError("artifacts_not_ready", f"job is {job.status}; no artifacts yet")
    return job


def job_with_artifacts(session: Session, tenant: Tenant, job_id: str) -> Job:
    """A succeeded job whose artifacts are still stored (not expired by retention)."""
    job = succeeded_job(session, tenant, job_id)
    if job.artifacts_expired_at is not None:
        when = job.artifacts_expired_at.isoformat()
        raise APIError("artifacts_expired", f"the job's artifacts expired at {when} (retention)")
    return job


def get_artifact(session: Session, tenant: Tenant, job_id: str, name: str) -> Artifact:
    job = job_with_artifacts(session, tenant, job_id)
    if len(name) > 255 or any(ord(c) < 32 for c in name):
        raise not_found("artifact", name)
    artifact = repositories.get_artifact(session, job.id, name)
    if artifact is None:
        raise not_found("artifact", name)
    return artifact


def read_range(storage: Storage, key: str, start: int, end: int) -> Iterator[bytes]:
    """Bytes start..end (inclusive) of a stored file, in chunks."""
    with storage.open(key) as handle:
        handle.seek(start)
        remaining = end - start + 1
        while remaining > 0:
            block = handle.read(min(CHUNK, remaining))
            if not block:
                break
            remaining -= len(block)
            yield block


def tar_stream(storage: Storage, prefix: str, artifacts: list[Artifact]) -> Iterator[bytes]:
    """A POSIX tar of the artifacts, generated block by block (never held in memory)."""
    for artifact in artifacts:
        info = tarfile.TarInfo(f"{prefix}/{artifact.name}")
        info.size, info.mode = artifact.bytes, 0o644
        info.mtime = int(artifact.created_at.timestamp())
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        yield from read_range(storage, artifact.storage_key, 0, artifact.bytes - 1)
        padding = -artifact.bytes % tarfile.BLOCKSIZE
        if padding:
            yield b"\0" * padding
    yield b"\0" * (2 * tarfile.BLOCKSIZE)
