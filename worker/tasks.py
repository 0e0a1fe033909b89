"""The thin Celery task: a job id in, the runner does the rest.

Nothing heavy (torch, CUDA) is imported here: the task body imports the runner, so CUDA
is initialised in the pool child that runs the job, never in the parent before fork.
"""

from __future__ import annotations

import os
from typing import Any

from celery import signals

from store.db import make_engine, make_session_factory, worker_engine_options
from store.storage import make_storage
from worker.celery_app import TASK_NAME, app, enqueue_with

_contexts: dict[int, Any] = {}


def context() -> Any:
    """One engine/storage per process (engines must not cross a fork)."""
    from worker.runner import Context

    pid = os.getpid()
    if pid not in _contexts:
        settings = app.conf.hcnr_settings
        engine = make_engine(settings.db_url, **_engine_options(settings))
        _contexts[pid] = Context(settings, make_session_factory(engine), make_storage(settings))
    return _contexts[pid]


def _engine_options(settings: Any) -> dict[str, Any]:
    return worker_engine_options(settings.db_url, settings.lease_seconds)


@app.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_repair_job(job_id: str) -> str:
    from worker.runner import run_job

    return run_job(job_id, context())


@signals.worker_ready.connect
def start_reconciler(**_: Any) -> None:
    from worker.reconciler import ReconcilerThread

    settings = app.conf.hcnr_settings
    factory = make_session_factory(make_engine(settings.db_url, **_engine_options(settings)))
    ReconcilerThread(factory, settings, enqueue_with(app)).start()
