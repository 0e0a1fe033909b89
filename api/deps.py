"""FastAPI dependencies, as `Annotated` aliases used by every route."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.errors import APIError
from store import repositories
from store.models import Tenant
from store.settings import Settings
from store.storage import Storage

bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer hcnr_...`")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    session = request.app.state.session_factory()
    try:
        yield session
    finally:
        session.close()


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def get_validate(request: Request) -> Callable[[str], None]:
    """The producer of validation tasks: a new job goes there first (worker/validation.py)."""
    return request.app.state.validate


def get_tenant(
    session: Annotated[Session, Depends(get_session)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Tenant:
    if credentials is None:
        raise APIError("unauthorized", "missing bearer API key")
    tenant = repositories.authenticate(session, credentials.credentials)
    # End the lookup's transaction: its pooled connection must not be held while the
    # route waits for a worker thread. Otherwise, under load, every thread sits in a
    # lookup waiting for a connection while every connection's owner waits for a thread
    # (200 users: all uploads failed after the 30 s pool timeout). Sessions do not expire
    # on commit, so `tenant` stays loaded.
    session.commit()
    if tenant is None:
        raise APIError("unauthorized", "invalid or revoked API key")
    return tenant


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StorageDep = Annotated[Storage, Depends(get_storage)]
ValidateDep = Annotated[Callable[[str], None], Depends(get_validate)]
TenantDep = Annotated[Tenant, Depends(get_tenant)]
