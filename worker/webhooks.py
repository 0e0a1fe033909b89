"""Signed webhooks on terminal job states, with retries.

Signature header: `X-HCNR-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>` of
`"<t>.<raw body>"` keyed by the service secret; receivers should check `t` is recent.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from typing import Any

import httpx
from sqlalchemy.orm import Session, sessionmaker

from store import repositories
from store.db import session_scope
from store.job_state import TERMINAL_STATES
from store.models import Job
from store.settings import Settings

log = logging.getLogger("hcnr.webhooks")


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(secret: str, header: str, body: bytes, tolerance_seconds: int = 300) -> bool:
    """For receivers (and tests): check a signature header against the raw body."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        timestamp = int(fields["t"])
    except (ValueError, KeyError):
        return False
    if abs(time.time() - timestamp) > tolerance_seconds:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), header)


def deliver(
    url: str, event: str, payload: dict[str, Any], secret: str, attempts: int, backoff: float
) -> str:
    """POST until a 2xx (retrying network errors, 429 and 5xx); returns the outcome."""
    body = json.dumps({"type": event, "data": payload}, default=str).encode()
    for attempt in range(1, attempts + 1):
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "hcnr-webhooks/1",
            "X-HCNR-Event": event,
            "X-HCNR-Signature": sign(secret, timestamp, body),
        }
        try:
            response = httpx.post(url, content=body, headers=headers, timeout=10)
            if response.is_success:
                return "delivered"
            if response.status_code < 500 and response.status_code != 429:
                return f"rejected_{response.status_code}"
        except httpx.HTTPError as exc:
            log.warning("webhook %s attempt %d failed: %s", url, attempt, exc)
        if attempt < attempts:
            time.sleep(backoff * 2 ** (attempt - 1))
    return "failed"


def notify_job(session_factory: sessionmaker[Session], settings: Settings, job_id: str) -> None:
    """Deliver the webhook of a job in a terminal state (if it asked for one) and record
    the outcome on the row and as an event."""
    with session_scope(session_factory) as session:
        job = repositories.get_job_by_id(session, job_id)
        if job is None or not job.webhook_url or job.status not in TERMINAL_STATES:
            return
        url, payload = job.webhook_url, job_payload(job)
    outcome = deliver(
        url,
        f"repair_job.{payload['status']}",
        payload,
        settings.secret_key,
        settings.webhook_attempts,
        settings.webhook_backoff_seconds,
    )
    with session_scope(session_factory) as session:
        job = repositories.get_job_by_id(session, job_id)
        job.webhook_status = outcome
        repositories.add_event(session, job, "webhook", f"webhook {outcome}")


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
