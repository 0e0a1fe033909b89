"""/v1/repair-jobs: create, list, get, cancel, delete, events (paginated and a live
stream)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from api import estimates, services
from api.deps import SessionDep, SettingsDep, StorageDep, TenantDep, ValidateDep
from api.errors import ERROR_RESPONSES, APIError
from api.routing import ReleasingRoute
from api.schemas import (
    EstimatePublic,
    EventList,
    EventPublic,
    HubPushPublic,
    JobStatus,
    RepairJobCreate,
    RepairJobDeleted,
    RepairJobList,
    RepairJobPublic,
)
from store import repositories
from store.db import session_scope
from store.job_state import TERMINAL_STATES
from store.models import Job, JobEvent

POLL_SECONDS = 0.5
KEEPALIVE_POLLS = 30

router = APIRouter(
    prefix="/v1/repair-jobs",
    tags=["repair-jobs"],
    responses=ERROR_RESPONSES,
    route_class=ReleasingRoute,
)


def job_public(job: Job) -> RepairJobPublic:
    error = None
    if job.error_code:
        error = {
            "code": job.error_code,
            "message": job.error_message or "",
            "details": job.error_details,
        }
    return RepairJobPublic(
        id=job.id,
        method=job.method,
        status=job.status,
        stage=job.stage,
        progress=job.progress,
        eta_seconds=job.eta_seconds,
        base=job.base_ref,
        finetuned=job.finetuned_ref,
        honesty_file=job.honesty_file_id,
        task_file=job.task_file_id,
        eval_file=job.eval_file_id,
        validation_file=job.validation_file_id,
        hyperparameters=job.hyperparameters,
        integrations=job.integrations,
        push_to_hub=hub_push_public(job),
        metadata=job.metadata_dict,
        webhook_url=job.webhook_url,
        webhook_status=job.webhook_status,
        stage_seconds=job.stage_seconds or {},
        metrics=job.metrics,
        error=error,
        attempts=job.attempts,
        created_at=job.created_at,
        queued_at=job.queued_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        artifacts_expired_at=job.artifacts_expired_at,
        base_resolved=job.base_resolved,
        finetuned_resolved=job.finetuned_resolved,
    )


def hub_push_public(job: Job) -> HubPushPublic | None:
    """The push target (the job's config) with its outcome (the job's report)."""
    target = job.push_target
    if target is None:
        return None
    outcome = dict((job.report or {}).get("hub_push") or {})
    if not outcome:
        skipped = job.status in TERMINAL_STATES and job.status != "succeeded"
        outcome = {"status": "skipped" if skipped else "pending"}
    fields = ("status", "commit_sha", "commit_url", "url", "error")
    return HubPushPublic(**target, **{k: outcome.get(k) for k in fields if k in outcome})


def event_public(event: JobEvent) -> EventPublic:
    return EventPublic.model_validate(event, from_attributes=True)


@router.post(
    "",
    status_code=201,
    response_model=RepairJobPublic,
    responses={200: {"model": RepairJobPublic, "description": "Idempotent replay"}},
)
def create_job(
    body: RepairJobCreate,
    response: Response,
    tenant: TenantDep,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    validate: ValidateDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> RepairJobPublic:
    """Create a repair job. The quick checks (files and their purposes, hyper-parameters,
    model references, webhook address) answer at once with a 4xx; the job is then recorded
    with status `validating` and this returns. A validation task reads the inputs (every
    sample with the model's tokenizer and chat template, both checkpoints, the limits) and
    moves the job to `queued`, or to `failed` with the error's `code`, `message` and
    `details` (line-numbered problems, the limit exceeded)."""
    job, created = services.create_job(
        session, storage, settings, validate, tenant, body, idempotency_key
    )
    if not created:
        response.status_code = 200
    return job_public(job)


@router.post(
    "/estimate",
    response_model=EstimatePublic,
    responses={422: {"description": "Invalid input, or no_worker_fits (details: the estimate)"}},
)
def estimate_job(
    body: RepairJobCreate, tenant: TenantDep, session: SessionDep, settings: SettingsDep
) -> EstimatePublic:
    """What the job `body` describes would cost, without creating it: parameters, tokens,
    peak memory per device (whole model and layer by layer), wall time, and whether a
    worker can run it (422 `no_worker_fits` when none can; `details` holds the estimate).
    The quick checks of job creation apply; only config.json and safetensors headers are
    read (hcnr_core/estimate.py)."""
    return estimates.estimate_job(session, settings, tenant, body)


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        when = datetime.fromisoformat(created)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError("invalid_cursor", "malformed cursor") from exc
    # Cursors we issue carry an aware timestamp and a job id; anything else is forged.
    if when.tzinfo is None or not services.ID_PATTERN.fullmatch(job_id):
        raise APIError("invalid_cursor", "malformed cursor")
    return when, job_id


def _encode_cursor(job: Job) -> str:
    return base64.urlsafe_b64encode(f"{job.created_at.isoformat()}|{job.id}".encode()).decode()


def _labels(metadata: list[str]) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in metadata]
    if any(len(pair) != 2 for pair in pairs):
        raise APIError("invalid_request", "metadata filters are key=value")
    if any("\x00" in item for item in metadata):  # PostgreSQL refuses NUL in text
        raise APIError("invalid_request", "metadata filters must not contain NUL")
    return dict(pairs)


@router.get("", response_model=RepairJobList)
def list_jobs(
    tenant: TenantDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
    status: JobStatus | None = None,
    metadata: Annotated[list[str], Query(description="key=value, repeatable")] = [],  # noqa: B006
) -> RepairJobList:
    """Newest first, cursor-paginated; filter by status and metadata."""
    after = _decode_cursor(cursor) if cursor else None
    jobs = repositories.list_jobs(
        session, tenant.id, limit=limit + 1, after=after, status=status, labels=_labels(metadata)
    )
    page = jobs[:limit]
    next_cursor = _encode_cursor(page[-1]) if len(jobs) > limit else None
    return RepairJobList(
        data=[job_public(j) for j in page], has_more=len(jobs) > limit, next_cursor=next_cursor
    )


@router.get("/{job_id}", response_model=RepairJobPublic)
def get_job(job_id: str, tenant: TenantDep, session: SessionDep) -> RepairJobPublic:
    return job_public(services.get_job(session, tenant, job_id))


@router.post(
    "/{job_id}/cancel",
    response_model=RepairJobPublic,
    responses={409: {"description": "The job already finished"}},
)
def cancel_job(
    job_id: str,
    tenant: TenantDep,
    session: SessionDep,
    settings: SettingsDep,  # unused here; kept: the dashboard (api/ui) passes it
    background: BackgroundTasks,
    request: Request,
) -> RepairJobPublic:
    """Queued jobs are cancelled at once; running ones go to `cancelling` first."""
    job = services.cancel_job(session, tenant, job_id)
    if job.status == "cancelled" and job.webhook_url:  # a delivery task, after the response
        background.add_task(services.send_webhook, request.app.state.notify, job.id)
    return job_public(job)


@router.delete(
    "/{job_id}",
    response_model=RepairJobDeleted,
    responses={409: {"description": "Running: cancellation requested, delete it again later"}},
)
def delete_job(
    job_id: str, tenant: TenantDep, session: SessionDep, storage: StorageDep
) -> RepairJobDeleted:
    """Delete a job, its events and everything it published (checkpoint, reports). A job
    not yet running is cancelled first; a running one is asked to cancel and the answer is
    409 `job_not_finished` until it has stopped."""
    return RepairJobDeleted(id=services.delete_job(session, storage, tenant, job_id), deleted=True)


@router.get("/{job_id}/events", response_model=EventList)
def list_events(
    job_id: str,
    tenant: TenantDep,
    session: SessionDep,
    after: Annotated[int, Query(ge=0, description="Events with an id above this")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> EventList:
    job = services.get_job(session, tenant, job_id)
    events = repositories.list_events(session, job.id, after, limit + 1)
    page = events[:limit]
    more = len(events) > limit
    return EventList(
        data=[event_public(e) for e in page],
        has_more=more,
        next_cursor=page[-1].id if more else None,
    )


@router.get(
    "/{job_id}/events/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-sent events"}},
)
def stream_events(
    job_id: str,
    request: Request,
    tenant: TenantDep,
    session: SessionDep,
    last_event_id: Annotated[int, Header(ge=0)] = 0,
) -> StreamingResponse:
    """Live events as server-sent events; the stream ends when the job is finished."""
    job = services.get_job(session, tenant, job_id)
    factory = request.app.state.session_factory
    return StreamingResponse(
        _event_source(factory, job.id, last_event_id, request),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _poll(factory, job_id: str, after: int) -> tuple[list[EventPublic], str]:
    with session_scope(factory) as session:
        events = repositories.list_events(session, job_id, after, 500)
        status = repositories.get_job_by_id(session, job_id).status
        return [event_public(e) for e in events], status


async def _event_source(factory, job_id: str, after: int, request: Request) -> AsyncIterator[str]:
    idle_polls = 0
    while not await request.is_disconnected():
        events, status = await run_in_threadpool(_poll, factory, job_id, after)
        for event in events:
            after = event.id
            yield f"id: {event.id}\nevent: {event.type}\ndata: {event.model_dump_json()}\n\n"
        if status in TERMINAL_STATES and not events:
            yield f"event: end\ndata: {json.dumps({'status': status})}\n\n"
            return
        idle_polls = 0 if events else idle_polls + 1
        if idle_polls and idle_polls % KEEPALIVE_POLLS == 0:
            yield ": keep-alive\n\n"
        if not events:
            await asyncio.sleep(POLL_SECONDS)
