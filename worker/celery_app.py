"""The Celery app: one worker process per GPU, `acks_late`, prefetch 1.

celery -A worker.celery_app worker --concurrency 1 --pool prefork -Q hcnr,hcnr.webhooks
celery -A worker.celery_app worker --pool threads --concurrency 4 -Q hcnr.validation

Validation of new jobs runs on a CPU queue of its own (`hcnr.validation`, worker/validation.py):
never on a GPU worker, each check in a child process under the limits of hcnr_core.bounded.

Webhook deliveries and Hub pushes are tasks of their own (queue `hcnr.webhooks`, retried
with backoff): a GPU worker consuming both queues runs them between jobs; a CPU worker
with `-Q hcnr.webhooks --pool threads` runs them at once.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from store.settings import Settings

TASK_NAME = "hcnr.run_repair_job"
QUEUE = "hcnr"
WEBHOOK_TASK = "hcnr.deliver_webhook"
WEBHOOK_QUEUE = "hcnr.webhooks"
# The Hub push of a succeeded job (worker/hub_push.py): network I/O, on the webhook queue
HUB_PUSH_TASK = "hcnr.push_to_hub"
VALIDATION_TASK = "hcnr.validate_job"
VALIDATION_QUEUE = "hcnr.validation"
QUEUES = (QUEUE, WEBHOOK_QUEUE, VALIDATION_QUEUE)


def make_celery(settings: Settings) -> Celery:
    app = Celery("hcnr", broker=settings.celery_broker_url, include=["worker.tasks"])
    app.conf.update(
        task_acks_late=True,  # a job whose worker died is redelivered...
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # ...and one worker never hoards jobs
        worker_max_tasks_per_child=settings.worker_max_tasks_per_child,
        task_ignore_result=True,  # the database is the source of truth
        task_default_queue=QUEUE,
        task_routes={
            TASK_NAME: {"queue": QUEUE},
            WEBHOOK_TASK: {"queue": WEBHOOK_QUEUE},
            HUB_PUSH_TASK: {"queue": WEBHOOK_QUEUE},
            VALIDATION_TASK: {"queue": VALIDATION_QUEUE},
        },
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_transport_options=_transport_options(settings),
        worker_hijack_root_logger=False,
        # Task events for Flower (`celery events`, EventReceiver): a task's name and its
        # only argument, the job id, never a secret. The embedded broker keeps its topic
        # bindings in each process's memory, so events there would reach nobody.
        worker_send_task_events=_events_on(settings),
        task_send_sent_event=_events_on(settings),
        # A job stuck past its limit (and its lease thread's grace) loses its pool child:
        # the row is already failed (timeout) by the lease thread or the reconciler.
        task_time_limit=int(
            settings.job_timeout_seconds
            + settings.job_timeout_grace_seconds
            + settings.lease_seconds
        ),
    )
    app.conf.hcnr_settings = settings
    return app


EVENT_BROKERS = ("redis", "rediss", "sentinel", "amqp", "amqps", "pyamqp")


def _events_on(settings: Settings) -> bool:
    scheme = settings.celery_broker_url.split("://", 1)[0].split("+", 1)[0]
    return settings.task_events and scheme in EVENT_BROKERS


def _transport_options(settings: Settings) -> dict:
    """Redis redelivers an unacked job after the visibility timeout: longer than any job."""
    if settings.celery_broker_url.startswith(("redis", "rediss", "sentinel")):
        return {"visibility_timeout": settings.visibility_timeout}
    return {}


def enqueue_with(celery: Celery):
    def enqueue(job_id: str) -> None:
        celery.send_task(TASK_NAME, args=[job_id], queue=QUEUE)

    return enqueue


def validate_with(celery: Celery):
    """Producer of validations: the task checks the recorded job's inputs (CPU queue)."""

    def validate(job_id: str) -> None:
        celery.send_task(VALIDATION_TASK, args=[job_id], queue=VALIDATION_QUEUE)

    return validate


def notify_with(celery: Celery, session_factory: Any = None):
    """Producer of what follows a terminal state: the webhook delivery and the Hub push.
    Each task looks the job up and acts (or not: no webhook, no push_to_hub, not
    succeeded), so callers need not know which apply. With a `session_factory`, that the
    broker accepted both is recorded on the job (`notified_at`): a job finished without
    it lost its message, and the reconciler sends it again."""

    def notify(job_id: str) -> None:
        celery.send_task(WEBHOOK_TASK, args=[job_id], queue=WEBHOOK_QUEUE)
        celery.send_task(HUB_PUSH_TASK, args=[job_id], queue=WEBHOOK_QUEUE)
        if session_factory is not None:
            from store import job_state
            from store.db import session_scope
            from store.models import utcnow

            with session_scope(session_factory) as session:
                job_state.notified(session, job_id, utcnow())

    return notify


def broker_check_with(celery: Celery):
    def check() -> None:
        with celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)

    return check


app = make_celery(Settings())
