"""/ui: the web dashboard, served by the API (server-rendered HTML, inline SVG, a little
vanilla JavaScript; no build step, nothing fetched from elsewhere).

Routes stay thin: every read and write goes through the API's own route functions and
services (api.routes.*, api.services) with the session's tenant, so tenant isolation,
validation and error codes are exactly the API's. Not part of the OpenAPI document.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any, get_args

from fastapi import APIRouter, BackgroundTasks, Form, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, StreamingResponse
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError

from api import services
from api.deps import SessionDep, SettingsDep, StorageDep, ValidateDep
from api.errors import APIError
from api.routes import artifacts as artifact_routes
from api.routes import files as file_routes
from api.routes import jobs as job_routes
from api.routing import ReleasingRoute
from api.schemas import JobStatus, RepairJobCreate, RepairJobPublic
from api.ui import views
from api.ui.auth import (
    COOKIE,
    COOKIE_PATH,
    ApiSession,
    FormSession,
    LoginRequired,
    PageSession,
    UiSession,
    authenticate,
    csrf_token,
    same_origin,
)
from hcnr_core.errors import HCNRError
from store.db import session_scope

HERE = Path(__file__).parent
STATIC = {
    "ui.css": ("text/css; charset=utf-8", HERE / "static" / "ui.css"),
    "ui.js": ("text/javascript; charset=utf-8", HERE / "static" / "ui.js"),
}
STATUSES = get_args(JobStatus)
METHODS = ("hcnr", "auto", "rait", "dpo")
PURPOSES = {"honesty": "honesty", "task": "task", "eval": "eval", "validation": "eval"}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # no-referrer makes Chromium send Origin: null
    "Cache-Control": "no-store",
}
MAX_REPORT_BYTES = 64 << 20
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})  # no update after these
STREAM_POLL_SECONDS = 0.5
STREAM_MAX_SECONDS = 600  # then the browser's EventSource reconnects
templates = Jinja2Templates(directory=HERE / "templates")
templates.env.filters["fmt"] = views.fmt
templates.env.filters["human_bytes"] = views.human_bytes


class UiRoute(ReleasingRoute):
    """ReleasingRoute whose failures are pages: API errors render with their status and
    code, a missing session redirects to the login form (pages) or answers 401."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                response = await handler(request)
            except LoginRequired as exc:
                if exc.redirect:
                    response = RedirectResponse("/ui/login", status_code=303)
                else:
                    response = PlainTextResponse("login required", status_code=401)
            except APIError as exc:
                response = _error_page(request, exc.status, exc.code, exc.message)
            for name, value in SECURITY_HEADERS.items():
                response.headers.setdefault(name, value)
            return response

        return route


router = APIRouter(prefix="/ui", include_in_schema=False, route_class=UiRoute)


def api_call(route: Callable[..., Any], **available: Any) -> Any:
    """Call an API route function with the arguments of `available` it takes, by name: the
    dashboard does what the API does (same checks, same tenant scoping) and keeps working
    when a route gains or drops a dependency (settings, background tasks, ...)."""
    params = inspect.signature(route).parameters
    return route(**{name: value for name, value in available.items() if name in params})


def _page(request: Request, name: str, http_status: int = 200, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, context, status_code=http_status)


def _error_page(request: Request, status: int, code: str, message: str) -> HTMLResponse:
    ui = getattr(request.state, "ui", None)
    return _page(request, "error.html", status, ui=ui, code=code, message=message, status=status)


def _remember(request: Request, ui: UiSession) -> UiSession:
    request.state.ui = ui  # for the error page's header
    return ui


# --- static files, login, logout -------------------------------------------------------------


@router.get("/static/{name}")
def static(name: str) -> Response:
    if name not in STATIC:
        raise APIError("not_found", f"static file {name!r} not found")
    media_type, path = STATIC[name]
    return Response(path.read_bytes(), media_type=media_type)


@router.get("")
def index() -> RedirectResponse:
    return RedirectResponse("/ui/jobs", status_code=303)


@router.get("/login")
def login_form(request: Request) -> HTMLResponse:
    return _page(request, "login.html", ui=None, error=None)


