"""The thin Celery task: a job id in, the runner does the rest.

Nothing heavy (torch, CUDA) is imported here: the task body imports the runner, so CUDA
is initialised in the pool child that runs the job, never in the parent before fork.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from celery import signals

from store.db import make_engine, make_session_factory, worker_engine_options
from store.storage import make_storage
from worker.celery_app import (
    HUB_PUSH_TASK,
    TASK_NAME,
    VALIDATION_TASK,
    WEBHOOK_TASK,
    app,
    enqueue_with,
    notify_with,
    validate_with,
)
from worker.hub_push import RetryablePush
from worker.webhooks import RetryableDelivery

_contexts: dict[int, Any] = {}


def context() -> Any:
    """One engine/storage per process (engines must not cross a fork)."""
    from worker.runner import Context

    pid = os.getpid()
    if pid not in _contexts:
        settings = app.conf.hcnr_settings
        engine = make_engine(settings.db_url, **_engine_options(settings))
        factory = make_session_factory(engine)
        _contexts[pid] = Context(
            settings, factory, make_storage(settings), notify=notify_with(app, factory)
        )
    return _contexts[pid]


_webhook_contexts: dict[int, tuple[Any, Any]] = {}
_inline: ContextVar[tuple[Any, Any] | None] = ContextVar("hcnr_inline_webhooks", default=None)


def _webhook_context() -> tuple[Any, Any]:
    """(session factory, settings) for deliveries: no runner (no torch) needed."""
    inline = _inline.get()
    if inline is not None:
        return inline
    pid = os.getpid()
    if pid not in _webhook_contexts:
        settings = app.conf.hcnr_settings
        engine = make_engine(settings.db_url, **_engine_options(settings))
        _webhook_contexts[pid] = (make_session_factory(engine), settings)
    return _webhook_contexts[pid]


def _engine_options(settings: Any) -> dict[str, Any]:
    return worker_engine_options(settings.db_url, settings.lease_seconds)


@app.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_repair_job(job_id: str) -> str:
    from worker.runner import run_job

    return run_job(job_id, context())


@app.task(name=VALIDATION_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def validate_repair_job(job_id: str) -> str:
    from worker.validation import validate_job

    factory, settings = _webhook_context()  # database and settings only: no runner
    storage = _storages.setdefault(os.getpid(), make_storage(settings))
    notify = notify_with(app, factory)
    return validate_job(job_id, factory, storage, settings, enqueue_with(app), notify)


_storages: dict[int, Any] = {}
_WEBHOOK_SETTINGS = app.conf.hcnr_settings


@app.task(
    name=WEBHOOK_TASK,
    bind=True,
    acks_late=True,
    ignore_result=True,
    autoretry_for=(RetryableDelivery,),
    # countdown of retry n (from 0): backoff * 2**n seconds (2, 4, 8 s by default)
    retry_backoff=_WEBHOOK_SETTINGS.webhook_backoff_seconds or False,
    retry_backoff_max=600,
    retry_jitter=False,
    retry_kwargs={"countdown": 0},  # used only when the backoff is 0
    max_retries=None,  # the body stops after settings.webhook_attempts attempts
)
def deliver_webhook(self: Any, job_id: str) -> str | None:
    from worker.webhooks import deliver_job

    factory, settings = _webhook_context()
    final = self.request.retries + 1 >= settings.webhook_attempts
    return deliver_job(factory, settings, job_id, final=final)


@app.task(
    name=HUB_PUSH_TASK,
    bind=True,
    acks_late=True,
    ignore_result=True,
    autoretry_for=(RetryablePush,),
    # the webhooks' schedule: backoff * 2**n seconds, settings.webhook_attempts attempts
    retry_backoff=_WEBHOOK_SETTINGS.webhook_backoff_seconds or False,
    retry_backoff_max=600,
    retry_jitter=False,
    retry_kwargs={"countdown": 0},
    max_retries=None,
)
def push_to_hub(self: Any, job_id: str) -> str | None:
    from store.storage import make_storage
    from worker.hub_push import push_job

    factory, settings = _webhook_context()
    final = self.request.retries + 1 >= settings.webhook_attempts
    return push_job(factory, settings, make_storage(settings), job_id, final=final)


def deliver_inline(session_factory: Any, settings: Any) -> Callable[[str], None]:
    """Run the delivery and push tasks in this process (Celery's eager `apply`, retries
    included, without their countdown) against these settings and database: for tests
    and embedding without a broker."""

    def notify(job_id: str) -> None:
        with _using(session_factory, settings):
            deliver_webhook.apply(args=[job_id])
            push_to_hub.apply(args=[job_id])

    return notify


@contextmanager
def _using(session_factory: Any, settings: Any) -> Iterator[None]:
    token = _inline.set((session_factory, settings))
    try:
        yield
    finally:
        _inline.reset(token)


def _consumed(sender: Any) -> set[str]:
    try:
        return {q.name for q in sender.task_consumer.queues}
    except AttributeError:
        return set()


@signals.worker_ready.connect
def warm_validation(sender: Any = None, **_: Any) -> None:
    """A worker that consumes the validation queue starts its validation forkserver now
    (it imports torch once), not on the first job's time limit."""
    from worker.celery_app import VALIDATION_QUEUE

    if VALIDATION_QUEUE in _consumed(sender) and app.conf.hcnr_settings.validation_isolation:
        import threading

        from hcnr_core.bounded import warm_up

        threading.Thread(target=warm_up, daemon=True, name="hcnr-validation-warmup").start()


@signals.worker_ready.connect
def start_reconciler(sender: Any = None, **_: Any) -> None:
    """Workers of the job queue run the reconciler (leases, lost messages, lost
    validations); a validation-only worker does not."""
    from worker.celery_app import QUEUE
    from worker.reconciler import ReconcilerThread

    consumed = _consumed(sender)
    if QUEUE not in consumed:
        return
    logging.getLogger("hcnr.reconciler").info("reconciler started (queues %s)", sorted(consumed))

    settings = app.conf.hcnr_settings
    factory = make_session_factory(make_engine(settings.db_url, **_engine_options(settings)))
    ReconcilerThread(
        factory, settings, enqueue_with(app), notify_with(app, factory), validate_with(app)
    ).start()


@signals.celeryd_init.connect
def start_metrics(sender: Any = None, **_: Any) -> None:
    """The worker's own Prometheus endpoint (HCNR_WORKER_METRICS_PORT), in its main
    process before the pool forks: the children inherit the multiprocess directory."""
    from worker import metrics

    settings = app.conf.hcnr_settings
    try:
        metrics.start_exporter(settings)
    except OSError as exc:
        # Celery logs and swallows a signal handler's exception, and the worker would run
        # unmonitored: a port that cannot be bound stops it (SystemExit passes through).
        where = f"{settings.worker_metrics_host}:{settings.worker_metrics_port}"
        raise SystemExit(f"worker metrics: cannot listen on {where}: {exc}") from exc


@signals.worker_process_init.connect
def metrics_in_child(**_: Any) -> None:
    from worker import metrics

    metrics.in_child()


@signals.worker_shutdown.connect
def stop_metrics(**_: Any) -> None:
    from worker import metrics

    metrics.stop_exporter()
