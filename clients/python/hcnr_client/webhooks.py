"""Verify the webhooks the HCNR service sends (the Standard Webhooks format).

    from hcnr_client.webhooks import verify

    secret = client.webhook_secret.retrieve().secret      # once; whsec_...
    if not verify(secret, request.headers, raw_body):      # the body as received, bytes
        return 401

Every delivery carries `webhook-id` (the same on each retry: deduplicate on it),
`webhook-timestamp` (unix seconds) and `webhook-signature`: `v1,<base64 HMAC-SHA256 of
"<webhook-id>.<webhook-timestamp>.<body>">`, keyed by the base64-decoded part of the
tenant's secret after `whsec_` (https://www.standardwebhooks.com). A delivery older or
newer than `tolerance_seconds` is refused, so a captured one cannot be replayed later.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping

__all__ = ["verify"]


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_seconds: int = 300,
    now: float | None = None,
) -> bool:
    """Whether a delivery's signature headers match its raw body and it is recent."""
    lowered = {name.lower(): value for name, value in headers.items()}
    try:
        message_id = lowered["webhook-id"]
        timestamp = int(lowered["webhook-timestamp"])
        signatures = lowered["webhook-signature"].split()
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (KeyError, ValueError, binascii.Error):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_seconds:
        return False
    signed = f"{message_id}.{timestamp}.".encode() + body
    expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(expected, candidate) for candidate in signatures)
