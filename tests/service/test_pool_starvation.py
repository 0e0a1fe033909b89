"""The API under more concurrent requests than it has worker threads and pooled database
connections (PostgreSQL's QueuePool; SQLite has no such pool).

`bench/reliability.py --only load` with 200 users once failed every upload with a 500 after
the pool's 30 s timeout: the tenant lookup kept its connection while the route waited for a
worker thread, and every worker thread sat in another request's lookup waiting for a
connection. Reproduced here small: 1 connection, 2 threads, 8 concurrent requests.
"""

from __future__ import annotations

import anyio
import httpx
import pytest
from anyio.to_thread import current_default_thread_limiter

from store import repositories
from store.db import make_engine, make_session_factory, session_scope
from tests.service.service_support import Models


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_requests_beyond_threads_and_connections_all_succeed(
    models: Models, postgres_url: str, tmp_path, anyio_backend
):
    from api.app import create_app
    from store.settings import Settings

    settings = Settings(
        env="test",
        data_dir=tmp_path / "data",
        models_root=models.root,
        database_url=postgres_url,
    )
    app = create_app(settings, enqueue=lambda job_id: None)
    # the smallest pool and thread limiter that still lets requests through one at a time
    app.state.engine = make_engine(postgres_url, pool_size=1, max_overflow=0, pool_timeout=5)
    app.state.session_factory = make_session_factory(app.state.engine)
    with session_scope(app.state.session_factory) as session:
        _, key = repositories.create_api_key(session, "pool-starvation")

    limiter = current_default_thread_limiter()
    tokens, limiter.total_tokens = limiter.total_tokens, 2
    statuses: list[int] = []
    try:
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers=headers, timeout=60
        ) as client:

            async def call() -> None:
                statuses.append((await client.get("/v1/repair-jobs")).status_code)

            with anyio.fail_after(60):
                async with anyio.create_task_group() as group:
                    for _ in range(8):
                        group.start_soon(call)
    finally:
        limiter.total_tokens = tokens
        app.state.engine.dispose()
    assert statuses == [200] * 8


def test_every_api_route_releases_its_connection(inproc):
    """A new router without `route_class=ReleasingRoute` would bring the stall back."""
    from fastapi.routing import APIRoute

    from api.routing import ReleasingRoute

    def api_routes(routes: list) -> list[APIRoute]:  # FastAPI may wrap included routers
        found = []
        for route in routes:
            router = getattr(route, "original_router", None)
            found += api_routes(router.routes) if router else []
            found += [route] if isinstance(route, APIRoute) else []
        return found

    routes = api_routes(inproc.app.routes)
    assert len(routes) >= 10
    assert [r.path for r in routes if not isinstance(r, ReleasingRoute)] == []
