"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api.routing import ReleasingRoute
from api.schemas import Health

router = APIRouter(tags=["health"], route_class=ReleasingRoute)


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The process is up."""
    return Health(status="ok")


def _check(name: str, probe) -> tuple[str, str]:
    try:
        probe()
        return name, "ok"
    except Exception as exc:
        return name, f"error: {type(exc).__name__}: {exc}"[:300]


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
def readyz(request: Request) -> Response:
    """Database, artifact storage and broker are reachable."""
    state = request.app.state

    def database() -> None:
        with state.session_factory() as session:
            session.execute(text("SELECT 1"))

    checks = dict(
        [
            _check("database", database),
            _check("storage", state.storage.check),
            _check("broker", state.broker_check),
        ]
    )
    ok = all(value == "ok" for value in checks.values())
    body = Health(status="ok" if ok else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics(request: Request) -> Response:
    """Prometheus text format: HTTP requests and jobs by status."""
    return Response(
        generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST
    )
