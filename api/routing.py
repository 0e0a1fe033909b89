"""Routes that give their database connection back before FastAPI's next thread hop.

A sync route runs in a worker thread; its response is then validated in *another*
worker thread, and the request's session is closed only after the response is sent.
A session still inside a transaction keeps its pooled connection through those hops, so
under load every worker thread can be waiting for a connection that belongs to a request
waiting for a worker thread: the API stalls until the pool times out (200 users: every
upload failed with a 500), and a server-sent-events stream would pin a connection for
its whole life. `ReleasingRoute` ends the transaction as the route function returns.

It also makes such a route one thread hop instead of two: the route function (and the end
of its transaction) runs in a worker thread from an `async` endpoint, so FastAPI validates
and encodes the response on the event loop rather than in a second worker thread (each hop
cost CPU and, under load, a wait for one of AnyIO's 40 threads). The route functions
themselves stay plain functions: the dashboard (api/ui) calls them directly.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from fastapi.routing import APIRoute
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool


def end_transaction(session: Session, *, failed: bool) -> None:
    """Commit a clean session (nothing is written; loaded objects stay loaded: sessions
    do not expire on commit), roll back anything a route left pending or a failure."""
    if not session.in_transaction():
        return
    if failed or session.new or session.dirty or session.deleted:
        session.rollback()
    else:
        session.commit()


def releasing(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(endpoint):
        return endpoint

    def call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        failed = True
        try:
            result = endpoint(*args, **kwargs)
            failed = False
            return result
        finally:
            for value in kwargs.values():
                if isinstance(value, Session):
                    end_transaction(value, failed=failed)

    @functools.wraps(endpoint)  # FastAPI reads the parameters of `endpoint`
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        return await run_in_threadpool(call, args, kwargs)

    return wrapper


class ReleasingRoute(APIRoute):
    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, releasing(endpoint), **kwargs)
