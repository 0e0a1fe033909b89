"""Webhook signing (the Standard Webhooks format) and the address policy, shared by the
API (checks at registration, shows the tenant its secret) and the delivery task (checks
again at send time, signs).

Each tenant has its own signing secret, `whsec_<base64 of 24 random bytes>`, which it
reads (or rotates) with `GET /v1/webhook-secret` (`POST /v1/webhook-secret/rotate`).
Every delivery carries

    webhook-id: msg_<job id>_<status>       (the same on every retry: deduplicate on it)
    webhook-timestamp: <unix seconds>
    webhook-signature: v1,<base64 HMAC-SHA256 of "<webhook-id>.<webhook-timestamp>.<body>">

keyed by the base64-decoded part of the secret after `whsec_`
(https://www.standardwebhooks.com). Receivers verify with the SDK's
`hcnr_client.webhooks.verify` (signature and a recent timestamp), written apart from
`sign` here so that each checks the other.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
import socket
from urllib.parse import urlsplit

SECRET_PREFIX = "whsec_"


class UnsafeWebhookAddress(ValueError):
    """The URL's host does not resolve, or resolves to a non-public address."""


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value of one delivery."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(secret: str, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, message_id, timestamp, body),
    }


def check_address(url: str, allow_private: bool) -> None:
    """Refuse a URL whose host resolves to a loopback, private, link-local or reserved
    address (an SSRF guard) unless `allow_private`. Called when the webhook is registered
    and again before every delivery (DNS may have changed in between)."""
    if allow_private:
        return
    host = urlsplit(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError as exc:
        raise UnsafeWebhookAddress(f"cannot resolve {host!r}") from exc
    for address in addresses:
        ip = ipaddress.ip_address(str(address).split("%")[0])
        if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved:
            raise UnsafeWebhookAddress(f"{host!r} is not a public address")
