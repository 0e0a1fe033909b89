"""/v1/secrets: the tenant's named secrets (`hf_token`, ...). Set, list, read the dates,
delete; a value goes in and never comes back out."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from api import services
from api.deps import SessionDep, SettingsDep, TenantDep
from api.errors import ERROR_RESPONSES
from api.routing import ReleasingRoute
from api.schemas import SecretDeleted, SecretList, SecretPublic, SecretSet

router = APIRouter(
    prefix="/v1/secrets",
    tags=["secrets"],
    responses=ERROR_RESPONSES,
    route_class=ReleasingRoute,
)
SecretNamePath = Annotated[str, Path(max_length=64, description="hf_token")]


@router.get("", response_model=SecretList)
def list_secrets(tenant: TenantDep, session: SessionDep) -> SecretList:
    """The tenant's secrets: names and dates only."""
    return SecretList(data=[_public(row) for row in services.list_secrets(session, tenant)])


@router.put("/{name}", response_model=SecretPublic)
def set_secret(
    name: SecretNamePath,
    body: SecretSet,
    tenant: TenantDep,
    session: SessionDep,
    settings: SettingsDep,
) -> SecretPublic:
    """Create or replace a secret (stored encrypted). `hf_token` is used to download
    private or gated `hf:` models of this tenant's jobs."""
    return _public(services.set_secret(session, settings, tenant, name, body.value))


@router.get("/{name}", response_model=SecretPublic)
def get_secret(name: SecretNamePath, tenant: TenantDep, session: SessionDep) -> SecretPublic:
    """Whether the secret is set and since when (never its value)."""
    return _public(services.get_secret(session, tenant, name))


@router.delete("/{name}", response_model=SecretDeleted)
def delete_secret(name: SecretNamePath, tenant: TenantDep, session: SessionDep) -> SecretDeleted:
    """Remove the secret at once; jobs validated afterwards no longer use it."""
    services.delete_secret(session, tenant, name)
    return SecretDeleted(name=name, deleted=True)


def _public(row) -> SecretPublic:
    return SecretPublic(name=row.name, created_at=row.created_at, updated_at=row.updated_at)