@router.post("/login")
def login(
    request: Request, session: SessionDep, api_key: Annotated[str, Form(max_length=512)] = ""
) -> Response:
    same_origin(request)
    if not api_key or authenticate(session, api_key.strip()) is None:
        error = "That API key is not valid (or was revoked)."
        return _page(request, "login.html", 401, ui=None, error=error)
    response = RedirectResponse("/ui/jobs", status_code=303)
    response.set_cookie(
        COOKIE,
        api_key.strip(),
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout")
def logout(ui: FormSession) -> RedirectResponse:
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict")
    return response


# --- jobs list -------------------------------------------------------------------------------


def _filters(status: str, metadata: str) -> tuple[str | None, list[str]]:
    if status and status not in STATUSES:
        raise APIError("invalid_request", f"unknown status {status!r}")
    return status or None, views.parse_labels(metadata)


def _list_jobs(
    ui: UiSession,
    session: Any,
    status: str | None,
    labels: list[str],
    limit: int,
    cursor: str | None = None,
) -> Any:
    """The API's own job listing (scoped to the signed-in tenant), called in-process."""
    return api_call(
        job_routes.list_jobs,
        tenant=ui.tenant,
        session=session,
        limit=limit,
        cursor=cursor,
        status=status,
        metadata=labels,
    )


@router.get("/jobs")
def jobs_page(
    request: Request,
    ui: PageSession,
    session: SessionDep,
    status: str = "",
    metadata: str = "",
    cursor: str | None = None,
) -> HTMLResponse:
    _remember(request, ui)
    wanted, labels = _filters(status, metadata)
    page = _list_jobs(ui, session, wanted, labels, limit=25, cursor=cursor)
    return _page(
        request,
        "jobs.html",
        ui=ui,
        jobs=page.data,
        next_cursor=page.next_cursor,
        status=status,
        metadata=metadata,
        statuses=STATUSES,
        terminal=TERMINAL_STATES,
    )


def _snapshot(job: RepairJobPublic) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": job.status,
        "stage": job.stage,
        "progress": job.progress,
        "eta_seconds": job.eta_seconds,
    }


@router.get("/jobs/stream")
def jobs_stream(
    request: Request, ui: ApiSession, session: SessionDep, status: str = "", metadata: str = ""
) -> StreamingResponse:
    """Server-sent events: `jobs` with the rows whose status, stage or progress changed."""
    wanted, labels = _filters(status, metadata)
    _list_jobs(ui, session, wanted, labels, limit=1)  # bad filters fail now, not mid-stream
    factory = request.app.state.session_factory

    def poll() -> list[dict[str, Any]]:
        with session_scope(factory) as polled:
            page = _list_jobs(ui, polled, wanted, labels, limit=100)
            return [_snapshot(j) for j in page.data]

    async def source() -> AsyncIterator[str]:
        seen: dict[str, dict[str, Any]] = {}
        started, idle = time.monotonic(), 0
        while not await request.is_disconnected():
            rows = await run_in_threadpool(poll)
            changed = [r for r in rows if seen.get(r["id"]) != r]
            seen = {r["id"]: r for r in rows}
            if changed:
                idle = 0
                yield f"event: jobs\ndata: {json.dumps(changed)}\n\n"
            else:
                idle += 1
                if idle % 30 == 0:
                    yield ": keep-alive\n\n"
            if time.monotonic() - started > STREAM_MAX_SECONDS:
                return
            await asyncio.sleep(STREAM_POLL_SECONDS)

    return _event_stream(source())


