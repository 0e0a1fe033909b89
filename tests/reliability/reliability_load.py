"""Load: `users` concurrent async (aiohttp) users against the API for `seconds`.

Each user uploads its honesty and task files once, then loops, in one of two shapes:

- "mix" (the default): create a repair job (a fresh Idempotency-Key), poll it three
  times, list the tenant's jobs, read the job's events, with `think` seconds between
  requests. A closed loop: each user sends its next request `think` seconds after the last
  answer, so 200 users with think 0.5 offer up to 400 requests/s, more than one API
  process serves on this machine: a saturation measure (latency ≈ users / throughput −
  think, Little's law), not what 200 clients of the SDK send.
- "sdk": what a user of the Python SDK (clients/python) does: `repair_jobs.create(...)`
  then `repair_jobs.wait(job_id)`, which GETs the job at once and then every
  `poll_interval` seconds (the SDK's default, 1 s) until it is finished. No GPU worker
  runs here, so no job finishes: each user moves on to its next job after `polls` polls
  (a job that runs `polls` seconds). Users start at random moments over one such job
  (a ramp-up, not timed), then every request of the next `seconds` is timed.

Every request is timed per route; any status >= 400 or transport error is an error.
Afterwards the jobs the users were told were created (201) are compared with the rows in
PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tests.reliability.reliability_cluster import Cluster, Inputs

ROUTES = (
    "POST /v1/files",
    "POST /v1/repair-jobs",
    "GET /v1/repair-jobs/{id}",
    "GET /v1/repair-jobs",
    "GET /v1/repair-jobs/{id}/events",
)


@dataclass
class Answer:
    status: int
    body: Any  # the JSON body (None when it is not JSON)
    text: str


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    error_samples: list[str] = field(default_factory=list)
    created: set[str] = field(default_factory=set)
    since: float = 0.0  # perf_counter: requests sent before are not timed (a ramp-up)
    untimed: int = 0

    async def call(self, route: str, send: Callable[[], Any]) -> Answer | None:
        """Time one request, from sending it until its whole body is read."""
        started = time.perf_counter()
        try:
            async with send() as response:
                text = await response.text()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self._error(route, f"{route}: {type(exc).__name__}: {exc}")
            return None
        if started >= self.since:
            self.latencies[route].append(time.perf_counter() - started)
        else:
            self.untimed += 1
        if response.status >= 400:
            self._error(route, f"{route}: {response.status} {text[:200]}")
            return None
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        return Answer(response.status, body, text)

    def _error(self, route: str, sample: str) -> None:
        self.errors[route] += 1
        if len(self.error_samples) < 10:
            self.error_samples.append(sample)


def sdk_poll_interval() -> float:
    """The SDK's default poll interval of `repair_jobs.wait` (read, not copied)."""
    import inspect

    from hcnr_client.resources.repair_jobs import RepairJobs

    return float(inspect.signature(RepairJobs.wait).parameters["poll_interval"].default)


async def _upload_inputs(
    http: aiohttp.ClientSession, url: str, auth: dict[str, str], inputs: Inputs, tally: Tally
) -> dict[str, Any] | None:
    """The user's two files, then the body of its jobs (None when an upload failed)."""
    files = {}
    for purpose, path in (("honesty", inputs.honesty), ("task", inputs.task)):
        content = path.read_bytes()

        def upload(name: str = path.name, data: bytes = content, purpose: str = purpose):
            form = aiohttp.FormData()
            form.add_field("purpose", purpose)
            form.add_field("file", data, filename=name, content_type="application/jsonl")
            return http.post(f"{url}/v1/files", data=form, headers=auth)

        response = await tally.call("POST /v1/files", upload)
        if response is None:
            return None
        files[purpose] = response.body["id"]
    return {
        "method": "hcnr",
        "base": inputs.base,
        "finetuned": inputs.finetuned,
        "honesty_file": files["honesty"],
        "task_file": files["task"],
        "metadata": {"load": "yes"},
    }


async def _create_job(
    http: aiohttp.ClientSession,
    url: str,
    auth: dict[str, str],
    body: dict,
    tally: Tally,
    key_prefix: str = "",
) -> str | None:
    """POST one job with a fresh Idempotency-Key (the SDK's start with `hcnr-client-`);
    its id, counted as created when it is new, or None when the request failed."""
    headers = {**auth, "Idempotency-Key": f"{key_prefix}{uuid.uuid4()}"}
    response = await tally.call(
        "POST /v1/repair-jobs",
        lambda: http.post(f"{url}/v1/repair-jobs", json=body, headers=headers),
    )
    if response is None:
        return None
    if response.status == 201:
        tally.created.add(response.body["id"])
    return response.body["id"]


async def _user(
    http: aiohttp.ClientSession,
    url: str,
    key: str,
    inputs: Inputs,
    deadline: float,
    think: float,
    tally: Tally,
) -> None:
    auth = {"Authorization": f"Bearer {key}"}
    body = await _upload_inputs(http, url, auth, inputs, tally)
    if body is None:
        return
    while time.monotonic() < deadline:
        job_id = await _create_job(http, url, auth, body, tally)
        if job_id is None:
            await asyncio.sleep(think)
            continue
        requests = [("GET /v1/repair-jobs/{id}", f"/v1/repair-jobs/{job_id}")] * 3
        requests += [("GET /v1/repair-jobs", "/v1/repair-jobs?limit=10")]
        requests += [("GET /v1/repair-jobs/{id}/events", f"/v1/repair-jobs/{job_id}/events")]
        for route, path in requests:
            await asyncio.sleep(think)
            await tally.call(route, lambda p=path: http.get(f"{url}{p}", headers=auth))
        await asyncio.sleep(think)


