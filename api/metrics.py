"""Prometheus metrics of one app instance (its own registry)."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from store import repositories
from store.db import session_scope
from store.job_state import STATES


class JobsCollector:
    """`hcnr_jobs{status}` read from the database at scrape time."""

    def __init__(self, session_factory):
        self.session_factory = session_factory

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("hcnr_jobs", "Repair jobs by status", labels=["status"])
        try:
            with session_scope(self.session_factory) as session:
                counts = repositories.count_jobs_by_status(session)
        except Exception:
            return
        for status in STATES:
            gauge.add_metric([status], counts.get(status, 0))
        yield gauge


class StorageCollector:
    """`hcnr_storage_bytes{tenant, kind}`: bytes each tenant keeps (uploaded files, what
    its jobs published), read from the database at scrape time."""

    def __init__(self, session_factory):
        self.session_factory = session_factory

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily(
            "hcnr_storage_bytes", "Bytes stored per tenant", labels=["tenant", "kind"]
        )
        try:
            with session_scope(self.session_factory) as session:
                usage = repositories.storage_bytes_by_tenant(session)
        except Exception:
            return
        for (tenant, kind), total in sorted(usage.items()):
            gauge.add_metric([tenant, kind], total)
        yield gauge


class Metrics:
    def __init__(self, session_factory):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "hcnr_http_requests",
            "HTTP requests",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "hcnr_http_request_seconds",
            "HTTP request latency",
            ["method", "route"],
            registry=self.registry,
        )
        self.registry.register(JobsCollector(session_factory))
        self.registry.register(StorageCollector(session_factory))


class MetricsMiddleware:
    """Counts requests by route template (never by raw path: ids would explode labels)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"]
            self.metrics.requests.labels(method, route, str(status["code"])).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - started)