def _event_stream(source: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        source,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# --- uploads and job creation ----------------------------------------------------------------


@router.get("/files/new")
def upload_form(request: Request, ui: PageSession) -> HTMLResponse:
    _remember(request, ui)
    return _page(request, "upload.html", ui=ui, uploaded=None, error=None)


@router.post("/files")
def upload(
    request: Request,
    ui: FormSession,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    file: UploadFile,
    purpose: Annotated[str, Form()] = "",
) -> HTMLResponse:
    _remember(request, ui)
    if purpose not in ("honesty", "task", "eval"):
        return _page(
            request,
            "upload.html",
            422,
            ui=ui,
            uploaded=None,
            error=_error("invalid_request", f"unknown purpose {purpose!r}"),
        )
    try:
        stored = api_call(
            file_routes.upload_file,
            tenant=ui.tenant,
            session=session,
            storage=storage,
            settings=settings,
            file=file,
            purpose=purpose,
        )
    except (APIError, HCNRError) as exc:
        status, error = _status_and_error(exc)
        return _page(request, "upload.html", status, ui=ui, uploaded=None, error=error)
    return _page(request, "upload.html", 201, ui=ui, uploaded=stored, error=None)


def _error(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"code": code, "message": message, "details": details}


def _status_and_error(exc: Exception) -> tuple[int, dict[str, Any]]:
    from api.errors import status_of

    if isinstance(exc, APIError):
        return exc.status, _error(exc.code, exc.message, exc.details)
    assert isinstance(exc, HCNRError)
    return status_of(exc.code), _error(exc.code, str(exc), exc.details())


def _new_job_page(request: Request, ui: UiSession, status: int = 200, **form: Any):
    defaults = {
        "method": "hcnr",
        "base": "",
        "finetuned": "",
        "hyperparameters": "{}",
        "metadata": "",
        "webhook_url": "",
        **{f"{name}_file": "" for name in PURPOSES},
        # One key per rendered form: submitting it twice (a double click, a reload of the
        # post) replays the first job instead of creating another (the API's Idempotency-Key).
        "idempotency_key": secrets.token_urlsafe(18),
    }
    return _page(
        request,
        "new_job.html",
        status,
        ui=ui,
        methods=METHODS,
        form={**defaults, **form.pop("form", {})},
        **{"error": None, **form},
    )


@router.get("/jobs/new")
def new_job_form(request: Request, ui: PageSession) -> HTMLResponse:
    _remember(request, ui)
    return _new_job_page(request, ui)


@router.post("/jobs")
def create_job(
    request: Request,
    ui: FormSession,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    validate: ValidateDep,
    method: Annotated[str, Form()] = "hcnr",
    base: Annotated[str, Form()] = "",
    finetuned: Annotated[str, Form()] = "",
    hyperparameters: Annotated[str, Form()] = "{}",
    metadata: Annotated[str, Form()] = "",
    webhook_url: Annotated[str, Form()] = "",
    honesty_file: Annotated[str, Form()] = "",
    task_file: Annotated[str, Form()] = "",
    eval_file: Annotated[str, Form()] = "",
    validation_file: Annotated[str, Form()] = "",
    idempotency_key: Annotated[str, Form(max_length=255)] = "",
    honesty_upload: UploadFile | None = None,
    task_upload: UploadFile | None = None,
    eval_upload: UploadFile | None = None,
    validation_upload: UploadFile | None = None,
) -> Response:
    """Upload the chosen files (each through POST /v1/files' code), then create the job
    through POST /v1/repair-jobs' code; on an error the form comes back filled in, with
    the ids of the files already uploaded."""
    _remember(request, ui)
    form = {
        "method": method,
        "base": base,
        "finetuned": finetuned,
        "hyperparameters": hyperparameters,
        "metadata": metadata,
        "webhook_url": webhook_url,
        "honesty_file": honesty_file.strip(),
        "task_file": task_file.strip(),
        "eval_file": eval_file.strip(),
        "validation_file": validation_file.strip(),
        "idempotency_key": idempotency_key,
    }
    uploads = {
        "honesty": honesty_upload,
        "task": task_upload,
        "eval": eval_upload,
        "validation": validation_upload,
    }
    try:
        for name, upload in uploads.items():
            if upload is not None and upload.filename:
                stored = api_call(
                    file_routes.upload_file,
                    tenant=ui.tenant,
                    session=session,
                    storage=storage,
                    settings=settings,
                    file=upload,
                    purpose=PURPOSES[name],
                )
                form[f"{name}_file"] = stored.id
        body = _job_body(form)
        job = api_call(
            job_routes.create_job,
            body=body,
            response=Response(),
            tenant=ui.tenant,
            session=session,
            storage=storage,
            settings=settings,
            validate=validate,
            idempotency_key=idempotency_key or None,
        )
    except (APIError, HCNRError) as exc:
        status, error = _status_and_error(exc)
        return _new_job_page(request, ui, status, form=form, error=error)
    return RedirectResponse(f"/ui/jobs/{job.id}", status_code=303)


def _job_body(form: dict[str, str]) -> RepairJobCreate:
    try:
        hyperparameters = json.loads(form["hyperparameters"] or "{}")
    except json.JSONDecodeError as exc:
        raise APIError("invalid_request", f"hyper-parameters are not JSON: {exc}") from exc
    labels: dict[str, str] = {}
    for pair in views.parse_labels(form["metadata"]):
        key, sep, value = pair.partition("=")
        if not sep:
            raise APIError("invalid_request", f"metadata {pair!r} is not key=value")
        labels[key.strip()] = value.strip()
    data: dict[str, Any] = {
        "method": form["method"],
        "base": form["base"].strip(),
        "finetuned": form["finetuned"].strip(),
        "honesty_file": form["honesty_file"],
        "task_file": form["task_file"],
        "hyperparameters": hyperparameters,
        "metadata": labels,
    }
    for optional in ("eval_file", "validation_file", "webhook_url"):
        if form[optional].strip():
            data[optional] = form[optional].strip()
    try:
        return RepairJobCreate.model_validate(data)
    except ValidationError as exc:
        details = [
            {"loc": list(e.get("loc", ())), "message": e.get("msg", "")} for e in exc.errors()
        ]
        raise APIError("invalid_request", "the job is invalid", details) from exc


# --- one job ---------------------------------------------------------------------------------


def _stored_json(session, storage, ui: UiSession, job_id: str, name: str) -> dict | None:
    """An artifact of the job parsed as JSON (the chosen method's report of an auto job)."""
    try:
        artifact = services.get_artifact(session, ui.tenant, job_id, name)
    except APIError:
        return None
    if artifact.bytes > MAX_REPORT_BYTES:
        return None
    with storage.open(artifact.storage_key) as handle:
        return json.loads(handle.read())


@router.get("/jobs/{job_id}")
def job_page(
    request: Request, ui: PageSession, session: SessionDep, storage: StorageDep, job_id: str
) -> HTMLResponse:
    _remember(request, ui)
    job = api_call(job_routes.get_job, job_id=job_id, tenant=ui.tenant, session=session)
    report, artifacts, method_report = None, None, None
    if job.status == "succeeded":
        report = api_call(
            artifact_routes.get_report, job_id=job_id, tenant=ui.tenant, session=session
        )
        if job.artifacts_expired_at is None:  # retention removed them otherwise: none shown
            artifacts = api_call(
                artifact_routes.list_artifacts, job_id=job_id, tenant=ui.tenant, session=session
            ).data
        method_report = report
        if job.method == "auto" and report.get("chosen_report") and artifacts is not None:
            method_report = _stored_json(session, storage, ui, job_id, report["chosen_report"])
    events = api_call(
        job_routes.list_events, job_id=job_id, tenant=ui.tenant, session=session, after=0, limit=200
    )
    metrics = job.metrics
    timings = job.stage_seconds or views.candidate_seconds(report)
    return _page(
        request,
        "job.html",
        ui=ui,
        job=job,
        terminal=job.status in TERMINAL_STATES,
        cancellable=job.status in ("validating", "queued", "running"),
        events=events.data,
        more_events=events.has_more,
        honesty=views.honesty_table(metrics),
        recovery=(metrics or {}).get("recovery"),
        bars=views.honesty_bars(metrics),
        reliability=views.reliability(metrics),
        timings=timings,
        stage_chart=views.charts.stage_bars(timings),
        frontier=views.frontier(report) if job.method == "auto" else None,
        selected=views.selected_cells(method_report),
        artifacts=artifacts,
    )


@router.get("/jobs/{job_id}/stream")
def job_stream(request: Request, ui: ApiSession, session: SessionDep, job_id: str):
    """Server-sent events of one job: `job` (status, stage, progress), `log` (its events)
    and `end` once it is finished."""
    api_call(
        job_routes.get_job, job_id=job_id, tenant=ui.tenant, session=session
    )  # 404 for another tenant's id
    factory = request.app.state.session_factory
    after = int(request.headers.get("last-event-id", "0") or 0)

    def poll(after: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        with session_scope(factory) as polled:
            job = api_call(job_routes.get_job, job_id=job_id, tenant=ui.tenant, session=polled)
            events = api_call(
                job_routes.list_events,
                job_id=job_id,
                tenant=ui.tenant,
                session=polled,
                after=after,
                limit=500,
            )
            return _snapshot(job), [e.model_dump(mode="json") for e in events.data]

    async def source() -> AsyncIterator[str]:
        nonlocal after
        last: dict[str, Any] | None = None
        started = time.monotonic()
        while not await request.is_disconnected():
            snapshot, events = await run_in_threadpool(poll, after)
            for event in events:
                after = event["id"]
                yield f"id: {event['id']}\nevent: log\ndata: {json.dumps(event)}\n\n"
            if snapshot != last:
                last = snapshot
                yield f"event: job\ndata: {json.dumps(snapshot)}\n\n"
            if snapshot["status"] in TERMINAL_STATES and not events:
                yield f"event: end\ndata: {json.dumps({'status': snapshot['status']})}\n\n"
                return
            if time.monotonic() - started > STREAM_MAX_SECONDS:
                return
            if not events:
                await asyncio.sleep(STREAM_POLL_SECONDS)

    return _event_stream(source())


@router.post("/jobs/{job_id}/cancel")
def cancel(
    request: Request,
    ui: FormSession,
    session: SessionDep,
    settings: SettingsDep,
    background: BackgroundTasks,
    job_id: str,
) -> RedirectResponse:
    _remember(request, ui)
    api_call(
        job_routes.cancel_job,
        job_id=job_id,
        tenant=ui.tenant,
        session=session,
        settings=settings,
        background=background,
        request=request,
    )
    return RedirectResponse(f"/ui/jobs/{job_id}", status_code=303)


@router.get("/jobs/{job_id}/artifacts/{name}")
def download(
    request: Request,
    ui: ApiSession,
    session: SessionDep,
    storage: StorageDep,
    job_id: str,
    name: str,
) -> Response:
    return api_call(
        artifact_routes.download_artifact,
        job_id=job_id,
        name=name,
        tenant=ui.tenant,
        session=session,
        storage=storage,
        range_header=request.headers.get("range"),
    )


@router.get("/jobs/{job_id}/checkpoint.tar")
def download_tar(ui: ApiSession, session: SessionDep, storage: StorageDep, job_id: str):
    return api_call(
        artifact_routes.download_checkpoint,
        job_id=job_id,
        tenant=ui.tenant,
        session=session,
        storage=storage,
    )


__all__ = ["csrf_token", "router"]
