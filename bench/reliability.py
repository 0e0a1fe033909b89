"""Reliability benchmark: the service under faults, on the built-in model organism.

    .venv/bin/python bench/reliability.py                      # every section
    .venv/bin/python bench/reliability.py --only kill_storm,load

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
- load: async httpx users creating and polling jobs against the API.

Results accumulate in bench/results/reliability.json (a section run again replaces its
entry); reliability.md is regenerated from all of them. Every figure is measured here.

Other modules may add sections: if `bench/reliability_security.py` is importable, its
`SECTIONS` (name -> callable(workdir: Path) -> {"title", "rows": [(figure, value)],
"command"}) run with these ones and `--only` selects among all of them.
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(ROOT / "tests" / "reliability"))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import reliability_load  # noqa: E402
import reliability_scenarios as scenarios  # noqa: E402
from reliability_cluster import Inputs, cluster, organism_inputs  # noqa: E402

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
    }

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.organism_cache = Path(args.organism_cache)
        for key in self.defaults:
            setattr(self, key, getattr(args, key))

    def command(self, name: str, *keys: str) -> str:
        argv = [".venv/bin/python", "bench/reliability.py", "--only", name]
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


def load(options: Options, workdir: Path) -> dict[str, Any]:
    inputs = options.inputs()
    with cluster(workdir, inputs) as running:
        result = reliability_load.load(running, options.users, options.seconds, think=options.think)
    rows = [
        (
            "users / duration (s) / think time (s)",
            f"{result['users']} / {result['seconds']:g} / {result['think_seconds']:g}",
        ),
        ("requests (per s)", f"{result['requests']} ({result['requests_per_second']})"),
        ("errors (rate)", f"{result['errors']} ({result['error_rate']})"),
        ("jobs submitted (201) / rows in PostgreSQL", f"{result['submitted']} / {result['rows']}"),
    ]
    for route, figures in result["routes"].items():
        rows.append(
            (
                f"{route}: p50 / p95 / p99 (ms), requests",
                f"{figures['p50_ms']} / {figures['p95_ms']} / {figures['p99_ms']}, "
                f"{figures['requests']}",
            )
        )
    return {
        "title": "Load: concurrent users against the API",
        "rows": rows,
        "command": options.command("load", "users", "seconds", "think"),
        "notes": "uvicorn (`hcnr serve --no-worker`, one process) + PostgreSQL + Redis on "
        "loopback; no worker runs, so jobs stay queued and the CPU goes to the API, the "
        "databases and the load generator (one asyncio process, same machine). Each user "
        "uploads its two files, then loops: create a job, poll it 3×, list jobs, read its "
        "events, with the think time between requests.",
        "details": result,
    }


OWN: dict[str, Callable[[Options, Path], dict[str, Any]]] = {
    "kill_storm": kill_storm,
    "poison": poison,
    "restarts": restarts,
    "cancel": cancel,
    "load": load,
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
                "command": f".venv/bin/python bench/reliability.py --only {name}",
                "error": traceback.format_exc(limit=8),
            }
        section["run"] = {
            **machine(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "seconds": round(time.monotonic() - started, 1),
        }
        results = load_results()  # another run may have written other sections meanwhile
        results["sections"][name] = section
        for figure, value in section["rows"]:
            print(f"   {figure}: {value}", flush=True)
        if section.get("error"):
            print(section["error"], flush=True)
        write(results)
    return ok


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
