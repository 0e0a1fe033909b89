"""Reliability benchmark: the service under faults, on the built-in model organism.

    .venv/bin/python -m bench.reliability                      # every section
    .venv/bin/python -m bench.reliability --only kill_storm,load
    .venv/bin/python -m bench.reliability --only load,load_sdk   # the API under load only

Each section starts its own production-shaped service on this machine (redis-server with
AOF + noeviction, PostgreSQL, `hcnr serve --no-worker` on uvicorn, real `celery worker`
processes; tests/reliability/reliability_cluster.py), runs one scenario of
tests/reliability/reliability_scenarios.py at full size and records its figures:

- kill_storm: N organism jobs, the worker SIGKILLed at K random moments (fixed seed)
  and restarted at once; compared with an undisturbed run of the same jobs.
- poison: healthy-job throughput with and without a job that SIGKILLs its worker on
  every attempt (worker/faults.py, enabled only with HCNR_ENV=test).
- restarts: redis-server SIGKILLed and restarted on its port and AOF directory, then the
  API SIGKILLed and restarted, with jobs queued and running.
- cancel: cancel a running job; seconds to `cancelled`, pool-child RSS, storage.
- load: 200 closed-loop users (aiohttp, think 0.5 s) creating and polling jobs against
  the API: the saturation measure.
- load_sdk: 200 users shaped like clients of the SDK (create a job, then `wait` on it at
  the SDK's poll interval): issue 16's "200 concurrent users".
- hostile_work: the hostile-work checkpoints and data of tests/security/hostile_work.py
  (issue 14) posted to `hcnr serve --no-worker` one by one (each refused with its code
  within its limit), then 20 at once while GET routes and /healthz are timed against
  their idle latency.

Results accumulate in bench/results/reliability.json (a section run again replaces its
entry); reliability.md is regenerated from all of them. Every figure is measured here.

Other modules may add sections: if `bench/reliability_security.py` is importable, its
`SECTIONS` (name -> callable(workdir: Path) -> {"title", "rows": [(figure, value)],
"command"}) run with these ones and `--only` selects among all of them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from tests.reliability import reliability_load  # noqa: E402
from tests.reliability import reliability_scenarios as scenarios  # noqa: E402
from tests.reliability.reliability_cluster import Inputs, cluster, organism_inputs  # noqa: E402

Section = Callable[[Path], dict[str, Any]]
FAULTS = "crash_on_label=poison:yes,slow_on_label=slow:yes:0.2"


class Options:
    """Sizes of the scenarios (command-line flags); `command()` reproduces one section."""

    defaults: ClassVar[dict[str, Any]] = {
        "jobs": 20,
        "kills": 5,
        "kill_cap": 6,
        "seed": 0,
        "healthy_jobs": 6,
        "restart_jobs": 4,
        "users": 200,
        "seconds": 60.0,
        "think": 0.5,
        "poll_interval": reliability_load.sdk_poll_interval(),
        "polls": 10,
        "api_workers": 1,
        "burst": 20,
        "sample_seconds": 15.0,
    }

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.organism_cache = Path(args.organism_cache)
        for key in self.defaults:
            setattr(self, key, getattr(args, key))

    def command(self, name: str, *keys: str) -> str:
        argv = [".venv/bin/python", "-m", "bench.reliability", "--only", name]
        for key in keys:
            value = getattr(self, key)
            if value != self.defaults[key]:
                argv += [f"--{key.replace('_', '-')}", str(value)]
        return shlex.join(argv)

    def inputs(self) -> Inputs:
        return organism_inputs(self.organism_cache)


def _delta(result: dict[str, Any]) -> float | None:
    if result["rss_after_mib"] is None or result["rss_baseline_mib"] is None:
        return None
    return round(result["rss_after_mib"] - result["rss_baseline_mib"], 1)


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


# --- the sections ------------------------------------------------------------------------------


def kill_storm(options: Options, workdir: Path) -> dict[str, Any]:
    inputs = options.inputs()
    timeout = 600.0
    cap = options.kill_cap
    with cluster(workdir, inputs, max_attempts=cap) as running:
        reference = scenarios.reference_run(running, options.jobs, timeout * options.jobs)
        storm = scenarios.kill_storm(running, reference, options.kills, options.seed, timeout)
    rows = [
        (
            "jobs / worker SIGKILLs (parent + pool child, seed)",
            f"{storm['jobs']} / {storm['kills']} (seed {options.seed})",
        ),
        ("jobs lost", storm["lost"]),
        ("jobs succeeded", f"{storm['succeeded']} of {storm['jobs']}"),
        (
            "outputs bit-identical to the undisturbed run (sha256 of every file but the "
            "timings report)",
            f"{storm['identical']} of {storm['jobs']}",
        ),
        ("jobs failed", storm["failed"]),
        ("max attempts per job (cap HCNR_MAX_ATTEMPTS)", f"{storm['max_attempts']} (cap {cap})"),
        ("jobs re-queued by the reconciler", storm["requeued"]),
        (
            "median recovery: kill → a job progressing on the restarted worker (s)",
            storm["recovery_seconds_median"],
        ),
        (
            "median kill → the killed job running again (s)",
            storm["victim_running_again_seconds_median"],
        ),
        ("scratch/staging leftovers", len(storm["leftovers"])),
        (
            "wall: undisturbed / with kills (s)",
            f"{reference['wall_seconds']} / {storm['wall_seconds']}",
        ),
        ("median job run time, undisturbed (s)", reference["job_seconds_median"]),
    ]
    reference = {k: v for k, v in reference.items() if k != "digests"}
    return {
        "title": "Kill storm: worker SIGKILLed at random moments",
        "rows": rows,
        "command": options.command("kill_storm", "jobs", "kills", "seed", "kill_cap"),
        "notes": "HCNR_MAX_ATTEMPTS = kills + 1, so that the kills alone cannot exhaust the "
        "cap (with the default 3, a run of 5 kills can hit the same job 3 times and "
        "the reconciler fails it `worker_lost`, as designed; the poison section covers the "
        "cap); lease 5 s, heartbeat 1 s, reconciler every 1 s; the worker is restarted "
        "as soon as it dies (a container restart policy); a kill lands a random "
        "0.1–1.0 median-job-lengths after a job is seen progressing.",
        "details": {"reference": reference, "storm": storm},
    }


def poison(options: Options, workdir: Path) -> dict[str, Any]:
    inputs = options.inputs()
    n = options.healthy_jobs
    with cluster(workdir, inputs, fault_injection=FAULTS) as running:
        clean = scenarios.healthy_throughput(running, n, poison=False, timeout=600.0 * n)
        dirty = scenarios.healthy_throughput(running, n, poison=True, timeout=600.0 * n)
    bad = dirty["poison"]
    ratio = dirty["jobs_per_minute"] / clean["jobs_per_minute"]
    rows = [
        ("poison job: final status (error code)", f"{bad['status']} ({bad['error_code']})"),
        ("poison job: attempts (cap 3)", bad["attempts"]),
        (
            "healthy jobs succeeded without / with the poison job",
            f"{clean['succeeded']} of {n} / {dirty['succeeded']} of {n}",
        ),
        ("healthy throughput without poison (jobs/min)", clean["jobs_per_minute"]),
        ("healthy throughput with poison queued first (jobs/min)", dirty["jobs_per_minute"]),
        ("with / without", f"{ratio:.2f}"),
        ("poison leftovers in storage/scratch", len(bad["leftovers"])),
    ]
    return {
        "title": "Poison job: SIGKILLs its worker on every attempt",
        "rows": rows,
        "command": options.command("poison", "healthy_jobs"),
        "notes": "The poison job (metadata poison=yes, HCNR_FAULT_INJECTION set in the worker's "
        "environment, HCNR_ENV=test) kills its pool child right after each claim; "
        "Celery replaces the child and the reconciler re-queues the job when its lease "
        "expires, until the attempt cap fails it.",
        "details": {"without": clean, "with": dirty},
    }


def restarts(options: Options, workdir: Path) -> dict[str, Any]:
    inputs = options.inputs()
    with cluster(workdir, inputs, requeue_queued_seconds=20) as running:
        result = scenarios.restarts(running, options.restart_jobs, timeout=600.0)
    rows = [
        (
            "jobs (queued and running at the restarts, + 1 created while the broker was "
            "down, + 1 after the API restart)",
            result["jobs"],
        ),
        ("jobs lost", result["lost"]),
        ("jobs succeeded", f"{result['succeeded']} of {result['jobs']}"),
        (
            "messages in the Redis queue before the kill / after the restart",
            f"{result['redis_queue_before_kill']} / {result['redis_queue_after_restart']}",
        ),
        (
            "POST /v1/repair-jobs while the broker is down (s)",
            result["create_while_broker_down_seconds"],
        ),
        (
            "broker down / API down (s)",
            f"{result['broker_down_seconds']} / {result['api_down_seconds']}",
        ),
        (
            "reconciler re-queues: lease expired / stale queued message re-sent",
            f"{result['requeued']} / {result['resent']}",
        ),
        ("max attempts per job", result["max_attempts"]),
    ]
    return {
        "title": "Broker and API restarts with jobs queued and running",
        "rows": rows,
        "command": options.command("restarts", "restart_jobs"),
        "notes": "redis-server (AOF, appendfsync everysec) SIGKILLed, 2 s down, restarted "
        "on the same port and directory; then `hcnr serve` SIGKILLed and restarted on "
        "the same port. HCNR_REQUEUE_QUEUED_SECONDS=20 for this run (default 900).",
        "details": result,
    }


def cancel(options: Options, workdir: Path) -> dict[str, Any]:
    inputs = options.inputs()
    # the long job is slowed by fault injection (slow_on_label): an organism repair takes
    # about a second, less than the scenario waits before it cancels
    with cluster(workdir, inputs, fault_injection=FAULTS) as running:
        result = scenarios.cancel_running(running, inputs, timeout=600.0)
    no_artifacts = (
        result["artifacts_api"] == "artifacts_not_ready"
        and result["artifact_rows"] == 0
        and not result["job_dir_exists"]
        and not result["leftovers"]
    )
    rows = [
        ("final status", result["status"]),
        ("progress when cancelled", result["progress_at_cancel"]),
        ("seconds from POST …/cancel to `cancelled`", result["seconds_to_cancelled"]),
        (
            "pool-child RSS: idle after a first job / peak in the job / after cancel (MiB)",
            f"{result['rss_baseline_mib']} / {result['rss_peak_mib']} / {result['rss_after_mib']}",
        ),
        ("RSS after cancel − idle baseline (MiB)", _delta(result)),
        ("same pool child before and after", _yes(result["same_pool_child"])),
        ("no artifact rows, files, staging or scratch left", _yes(no_artifacts)),
    ]
    return {
        "title": "Cancel while running",
        "rows": rows,
        "command": options.command("cancel"),
        "notes": "RSS is VmRSS of the Celery pool child that ran both jobs; 'after' is the "
        "lowest of 20 samples over the 2 s after the job reached `cancelled`. The cancelled "
        "job is the organism repair with every progress event slowed by 0.2 s (fault "
        "injection `slow_on_label`, HCNR_ENV=test), so that it is still running when the "
        "cancel arrives; the seconds to `cancelled` include up to one such sleep.",
        "details": result,
    }


def _cpu_seconds(root_pid: int) -> dict[str, float]:
    """CPU seconds so far of `hcnr serve`'s API process(es) and of its validation worker
    (with the validations' child processes, reaped ones included)."""
    import psutil

    totals = {"api": 0.0, "validator": 0.0}
    root = psutil.Process(root_pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            times, command = process.cpu_times(), " ".join(process.cmdline())
        except psutil.NoSuchProcess:
            continue
        if process.pid == root.pid or "spawn_main" in command:  # uvicorn (its --workers)
            totals["api"] += times.user + times.system
        elif "celery" in command and "--multiprocessing-fork" not in command:
            totals["validator"] += times.user + times.system
            totals["validator"] += times.children_user + times.children_system
        else:  # the validations' forkserver and its children
            totals["validator"] += times.user + times.system
    return totals


def _databases_cpu_seconds(running: Any) -> dict[str, float]:
    """CPU seconds so far of the cluster's PostgreSQL (postmaster, its backends, the ones
    that exited) and redis-server; empty when they cannot be read."""
    import psutil

    totals: dict[str, float] = {}
    with contextlib.suppress(Exception):
        pid_file = running._postgres.data / "postmaster.pid"
        postmaster = psutil.Process(int(pid_file.read_text().split()[0]))
        times = postmaster.cpu_times()
        total = times.user + times.system + times.children_user + times.children_system
        for child in postmaster.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child_times = child.cpu_times()
                total += child_times.user + child_times.system
        totals["PostgreSQL"] = total
    with contextlib.suppress(Exception):
        times = psutil.Process(running.redis.process.pid).cpu_times()
        totals["Redis"] = times.user + times.system
    return totals


def _previous_load(name: str = "load") -> list[tuple[str, str]]:
    """The headline figures of the load section this run replaces (read from
    reliability.json, as measured then): before/after stays visible in the results."""
    previous = load_results()["sections"].get(name) or {}
    details, run = previous.get("details") or {}, previous.get("run") or {}
    if not details.get("routes"):
        return []
    routes = details["routes"]
    gets = [f["p95_ms"] for r, f in routes.items() if r.startswith("GET") and f["p95_ms"]]
    return [
        (
            f"previous run (commit {run.get('commit', '?')}, {run.get('date', '?')}): "
            "requests per s / POST /v1/repair-jobs p95 (ms) / GET p95 range (ms)",
            f"{details.get('requests_per_second')} / "
            f"{routes['POST /v1/repair-jobs']['p95_ms']} / "
            f"{min(gets, default=0)}–{max(gets, default=0)}",
        )
    ]


GOAL_P95_MS = 200.0  # issue 16: POST /v1/repair-jobs p95 under 200 ms at 200 users


def _measure_load(
    options: Options, workdir: Path, name: str, shape: str, think: float, tenants: int
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """One load run against a fresh cluster: the figures and the rows both sections share."""
    inputs = options.inputs()
    previous = _previous_load(name)
    processes = {"api_workers": options.api_workers} if options.api_workers > 1 else {}
    with cluster(workdir, inputs, **processes) as running:
        before = _cpu_seconds(running.api.process.pid) | _databases_cpu_seconds(running)
        generator = time.process_time()
        load_average = os.getloadavg()[0]
        result = reliability_load.load(
            running,
            options.users,
            options.seconds,
            think=think,
            tenants=tenants,
            shape=shape,
            polls=options.polls,
        )
        generator = time.process_time() - generator
        after = _cpu_seconds(running.api.process.pid) | _databases_cpu_seconds(running)
        result["load_average_1min"] = [round(load_average, 1), round(os.getloadavg()[0], 1)]
    wall = result["total_seconds"]  # CPU was measured over the whole run (with a ramp-up)
    served = result["requests_total"]
    cpu = {key: after[key] - before[key] for key in after if key in before}
    cpu["load generator"] = generator
    result["cpu_seconds"] = {key: round(value, 1) for key, value in cpu.items()}
    post_p95 = result["routes"]["POST /v1/repair-jobs"]["p95_ms"]
    get_p95 = [
        f["p95_ms"] for r, f in result["routes"].items() if r.startswith("GET") and f["p95_ms"]
    ]
    result["goal_met"] = post_p95 is not None and post_p95 < GOAL_P95_MS
    rows = [
        (
            f"goal: POST /v1/repair-jobs p95 < {GOAL_P95_MS:.0f} ms — met?",
            f"{_yes(result['goal_met'])} (POST p95 {post_p95} ms; GET p95 "
            f"{'all' if all(v < GOAL_P95_MS for v in get_p95) else 'NOT all'} "
            f"< {GOAL_P95_MS:.0f} ms: {min(get_p95, default=0)}–{max(get_p95, default=0)})",
        ),
        (
            "users (API keys) / duration (s) / think time or poll interval (s) / API processes",
            f"{result['users']} ({tenants}) / {result['seconds']:g} / {think:g} / "
            f"{options.api_workers}",
        ),
        ("requests (per s)", f"{result['requests']} ({result['requests_per_second']})"),
        ("errors (rate)", f"{result['errors']} ({result['error_rate']})"),
        ("jobs submitted (201) / rows in PostgreSQL", f"{result['submitted']} / {result['rows']}"),
        (
            "load average (1 min) at start / end (every process on the machine, this run's "
            "and the previous section's included: it lags by about a minute)",
            " / ".join(str(v) for v in result["load_average_1min"]),
        ),
    ]
    for component, seconds in cpu.items():
        rows.append(
            (
                f"CPU of the {component}: share of 2 cores, ms per request",
                f"{100 * seconds / wall / 2:.0f}%, {1000 * seconds / max(1, served):.2f}",
            )
        )
    rows.append(("jobs still `validating` when the load ended", str(result["validating_after"])))
    all_ms = 1000 * sum(cpu.values()) / max(1, served)
    result["service_cpu_ms_per_request"] = round(all_ms, 2)
    rows.append(
        (
            "CPU per request of everything above together (ms) → most requests/s 2 idle "
            "cores could serve, with no other process on the machine",
            f"{all_ms:.2f} → {2000 / all_ms:.0f}",
        )
    )
    api_ms = 1000 * cpu["api"] / max(1, served)
    result["api_capacity_per_second"] = round(1000 / api_ms) if api_ms else None
    rows.append(
        (
            "the API's capacity at its CPU per request, one core / two cores (req/s)",
            f"{1000 / api_ms:.0f} / {2000 / api_ms:.0f}",
        )
    )
    rows += previous
    for route, figures in result["routes"].items():
        if not figures["requests"]:
            continue
        rows.append(
            (
                f"{route}: p50 / p95 / p99 (ms), requests",
                f"{figures['p50_ms']} / {figures['p95_ms']} / {figures['p99_ms']}, "
                f"{figures['requests']}",
            )
        )
    return result, rows


SETUP_NOTES = (
    "uvicorn (`hcnr serve --no-worker`: one API process unless --api-workers, and its "
    "validation worker) + PostgreSQL + Redis on loopback; no GPU worker runs, so jobs are "
    "validated "
    "(asynchronously, in the validation worker at nice 10: POST answers `validating` at "
    "once) and then stay queued; the CPU goes to the API, the validations, the databases "
    "and the load generator (one asyncio process on aiohttp, same machine). CPU rows: "
    "seconds of CPU over the run's wall time and 2 cores, and per request served; other "
    "processes on the machine (the load average) get their share too: Linux groups CPU by "
    "session (autogroup), so another session's nice 15 does not make it yield. p95 by "
    "nearest rank over every request of the route. The users' jobs name no `method`: "
    "they get the default (auto since commit 322144e, hcnr before; POST then also checks "
    "auto's candidates)."
)


def load(options: Options, workdir: Path) -> dict[str, Any]:
    result, rows = _measure_load(options, workdir, "load", "mix", options.think, tenants=10)
    offered = options.users / options.think if options.think else float("inf")
    rows.insert(
        3,
        (
            "offered at zero latency (users / think time) vs the API's capacity, one core (req/s)",
            f"{offered:.0f} vs {result['api_capacity_per_second']}",
        ),
    )
    return {
        "title": "Load: concurrent users against the API, saturation (closed loop)",
        "rows": rows,
        "command": options.command("load", "users", "seconds", "think", "api_workers"),
        "notes": SETUP_NOTES + " Each user uploads its two files, then loops: create a job, "
        "poll it 3×, list jobs, read its events, with the think time between requests "
        "(10 API keys, 20 users each). A closed loop whose users offer more requests than one "
        "API process serves here: it measures saturation, where latency ≈ users / "
        "throughput − think time (Little's law), so a p95 under 200 ms at 200 such users "
        "needs about users / (think + 0.2 s) ≈ 290 req/s served with room to spare, i.e. "
        "CPU for it: see the capacity row. The bound on this machine is CPU: requests/s at "
        "most 2 cores / (CPU per request of the whole service, the row above), less what "
        "other sessions' processes take (the load average); POST costs about 3× a GET "
        "(more round trips: idempotency look-up, the job's files, three INSERTs, COMMIT, the "
        "validation message and its task event). A deployment serves more with more API "
        "processes per host (`hcnr serve --workers N`, HCNR_API_WORKERS, about one per "
        "core the API may have; each with its own database pool) and more API replicas "
        "behind its load balancer. What 200 users of the SDK send is the next section "
        "(`load_sdk`).",
        "details": result,
    }


def load_sdk(options: Options, workdir: Path) -> dict[str, Any]:
    interval = options.poll_interval
    result, rows = _measure_load(
        options, workdir, "load_sdk", "sdk", interval, tenants=options.users
    )
    return {
        "title": "Load: 200 concurrent users of the SDK (create a job, then wait on it)",
        "rows": rows,
        "command": options.command(
            "load_sdk", "users", "seconds", "poll_interval", "polls", "api_workers"
        ),
        "notes": SETUP_NOTES + " Each user (its own API key) uploads its two files, then "
        "does what `client.repair_jobs.create(...)` then `client.repair_jobs.wait(job_id)` "
        f"do with the SDK's default poll interval ({reliability_load.sdk_poll_interval():g} "
        "s, read from clients/python): POST the job (a fresh Idempotency-Key), GET it at "
        "once and then every poll interval. No job finishes without a GPU worker, so a "
        f"user starts its next job after {options.polls} polls (a job of ~{options.polls} "
        "s; real repairs take minutes, so real users POST less often than this). Users "
        "start spread over one poll interval.",
        "details": result,
    }


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def _time_gets(url: str, key: str, routes: list[str], until: Callable[[], bool]) -> dict:
    """GET each route in turn (one client, 20 ms between requests) until `until()`;
    milliseconds per route and non-200 answers."""
    import httpx

    times: dict[str, list[float]] = {route: [] for route in routes}
    failures: list[str] = []
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        while not until():
            for route in routes:
                started = time.perf_counter()
                try:
                    status = client.get(route).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                times[route].append((time.perf_counter() - started) * 1000)
                if status != 200:
                    failures.append(f"{route}: {status}")
                time.sleep(0.02)
    return {"times": times, "failures": failures}


def _latency(times: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    return {
        route: {
            "requests": len(values),
            "p50_ms": round(_percentile(values, 50) or 0, 1),
            "p95_ms": round(_percentile(values, 95) or 0, 1),
            "max_ms": round(max(values, default=0), 1),
        }
        for route, values in times.items()
    }


def hostile_work(options: Options, workdir: Path) -> dict[str, Any]:
    """Issue 14 on a real `hcnr serve`: every hostile-work case refused with its code within
    its limit; then `burst` of them validated at once while GETs and /healthz are timed."""
    import threading

    import httpx

    from hcnr_core.toy import build_toy
    from tests.security import hostile_work as hw
    from tests.service import service_procs as procs

    load_average = os.getloadavg()[0]
    toy = build_toy(workdir / "models", seed=0)
    world = hw.build_work_world(workdir / "models", toy)
    env = procs.service_env(data_dir=workdir / "data", models_root=world.models, **hw.WORK_LIMITS)
    key = procs.create_key(env, "alice")
    process, url = procs.start_api(env, workdir / "serve.log", worker=False)
    headers = {"Authorization": f"Bearer {key}"}
    limit_of = {
        c.name: hw.VALIDATION_TIMEOUT + hw.MARGIN if c.timed else hw.MARGIN for c in world.cases
    }
    try:
        client = httpx.Client(base_url=url, headers=headers, timeout=180)

        def upload(path: Path, purpose: str) -> httpx.Response:
            files = {"file": (path.name, path.read_bytes(), "application/jsonl")}
            return client.post("/v1/files", files=files, data={"purpose": purpose})

        def body(case: hw.WorkCase | None, files: dict[str, str]) -> dict[str, Any]:
            return {
                "base": case.ref if case and case.ref else "path:base",
                "finetuned": "path:finetuned-adapter",
                "honesty_file": files["honesty"],
                "task_file": files["task"],
                "hyperparameters": {"check_adapter_base_name": False},
            }

        def jobs() -> int:
            return len(client.get("/v1/repair-jobs", params={"limit": 100}).json()["data"])

        def code(response: httpx.Response) -> str | None:
            try:
                return (response.json().get("error") or {}).get("code")
            except ValueError:
                return None

        def settle(http: httpx.Client, response: httpx.Response) -> tuple[int | str, Any]:
            """(status, code): a 4xx answer's, or the job's once its validation task is
            done ("failed" with the refusal's code, "queued" when accepted)."""
            if response.status_code != 201:
                return response.status_code, code(response)
            job_url = f"/v1/repair-jobs/{response.json()['id']}"
            while True:
                job = http.get(job_url).json()
                if job["status"] != "validating":
                    return job["status"], (job.get("error") or {}).get("code")
                time.sleep(1.0)  # the SDK's `wait` polls once a second too

        toy_files = {p: upload(toy[p], p).json()["id"] for p in ("honesty", "task")}
        # 1. one at a time (the control first: it is accepted and stays queued)
        control = client.post("/v1/repair-jobs", json=body(None, toy_files))
        control_id = control.json().get("id")
        control_status = settle(client, control)[0]
        single: dict[str, dict[str, Any]] = {}
        bodies: dict[str, dict[str, Any]] = {}
        for case in world.cases:
            files = dict(toy_files)
            before, started = jobs(), time.monotonic()
            if case.honesty:
                response = upload(world.honesty(case), "honesty")
                if response.status_code == 201:
                    files["honesty"] = response.json()["id"]
            if not case.honesty or response.status_code == 201:
                bodies[case.name] = body(case, files)
                response = client.post("/v1/repair-jobs", json=bodies[case.name])
                answered = round(time.monotonic() - started, 3)
                status, refusal = settle(client, response)
            else:
                answered, status, refusal = None, response.status_code, code(response)
            seconds = round(time.monotonic() - started, 2)
            single[case.name] = {
                "stage": "job" if case.name in bodies else "upload",
                "status": status,
                "code": refusal,
                "post_seconds": answered,
                "expected": case.code,
                "seconds": seconds,
                "limit_seconds": limit_of[case.name],
                "jobs_added": jobs() - before,
            }
        # 2. GET latency idle, then while `burst` hostile validations run, then idle again
        routes = [
            "/v1/repair-jobs",
            f"/v1/repair-jobs/{control_id}",
            f"/v1/repair-jobs/{control_id}/events",
            f"/v1/files/{toy_files['honesty']}",
            "/healthz",
        ]

        def timed_for(seconds: float) -> dict:
            end = time.monotonic() + seconds
            return _time_gets(url, key, routes, lambda: time.monotonic() >= end)

        idle = timed_for(options.sample_seconds)
        names = [n for n in bodies]  # every case refused at job creation
        burst_cases = [names[i % len(names)] for i in range(options.burst)]
        outcomes: list[dict[str, Any]] = []
        lock, in_flight, seen_in_flight = threading.Lock(), [0], []
        window_end = time.monotonic() + options.sample_seconds

        def post(name: str) -> None:
            """Post `name` again and again until the window ends: `burst` requests are
            being validated (or waiting for a slot) all through it."""
            with httpx.Client(base_url=url, headers=headers, timeout=180) as own:
                while time.monotonic() < window_end:
                    started = time.monotonic()
                    with lock:
                        in_flight[0] += 1
                    response = own.post("/v1/repair-jobs", json=bodies[name])
                    answered = time.monotonic() - started
                    status, refusal = settle(own, response)
                    with lock:
                        in_flight[0] -= 1
                        outcomes.append(
                            {
                                "case": name,
                                "status": status,
                                "code": refusal,
                                "post_ms": round(1000 * answered, 1),
                                "seconds": round(time.monotonic() - started, 2),
                            }
                        )

        def window_over() -> bool:
            seen_in_flight.append(in_flight[0])
            return time.monotonic() >= window_end

        before = jobs()
        threads = [threading.Thread(target=post, args=(n,), daemon=True) for n in burst_cases]
        burst_started = time.monotonic()
        for thread in threads:
            thread.start()
        time.sleep(0.5)  # every thread has posted
        busy = _time_gets(url, key, routes, window_over)
        for thread in threads:
            thread.join()
        burst_seconds = round(time.monotonic() - burst_started, 1)
        jobs_added_burst = jobs() - before
        after = timed_for(options.sample_seconds)
        client.close()
    finally:
        procs.stop(process)
    idle_l, busy_l, after_l = (_latency(x["times"]) for x in (idle, busy, after))
    ratios = {
        route: round(busy_l[route]["p95_ms"] / idle_l[route]["p95_ms"], 2)
        if idle_l[route]["p95_ms"]
        else None
        for route in routes
    }
    expected_single = {n: r["expected"] for n, r in single.items()}
    refused = (422, "failed")  # at once, or by the validation task
    right = [n for n, r in single.items() if r["code"] == r["expected"] and r["status"] in refused]
    within = [n for n, r in single.items() if r["seconds"] <= r["limit_seconds"]]
    timed = [c.name for c in world.cases if c.timed]
    refused_burst = [o for o in outcomes if o["status"] in refused and o["code"]]
    post_ms = sorted(o["post_ms"] for o in outcomes)
    expected_of = {c.name: c.code for c in world.cases}
    own_code = [o for o in refused_burst if o["code"] == expected_of[o["case"]]]
    burst_within = [o for o in outcomes if o["seconds"] <= limit_of[o["case"]]]
    codes: dict[str, int] = {}
    for o in outcomes:
        codes[str(o["code"])] = codes.get(str(o["code"]), 0) + 1
    label = {
        r: r.replace(control_id or "", "{job}").replace(toy_files["honesty"], "{file}")
        for r in routes
    }
    goal = all(r is not None and r <= 2 for route, r in ratios.items() if route != "/healthz")
    health = busy_l["/healthz"]
    health_failures = [f for f in busy["failures"] if f.startswith("/healthz")]
    rows: list[tuple[str, Any]] = [
        ("load average (1 min) when the section started", f"{load_average:.1f}"),
        ("control job (the toy, same limits): status after validation", control_status),
        (
            "hostile-work cases refused with their expected code (one at a time)",
            f"{len(right)} of {len(single)}",
        ),
        (
            "… refused within their limit (timed: timeout + 10 s, others: 10 s)",
            f"{len(within)} of {len(single)}",
        ),
        (
            "jobs recorded for a refused case (each failed, none queued)",
            sum(r["jobs_added"] for r in single.values()),
        ),
        (
            f"wall-clock cases (limit {hw.VALIDATION_TIMEOUT:g} s): seconds to the refusal",
            ", ".join(f"{n} {single[n]['seconds']}" for n in timed),
        ),
        (
            "other cases: slowest refusal (s)",
            "{1} {0}".format(*max((r["seconds"], n) for n, r in single.items() if n not in timed)),
        ),
        (
            f"{options.burst} clients posting hostile cases for {options.sample_seconds:g} s: "
            "requests in flight when GETs were sent (min / median)",
            f"{min(seen_in_flight)} / {sorted(seen_in_flight)[len(seen_in_flight) // 2]}",
        ),
        (
            "… their jobs: refused (422, or failed by validation, with a code) / with the "
            "case's own code / within the case's limit",
            f"{len(refused_burst)} / {len(own_code)} / {len(burst_within)} of {len(outcomes)}",
        ),
        ("… codes", ", ".join(f"{k} {v}" for k, v in sorted(codes.items()))),
        (
            "… POST /v1/repair-jobs answered in (ms): p50 / p95 / max (validation is async)",
            f"{_percentile(post_ms, 50)} / {_percentile(post_ms, 95)} / {post_ms[-1]}"
            if post_ms
            else "-",
        ),
        ("… jobs created", jobs_added_burst),
        ("… wall from the first post to the last refusal (s)", burst_seconds),
    ]
    for route in routes:
        rows.append(
            (
                f"GET {label[route]}: p95 idle / during the burst / idle after (ms), "
                "ratio during/idle",
                f"{idle_l[route]['p95_ms']} / {busy_l[route]['p95_ms']} / "
                f"{after_l[route]['p95_ms']}, {ratios[route]}",
            )
        )
    rows += [
        (
            "/healthz during the burst: answered 200 / requests, max (ms)",
            f"{health['requests'] - len(health_failures)} / {health['requests']}, "
            f"{health['max_ms']}",
        ),
        ("GET p95 within 2x idle during the burst (every route but /healthz)", _yes(goal)),
    ]
    return {
        "title": "Hostile work: refused within limits; the API stays responsive (issue 14)",
        "rows": rows,
        "command": options.command("hostile_work", "burst", "sample_seconds"),
        "notes": "`hcnr serve --no-worker` (SQLite, embedded broker; its validation worker "
        "but no GPU worker: refusals must not queue anything, the control job stays "
        "queued). POST answers `validating` at once; a case's time is until its job "
        "failed (validation task; its client polls the job once a second, as the SDK's "
        "`wait` does) or its 4xx came back; in the burst, validations wait in the queue "
        "for the validation worker's 2 slots, and that wait counts in their time. Under "
        "the small limits "
        "the tests use (tests/security/hostile_work.py WORK_LIMITS: validation "
        f"{hw.VALIDATION_TIMEOUT:g} s, 1 M parameters, 4 MiB of weights, 2048 tokens per "
        "sample, 20000 per job, 1000 samples, 1 MiB of data), defaults otherwise "
        "(max_concurrent_validations 2: a validation waiting for a slot is refused "
        "validation_timeout when its wait reaches the limit, whatever the case). The "
        f"burst: {options.burst} clients, each posting one case (cycling through the cases "
        "refused at job creation; the too-many-samples file is refused at upload) again "
        f"as soon as it is refused, for {options.sample_seconds:g} s. GET latency: one "
        "client, the routes in turn, 20 ms apart, for the same time idle before and after "
        "and during the burst; p95 by nearest rank. Validation children run at nice 10. "
        "The machine is shared (see the load average): latencies are what it gave then.",
        "details": {
            "single": single,
            "expected": expected_single,
            "burst": outcomes,
            "latency": {"idle": idle_l, "burst": busy_l, "idle_after": after_l},
            "ratios": ratios,
            "failures": {"idle": idle["failures"], "burst": busy["failures"]},
        },
    }


OWN: dict[str, Callable[[Options, Path], dict[str, Any]]] = {
    "kill_storm": kill_storm,
    "poison": poison,
    "restarts": restarts,
    "cancel": cancel,
    "load": load,
    "load_sdk": load_sdk,
    "hostile_work": hostile_work,
}


def sections(options: Options) -> dict[str, Section]:
    """This file's sections, then those of bench/reliability_security.py if importable."""
    found: dict[str, Section] = {
        name: (lambda workdir, f=function: f(options, workdir)) for name, function in OWN.items()
    }
    try:
        extra = importlib.import_module("reliability_security")
    except ModuleNotFoundError as exc:
        if exc.name != "reliability_security":
            raise
        return found
    for name, function in getattr(extra, "SECTIONS", {}).items():
        if name in found:
            raise SystemExit(f"reliability_security redefines section {name!r}")
        found[name] = function
    return found


# --- results -----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "commit": commit,
    }


def render(results: dict[str, Any]) -> str:
    lines = [
        "# Reliability benchmark",
        "",
        "Measured by `bench/reliability.py` (every figure below; nothing typed by hand). "
        "Each section names the command that produced it and the machine it ran on.",
        "",
    ]
    for name, section in results["sections"].items():
        lines += [f"## {section['title']} (`{name}`)", ""]
        if section.get("error"):
            lines += ["**Failed:**", "", "```", section["error"], "```", ""]
        else:
            lines += ["| figure | value |", "|---|---|"]
            lines += [f"| {figure} | {value} |" for figure, value in section["rows"]]
            lines.append("")
        if section.get("notes"):
            lines += [section["notes"], ""]
        run = section.get("run", {})
        lines += [
            f"Command: `{section['command']}` — {run.get('date', '?')}, "
            f"{run.get('seconds', '?')} s, {run.get('cpus', '?')} CPUs, "
            f"commit {run.get('commit', '?')}.",
            "",
        ]
    return "\n".join(lines)


def run_sections(chosen: dict[str, Section], workdir: Path, results: dict[str, Any]) -> bool:
    ok = True
    for name, function in chosen.items():
        print(f"== {name}", flush=True)
        started = time.monotonic()
        section_dir = workdir / name
        section_dir.mkdir(parents=True, exist_ok=True)
        try:
            section = dict(function(section_dir))
            section["rows"] = [list(row) for row in section["rows"]]
        except Exception:
            ok = False
            section = {
                "title": name,
                "rows": [],
                "command": f".venv/bin/python -m bench.reliability --only {name}",
                "error": traceback.format_exc(limit=8),
            }
        section["run"] = {
            **machine(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "seconds": round(time.monotonic() - started, 1),
        }
        results = load_results()  # another run may have written other sections meanwhile
        results["sections"] = _placed(results["sections"], name, section)
        for figure, value in section["rows"]:
            print(f"   {figure}: {value}", flush=True)
        if section.get("error"):
            print(section["error"], flush=True)
        write(results)
    return ok


def _placed(sections: dict[str, Any], name: str, section: dict[str, Any]) -> dict[str, Any]:
    """`sections` with `name` set: in its place if it was there, else right after the
    section of this file that precedes it (so `load_sdk` follows `load`), else last."""
    if name in sections or name not in OWN:
        return {**sections, name: section}
    own = list(OWN)
    before = [n for n in own[: own.index(name)] if n in sections]
    if not before:
        return {**sections, name: section}
    placed: dict[str, Any] = {}
    for key, value in sections.items():
        placed[key] = value
        if key == before[-1]:
            placed[name] = section
    return placed


def write(results: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "reliability.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (RESULTS / "reliability.md").write_text(render(results))


def load_results() -> dict[str, Any]:
    path = RESULTS / "reliability.json"
    if path.exists():
        return json.loads(path.read_text())
    return {"sections": {}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated section names (default: all)")
    parser.add_argument("--list", action="store_true", help="print the section names")
    parser.add_argument("--workdir", default=str(ROOT / ".hcnr" / "bench" / "reliability"))
    parser.add_argument(
        "--organism-cache",
        default=os.environ.get("HCNR_ORGANISM_CACHE", str(ROOT / ".hcnr" / "bench" / "organism")),
        help="where the tiny organism (seed 0) is built once and cached",
    )
    for key, value in Options.defaults.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    options = Options(args)
    available = sections(options)
    if args.list:
        print("\n".join(available))
        return 0
    names = args.only.split(",") if args.only else list(available)
    unknown = [n for n in names if n not in available]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(available)}")
    workdir = Path(args.workdir) / time.strftime("%Y%m%d-%H%M%S")
    results = load_results()
    ok = run_sections({n: available[n] for n in names}, workdir, results)
    print(f"wrote {RESULTS / 'reliability.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
