"""Webhook delivery on terminal job states: one attempt per call of the Celery task
`hcnr.deliver_webhook` (worker/tasks.py), which retries with exponential backoff.

Each attempt checks the address again (the host may resolve elsewhere now) and signs the
body with the job's tenant's own secret in the Standard Webhooks format (see
store/webhooks.py). Redirects are not followed.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import httpx
from sqlalchemy.orm import Session, sessionmaker

from store import repositories, webhooks
from store.db import session_scope
from store.job_state import TERMINAL_STATES
from store.models import Job
from store.settings import Settings

log = logging.getLogger("hcnr.webhooks")
TIMEOUT_SECONDS = 10


class RetryableDelivery(Exception):
    """A network error, 429 or 5xx: the task tries again later."""


def message_id(job: Job) -> str:
    """Stable over retries of one event, so receivers can deduplicate."""
    return f"msg_{job.id}_{job.status}"


def body_of(job: Job) -> bytes:
    payload = job_payload(job)
    event = {"type": f"repair_job.{job.status}", "timestamp": payload["finished_at"]}
    return json.dumps({**event, "data": payload}, default=str).encode()


def post(url: str, body: bytes, secret: str, msg_id: str, event: str, settings: Settings) -> str:
    """One delivery attempt: 'delivered', 'rejected_<code>', 'refused_address', or
    RetryableDelivery."""
    try:
        webhooks.check_address(url, settings.webhook_allow_private)
    except webhooks.UnsafeWebhookAddress as exc:
        log.warning("webhook %s refused at send time: %s", url, exc)
        return "refused_address"
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "hcnr-webhooks/2",
        "X-HCNR-Event": event,
        **webhooks.headers(secret, msg_id, int(time.time()), body),
    }
    try:
        response = httpx.post(url, content=body, headers=headers, timeout=TIMEOUT_SECONDS)
    except httpx.HTTPError as exc:
        raise RetryableDelivery(f"{type(exc).__name__}: {exc}") from exc
    if response.is_success:
        return "delivered"
    if response.status_code >= 500 or response.status_code == 429:
        raise RetryableDelivery(f"HTTP {response.status_code}")
    return f"rejected_{response.status_code}"


def deliver_job(
    session_factory: sessionmaker[Session], settings: Settings, job_id: str, *, final: bool
) -> str | None:
    """One attempt at the webhook of a finished job (None: there is none to send). A
    retryable failure raises RetryableDelivery unless this is the `final` attempt, which
    records 'failed'. The outcome goes on the row and into an event."""
    with session_scope(session_factory) as session:
        job = repositories.get_job_by_id(session, job_id)
        if job is None or not job.webhook_url or job.status not in TERMINAL_STATES:
            return None
        url, body, msg_id = job.webhook_url, body_of(job), message_id(job)
        event = f"repair_job.{job.status}"
        secret = repositories.webhook_secret(session, job.tenant_id)
    try:
        outcome = post(url, body, secret, msg_id, event, settings)
    except RetryableDelivery as exc:
        log.warning("webhook of %s to %s failed: %s", job_id, url, exc)
        if not final:
            _record(session_factory, job_id, "retrying", f"webhook attempt failed ({exc})")
            raise
        outcome = "failed"
    _record(session_factory, job_id, outcome, f"webhook {outcome}")
    return outcome


def _record(session_factory: sessionmaker[Session], job_id: str, status: str, text: str) -> None:
    with session_scope(session_factory) as session:
        job = repositories.get_job_by_id(session, job_id)
        job.webhook_status = status
        repositories.add_event(session, job, "webhook", text)


def job_payload(job: Job) -> dict[str, Any]:
    error = {"code": job.error_code, "message": job.error_message} if job.error_code else None
    return {
        "id": job.id,
        "object": "repair_job",
        "status": job.status,
        "metadata": job.metadata_dict,
        "error": error,
        "metrics": job.metrics,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
    }
