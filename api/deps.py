"""FastAPI dependencies, as `Annotated` aliases used by every route.

The ones that do no I/O are `async def`: FastAPI runs a plain `def` dependency in a
worker thread, and each such hop cost every request CPU and a wait for a free thread
(AnyIO's 40) under load. The request's session is opened on the event loop (no I/O until
first used) and closed there too, unless it still holds a connection."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated

import anyio
from fastapi import BackgroundTasks, Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from api import services
from api.errors import APIError
from store import repositories
from store.models import Tenant
from store.settings import Settings
from store.storage import Storage

bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer hcnr_...`")


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    session = request.app.state.session_factory()
    try:
        yield session
    finally:
        if session.in_transaction():  # rolling back is a round trip: not on the event loop
            # a limiter of its own: closing (returning the connection) never waits for
            # a free worker thread (fastapi.concurrency.contextmanager_in_threadpool)
            await anyio.to_thread.run_sync(session.close, limiter=anyio.CapacityLimiter(1))
        else:
            session.close()


async def get_storage(request: Request) -> Storage:
    return request.app.state.storage


async def get_validate(request: Request, background: BackgroundTasks) -> Callable[[str], None]:
    """The producer of validation tasks (worker/validation.py), deferred: a new job's
    message is sent after the response has gone (a Starlette background task), so creating
    a job does not wait on the broker. The job row recorded `validation_sent_at` and was
    committed first; a message lost in between (the process dies) is re-sent by the
    reconciler like any other lost validation."""
    validate = request.app.state.validate

    def after_response(job_id: str) -> None:
        background.add_task(services.send_validation, validate, job_id)

    return after_response


def get_tenant(session: Session, credentials: HTTPAuthorizationCredentials | None) -> Tenant:
    """The tenant of a bearer key, checked against the database now (the dashboard's
    check, api/ui/auth.py); the API's routes use `current_tenant`."""
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


def _authenticate(factory: sessionmaker[Session], token: str) -> Tenant | None:
    with factory() as session:
        tenant = repositories.authenticate(session, token)
        session.commit()
        return tenant  # detached, loaded (sessions do not expire on commit)


async def current_tenant(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Tenant:
    """The tenant of the request's bearer key. A key verified within the last
    HCNR_AUTH_CACHE_SECONDS is taken from this process's cache (api/key_cache.py) without
    a database round trip; otherwise it is checked in a session of its own, in a worker
    thread, and the session is closed before the route runs."""
    if credentials is None:
        raise APIError("unauthorized", "missing bearer API key")
    state = request.app.state
    tenant = state.key_cache.get(credentials.credentials)
    if tenant is None:
        tenant = await run_in_threadpool(
            _authenticate, state.session_factory, credentials.credentials
        )
        if tenant is None:
            raise APIError("unauthorized", "invalid or revoked API key")
        state.key_cache.put(credentials.credentials, tenant)
    return tenant


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StorageDep = Annotated[Storage, Depends(get_storage)]
ValidateDep = Annotated[Callable[[str], None], Depends(get_validate)]
TenantDep = Annotated[Tenant, Depends(current_tenant)]
