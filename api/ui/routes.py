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
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, get_args

from fastapi import APIRouter, BackgroundTasks, Depends, Form, Request, Response, UploadFile
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
from api.routes import secrets as secret_routes
from api.routing import ReleasingRoute
from api.schemas import EstimatePublic, JobStatus, RepairJobCreate, RepairJobPublic, SecretSet
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
from hcnr_core.config import DEFAULT_METHOD
from hcnr_core.errors import HCNRError
from store.db import session_scope
from store.secrets import SECRET_NAMES

HERE = Path(__file__).parent
STATIC = {
    "ui.css": ("text/css; charset=utf-8", HERE / "static" / "ui.css"),
    "ui.js": ("text/javascript; charset=utf-8", HERE / "static" / "ui.js"),
}
STATUSES = get_args(JobStatus)
METHODS = ("auto", "hcnr", "rait", "dpo")  # the default first
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
templates.env.filters["percent"] = views.percent
templates.env.filters["safe_url"] = views.safe_url


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
        stored = _upload(ui, session, storage, settings, file, purpose)
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
        "method": DEFAULT_METHOD,
        "base": "",
        "finetuned": "",
        "hyperparameters": "{}",
        "metadata": "",
        "webhook_url": "",
        "push_to_hub": "",
        "hub_public": "",
        "integrations": "",
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
        **{"error": None, "estimate": None, **form},
    )


@router.get("/jobs/new")
def new_job_form(request: Request, ui: PageSession) -> HTMLResponse:
    _remember(request, ui)
    return _new_job_page(request, ui)


@dataclass
class JobForm:
    """The new-job form as posted: its text fields, and the files chosen for upload."""

    fields: dict[str, str]
    uploads: dict[str, UploadFile | None]


