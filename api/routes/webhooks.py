"""/v1/webhook-secret: the tenant's own webhook signing secret (read, rotate)."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import SessionDep, TenantDep
from api.errors import ERROR_RESPONSES
from api.routing import ReleasingRoute
from api.schemas import WebhookSecret
from store import repositories

router = APIRouter(
    prefix="/v1/webhook-secret",
    tags=["webhooks"],
    responses=ERROR_RESPONSES,
    route_class=ReleasingRoute,
)


@router.get("", response_model=WebhookSecret)
def get_webhook_secret(tenant: TenantDep, session: SessionDep) -> WebhookSecret:
    """The secret that signs this tenant's webhooks (created on first read)."""
    secret = repositories.webhook_secret(session, tenant.id)
    session.commit()
    return WebhookSecret(secret=secret)


@router.post("/rotate", response_model=WebhookSecret)
def rotate_webhook_secret(tenant: TenantDep, session: SessionDep) -> WebhookSecret:
    """Replace the secret; deliveries from now on are signed with the new one."""
    secret = repositories.webhook_secret(session, tenant.id, rotate=True)
    session.commit()
    return WebhookSecret(secret=secret)
