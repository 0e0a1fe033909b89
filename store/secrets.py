"""Tenants' named secrets (credentials the service uses on their behalf), encrypted at rest.

A secret has a name from `SECRET_NAMES` (one per integration that reads it: `hf_token` for
private or gated `hf:` models; a later `wandb_api_key` or `mlflow_token` is one more entry)
and a value the API accepts but never returns. Values are sealed with AES-256-GCM under a
key derived (HKDF-SHA256) from the operator's `HCNR_SECRET_KEY`, which production settings
already require to be random and 32+ characters. The tenant id and the name are the
associated data: a ciphertext copied to another tenant's row, or to another name, does not
decrypt. After a rotation of `HCNR_SECRET_KEY`, listing the old value in
`HCNR_PREVIOUS_SECRET_KEYS` keeps existing secrets readable.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import select
from sqlalchemy.orm import Session

from store.models import TenantSecret, utcnow

# name -> what reads it (the API documents these)
SECRET_NAMES: dict[str, str] = {
    "hf_token": "Hugging Face Hub token: downloads private or gated `hf:` models",
    "wandb_api_key": "Weights & Biases API key: a job's wandb integration logs with it",
    "mlflow_token": "MLflow bearer token (MLFLOW_TRACKING_TOKEN): a job's mlflow integration",
}
MAX_VALUE_LENGTH = 4096
_VERSION = "v1"
_INFO = b"hcnr tenant secrets v1"


class SecretUnreadable(Exception):
    """No configured key opens the stored value (HCNR_SECRET_KEY rotated without listing
    the old value in HCNR_PREVIOUS_SECRET_KEYS)."""


def _key(secret_key: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(
        secret_key.encode()
    )


def _aad(tenant_id: str, name: str) -> bytes:
    return f"{tenant_id}\x00{name}".encode()


def seal(secret_key: str, tenant_id: str, name: str, value: str) -> str:
    nonce = os.urandom(12)
    sealed = AESGCM(_key(secret_key)).encrypt(nonce, value.encode(), _aad(tenant_id, name))
    return f"{_VERSION}:{base64.b64encode(nonce + sealed).decode()}"


def open_sealed(keys: Sequence[str], tenant_id: str, name: str, stored: str) -> str:
    version, _, payload = stored.partition(":")
    if version != _VERSION:
        raise SecretUnreadable(f"unknown secret format {version!r}")
    raw = base64.b64decode(payload)
    for secret_key in keys:
        try:
            plain = AESGCM(_key(secret_key)).decrypt(raw[:12], raw[12:], _aad(tenant_id, name))
        except InvalidTag:
            continue
        return plain.decode()
    raise SecretUnreadable(f"secret {name!r} cannot be decrypted with the configured keys")


def _keys(settings) -> list[str]:
    return [settings.secret_key, *settings.previous_secret_keys]


def put(session: Session, settings, tenant_id: str, name: str, value: str) -> TenantSecret:
    """Create or replace; the caller commits."""
    row = session.get(TenantSecret, (tenant_id, name))
    sealed = seal(settings.secret_key, tenant_id, name, value)
    if row is None:
        row = TenantSecret(tenant_id=tenant_id, name=name, ciphertext=sealed)
        session.add(row)
    else:
        row.ciphertext, row.updated_at = sealed, utcnow()
    session.flush()
    return row


def get_meta(session: Session, tenant_id: str, name: str) -> TenantSecret | None:
    return session.get(TenantSecret, (tenant_id, name))


def list_meta(session: Session, tenant_id: str) -> list[TenantSecret]:
    query = select(TenantSecret).where(TenantSecret.tenant_id == tenant_id)
    return list(session.scalars(query.order_by(TenantSecret.name)))


def delete(session: Session, tenant_id: str, name: str) -> bool:
    row = session.get(TenantSecret, (tenant_id, name))
    if row is None:
        return False
    session.delete(row)
    session.flush()
    return True


def value(session: Session, settings, tenant_id: str, name: str) -> str | None:
    """The decrypted value for the service's own use (a download), None when unset."""
    row = session.get(TenantSecret, (tenant_id, name))
    if row is None:
        return None
    return open_sealed(_keys(settings), tenant_id, name, row.ciphertext)
