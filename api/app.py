"""`create_app(settings)`: the HCNR repair-job API."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from api.errors import install_error_handlers
from api.key_cache import KeyCache
from api.limits import UploadSizeLimit
from api.metrics import Metrics, MetricsMiddleware
from api.routes import artifacts, files, health, jobs, secrets, webhooks
from api.ui import routes as ui
from hcnr_core.bounded import warm_up
from store.db import make_engine, make_session_factory, migrate, pool_options
from store.settings import Settings
from store.storage import make_storage


def create_app(
    settings: Settings | None = None,
    *,
    enqueue: Callable[[str], None] | None = None,
    notify: Callable[[str], None] | None = None,
    validate: Callable[[str], None] | None = None,
    run_migrations: bool | None = None,
) -> FastAPI:
    """`validate(job_id)` sends a new job to its validation task, `enqueue(job_id)` a
    validated job to the GPU workers and `notify(job_id)` its webhook delivery task; all
    default to the Celery producer. Tests pass their own `enqueue` (and `notify`); without
    a `validate` of theirs the validation then runs in this process, at once."""
    settings = settings or Settings()
    settings.ensure_dirs()
    if settings.validation_isolation and enqueue is not None and validate is None:
        # Validation in this process (tests, embedding): its forkserver imports torch, so
        # start it now. Served by Celery, the validation worker warms its own.
        threading.Thread(target=warm_up, daemon=True, name="hcnr-validation-warmup").start()
    if settings.auto_migrate if run_migrations is None else run_migrations:
        migrate(settings.db_url)
    app = FastAPI(
        title="HCNR repair-job service",
        version="1.0.0",
        description="Repair the honesty of fine-tuned LLMs (HCNR) as asynchronous jobs.",
    )
    engine = make_engine(
        settings.db_url,
        **pool_options(settings.db_url, settings.db_pool_size, settings.db_max_overflow),
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    app.state.storage = make_storage(settings)
    app.state.key_cache = KeyCache(settings.auth_cache_seconds)
    producers = _broker(settings, app.state.session_factory, enqueue, notify)
    app.state.enqueue, app.state.broker_check, app.state.notify, celery_validate = producers
    app.state.validate = validate or celery_validate or _inline_validation(app, settings)
    app.state.metrics = Metrics(app.state.session_factory)
    for module in (files, jobs, artifacts, secrets, health, ui):
        app.include_router(module.router)
    app.include_router(webhooks.router)
    install_error_handlers(app)
    app.add_middleware(UploadSizeLimit, max_bytes=settings.max_upload_bytes)
    # the dashboard's job form carries up to four uploads
    app.add_middleware(UploadSizeLimit, max_bytes=4 * settings.max_upload_bytes, path_prefix="/ui")
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    return app


def create_served_app() -> FastAPI:
    """The app of one process of `hcnr serve --workers N` (uvicorn builds it in each, with
    settings from the environment); `hcnr serve` migrated the database before."""
    return create_app(run_migrations=False)


def _preload_transformers() -> None:
    """transformers resolves its classes lazily and that is not thread-safe: the first
    concurrent job validations (threadpool) failed with `ImportError: cannot import name
    'AutoTokenizer'` (tests/reliability/test_load.py). Resolve them once, up front."""
    from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401


def _inline_validation(app: FastAPI, settings: Settings) -> Callable[[str], None]:
    """With a test's own `enqueue` and no `validate`: the validation in this process
    (worker.validation.inline), at once, sending a validated job to that `enqueue`. Only
    then does this process need transformers: a served API validates in the validator."""
    from worker.validation import inline

    _preload_transformers()

    state = app.state  # read at call time: tests swap the producers after creation

    def enqueue(job_id: str) -> None:
        state.enqueue(job_id)

    def notify(job_id: str) -> None:
        state.notify(job_id)

    return inline(state.session_factory, state.storage, settings, enqueue, notify)


def _broker(
    settings: Settings,
    session_factory: Any,
    enqueue: Callable[[str], None] | None,
    notify: Callable[[str], None] | None,
):
    """The Celery producer, unless a test gives its own `enqueue` (and `notify`: none
    given with an own `enqueue` sends no webhooks)."""
    from worker.celery_app import (
        broker_check_with,
        enqueue_with,
        make_celery,
        notify_with,
        validate_with,
    )

    celery = make_celery(settings)
    if enqueue is not None:
        return enqueue, lambda: None, notify or (lambda _job_id: None), None
    producers = enqueue_with(celery), broker_check_with(celery)
    return *producers, notify or notify_with(celery, session_factory), validate_with(celery)