def job_form(
    method: Annotated[str, Form(max_length=16)] = DEFAULT_METHOD,
    base: Annotated[str, Form(max_length=2000)] = "",
    finetuned: Annotated[str, Form(max_length=2000)] = "",
    hyperparameters: Annotated[str, Form(max_length=100_000)] = "{}",
    metadata: Annotated[str, Form(max_length=10_000)] = "",
    webhook_url: Annotated[str, Form(max_length=2000)] = "",
    push_to_hub: Annotated[str, Form(max_length=300)] = "",
    hub_public: Annotated[str, Form(max_length=8)] = "",
    integrations: Annotated[str, Form(max_length=20_000)] = "",
    honesty_file: Annotated[str, Form(max_length=64)] = "",
    task_file: Annotated[str, Form(max_length=64)] = "",
    eval_file: Annotated[str, Form(max_length=64)] = "",
    validation_file: Annotated[str, Form(max_length=64)] = "",
    idempotency_key: Annotated[str, Form(max_length=255)] = "",
    honesty_upload: UploadFile | None = None,
    task_upload: UploadFile | None = None,
    eval_upload: UploadFile | None = None,
    validation_upload: UploadFile | None = None,
) -> JobForm:
    fields = {
        "method": method,
        "base": base,
        "finetuned": finetuned,
        "hyperparameters": hyperparameters,
        "metadata": metadata,
        "webhook_url": webhook_url,
        "push_to_hub": push_to_hub.strip(),
        "hub_public": "on" if hub_public else "",
        "integrations": integrations,
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
    return JobForm(fields, uploads)


JobFormDep = Annotated[JobForm, Depends(job_form)]


def _upload(ui: UiSession, session, storage, settings, file, purpose: str):
    """One file through POST /v1/files' own code, as this tenant."""
    return api_call(
        file_routes.upload_file,
        tenant=ui.tenant,
        session=session,
        storage=storage,
        settings=settings,
        file=file,
        purpose=purpose,
    )


def _upload_chosen(ui: UiSession, session, storage, settings, posted: JobForm) -> None:
    """Upload each chosen file (through POST /v1/files' code) and put its id in the form,
    so a form that comes back (an error, an estimate) keeps what was already uploaded."""
    for name, upload in posted.uploads.items():
        if upload is not None and upload.filename:
            stored = _upload(ui, session, storage, settings, upload, PURPOSES[name])
            posted.fields[f"{name}_file"] = stored.id


@router.post("/jobs")
def create_job(
    request: Request,
    ui: FormSession,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    validate: ValidateDep,
    posted: JobFormDep,
) -> Response:
    """Upload the chosen files, then create the job through POST /v1/repair-jobs' code;
    on an error the form comes back filled in, with the ids of the files already
    uploaded."""
    _remember(request, ui)
    form = posted.fields
    try:
        _upload_chosen(ui, session, storage, settings, posted)
        job = api_call(
            job_routes.create_job,
            body=_job_body(form),
            response=Response(),
            tenant=ui.tenant,
            session=session,
            storage=storage,
            settings=settings,
            validate=validate,
            idempotency_key=form["idempotency_key"] or None,
        )
    except (APIError, HCNRError) as exc:
        status, error = _status_and_error(exc)
        return _new_job_page(request, ui, status, form=form, error=error)
    return RedirectResponse(f"/ui/jobs/{job.id}", status_code=303)


@router.post("/jobs/estimate")
def estimate_job(
    request: Request,
    ui: FormSession,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    posted: JobFormDep,
) -> HTMLResponse:
    """The form's job estimated through POST /v1/repair-jobs/estimate's code, before it
    is created: the form comes back filled in with the estimate (or the refusal, with
    the estimate it carries for no_worker_fits). Nothing is created or queued; chosen
    files are uploaded, so their ids are in the form for the job."""
    _remember(request, ui)
    form = posted.fields
    try:
        _upload_chosen(ui, session, storage, settings, posted)
        estimate = api_call(
            job_routes.estimate_job,
            body=_job_body(form),
            tenant=ui.tenant,
            session=session,
            settings=settings,
        )
    except (APIError, HCNRError) as exc:
        status, error = _status_and_error(exc)
        refused = None
        if error["code"] == "no_worker_fits" and isinstance(error["details"], dict):
            refused = EstimatePublic.model_validate(error["details"])
        return _new_job_page(request, ui, status, form=form, error=error, estimate=refused)
    return _new_job_page(request, ui, form=form, estimate=estimate)


def _json_field(text: str, what: str, default: Any) -> Any:
    try:
        return json.loads(text) if text.strip() else default
    except json.JSONDecodeError as exc:
        raise APIError("invalid_request", f"{what} are not JSON: {exc}") from exc


def _job_body(form: dict[str, str]) -> RepairJobCreate:
    hyperparameters = _json_field(form["hyperparameters"], "hyper-parameters", {})
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
    integrations = _json_field(form.get("integrations", ""), "integrations", [])
    if integrations:
        # one object is one integration: the list brackets are easy to forget
        data["integrations"] = [integrations] if isinstance(integrations, dict) else integrations
    if form.get("push_to_hub"):
        # private unless the box is ticked: a repository made public by accident is a leak
        data["push_to_hub"] = {"repo_id": form["push_to_hub"], "private": not form["hub_public"]}
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
        tracking=views.tracking_runs(report, events.data),
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


# --- settings: the tenant's secrets --------------------------------------------------------


def _settings_page(
    request: Request, ui: UiSession, session, status: int = 200, **context: Any
) -> HTMLResponse:
    listed = api_call(secret_routes.list_secrets, tenant=ui.tenant, session=session).data
    return _page(
        request,
        "settings.html",
        status,
        ui=ui,
        secrets=listed,
        names=SECRET_NAMES,
        **{"error": None, "saved": None, "deleted": None, **context},
    )


@router.get("/settings")
def settings_page(
    request: Request, ui: PageSession, session: SessionDep, saved: str = "", deleted: str = ""
) -> HTMLResponse:
    """The tenant's secrets: names and dates (values never leave the API), set and delete."""
    _remember(request, ui)
    # only a known name is echoed back ("hf_token saved"): the query is the user's to edit
    return _settings_page(
        request,
        ui,
        session,
        saved=saved if saved in SECRET_NAMES else None,
        deleted=deleted if deleted in SECRET_NAMES else None,
    )


@router.post("/secrets")
def set_secret(
    request: Request,
    ui: FormSession,
    session: SessionDep,
    settings: SettingsDep,
    name: Annotated[str, Form(max_length=64)] = "",
    value: Annotated[str, Form()] = "",
) -> Response:
    """PUT /v1/secrets/{name}'s code; back to the settings page (a reload posts nothing)."""
    _remember(request, ui)
    try:
        body = SecretSet(value=value)
    except ValidationError as exc:
        # the value is never echoed: pydantic's error would carry it as `input`
        messages = "; ".join(e.get("msg", "") for e in exc.errors())
        error = _error("invalid_request", f"the value of {name or 'the secret'}: {messages}")
        return _settings_page(request, ui, session, 422, error=error)
    try:
        api_call(
            secret_routes.set_secret,
            name=name,
            body=body,
            tenant=ui.tenant,
            session=session,
            settings=settings,
        )
    except (APIError, HCNRError) as exc:
        status, error = _status_and_error(exc)
        return _settings_page(request, ui, session, status, error=error)
    return RedirectResponse(f"/ui/settings?saved={name}", status_code=303)


@router.post("/secrets/{name}/delete")
def delete_secret(
    request: Request, ui: FormSession, session: SessionDep, name: str
) -> RedirectResponse:
    """DELETE /v1/secrets/{name}'s code: only this tenant's secret of that name."""
    _remember(request, ui)
    api_call(secret_routes.delete_secret, name=name, tenant=ui.tenant, session=session)
    return RedirectResponse(f"/ui/settings?deleted={name}", status_code=303)


__all__ = ["csrf_token", "router"]