async def _sdk_user(
    http: aiohttp.ClientSession,
    url: str,
    key: str,
    inputs: Inputs,
    deadline: float,
    poll_interval: float,
    polls: int,
    tally: Tally,
) -> None:
    """`create` then `wait` (GET at once, then every `poll_interval` s), `polls` GETs per
    job. Users start at random moments over one job's length (`_run`'s ramp), as clients
    that did not all start in the same second: started together, they would stay in step
    and post their jobs in bursts of `users` every `polls` seconds."""
    await asyncio.sleep(random.uniform(0, polls * poll_interval))
    auth = {"Authorization": f"Bearer {key}"}
    body = await _upload_inputs(http, url, auth, inputs, tally)
    if body is None:
        return
    while time.monotonic() < deadline:
        job_id = await _create_job(http, url, auth, body, tally, key_prefix="hcnr-client-")
        if job_id is None:
            await asyncio.sleep(poll_interval)
            continue
        path = f"{url}/v1/repair-jobs/{job_id}"
        for poll in range(polls):
            if poll:
                await asyncio.sleep(poll_interval)
            if time.monotonic() >= deadline:
                return
            await tally.call("GET /v1/repair-jobs/{id}", lambda p=path: http.get(p, headers=auth))
        await asyncio.sleep(poll_interval)  # the SDK sleeps after a poll; then the next job


async def _run(
    url: str,
    keys: list[str],
    inputs: Inputs,
    seconds: float,
    think: float,
    shape: str = "mix",
    polls: int = 10,
) -> tuple[Tally, float, float]:
    """The tally, the timed window and the whole run (s; with the ramp-up). One keep-alive
    connection per user at most. aiohttp, not httpx: on this 2-core
    machine the generator shares the CPU with the server it measures, and httpx's
    AsyncClient took 6.5 ms of CPU per request (more than the API itself)."""
    tally = Tally()
    connector = aiohttp.TCPConnector(limit=len(keys) + 10, keepalive_timeout=30)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        began = started = time.monotonic()
        deadline = started + seconds
        if shape == "sdk":  # timed after the ramp-up, for `seconds`
            ramp = polls * think
            tally.since = time.perf_counter() + ramp
            started, deadline = started + ramp, deadline + ramp
            users = [_sdk_user(http, url, k, inputs, deadline, think, polls, tally) for k in keys]
        else:
            users = [_user(http, url, k, inputs, deadline, think, tally) for k in keys]
        await asyncio.gather(*users)
        ended = time.monotonic()
        return tally, ended - started, ended - began


def _retire(cluster: Cluster, tenants: list[str]) -> None:
    """No worker ran during the load: cancel its queued jobs and drop their messages, so
    that a worker started later on this cluster does not repair hundreds of them."""
    import redis
    from sqlalchemy import select, update

    from store.models import Job, Tenant

    with cluster.session_factory() as session:
        owners = select(Tenant.id).where(Tenant.name.in_(tenants))
        session.execute(
            update(Job)
            .where(Job.tenant_id.in_(owners), Job.status == "queued")
            .values(status="cancelled")
        )
        session.commit()
    redis.Redis.from_url(cluster.redis.url).delete("hcnr")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]  # nearest rank


def load(
    cluster: Cluster,
    users: int,
    seconds: float,
    think: float = 0.5,
    tenants: int = 10,
    inputs: Inputs | None = None,
    shape: str = "mix",
    polls: int = 10,
) -> dict[str, Any]:
    """Run the load with no worker consuming (jobs stay queued, then are cancelled and
    their messages dropped); returns the figures. `shape` "sdk": `think` is the SDK's
    poll interval and each job is polled `polls` times (module docstring)."""
    from sqlalchemy import func, select

    from store.models import Job, Tenant

    names = [f"load-{uuid.uuid4().hex[:6]}-{i}" for i in range(tenants)]
    tenant_keys = [cluster.create_key(name) for name in names]
    keys = [tenant_keys[i % tenants] for i in range(users)]
    tally, wall, total = asyncio.run(
        _run(cluster.api.url, keys, inputs or cluster.inputs, seconds, think, shape, polls)
    )
    with cluster.session_factory() as session:
        mine = select(func.count()).select_from(Job).join(Tenant).where(Tenant.name.in_(names))
        rows = session.scalar(mine)
        # the validation worker's backlog: jobs not yet validated when the users stopped
        validating = session.scalar(mine.where(Job.status == "validating"))
    _retire(cluster, names)
    requests = sum(len(v) for v in tally.latencies.values()) + sum(tally.errors.values())
    routes = {}
    for route in ROUTES:
        values = tally.latencies.get(route, [])
        routes[route] = {
            "requests": len(values) + tally.errors.get(route, 0),
            "errors": tally.errors.get(route, 0),
            **{
                f"p{q}_ms": round(1000 * _percentile(values, q), 1) if values else None
                for q in (50, 95, 99)
            },
        }
    return {
        "shape": shape,
        "polls_per_job": polls if shape == "sdk" else None,
        "users": users,
        "seconds": seconds,
        "think_seconds": think,
        "wall_seconds": round(wall, 1),
        # with the ramp-up (shape "sdk"): what CPU per request and CPU shares divide by
        "total_seconds": round(total, 1),
        "requests_total": requests + tally.untimed,
        "requests": requests,
        "requests_per_second": round(requests / wall, 1),
        "errors": sum(tally.errors.values()),
        "error_rate": round(sum(tally.errors.values()) / max(1, requests), 6),
        "error_samples": tally.error_samples,
        "submitted": len(tally.created),
        "rows": rows,
        "validating_after": validating,
        "routes": routes,
    }
