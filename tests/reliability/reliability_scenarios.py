"""The fault scenarios, each a function of a running Cluster that returns its figures.

The tests (small sizes, invariants asserted) and bench/reliability.py (full sizes,
figures written to bench/results/reliability.md) call the same functions.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from collections import Counter
from typing import Any

from hcnr_client import APIStatusError

from tests.reliability.reliability_cluster import TERMINAL, Cluster, poll, rss_bytes, submit, upload


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def _job_seconds(rows: dict[str, Any]) -> list[float]:
    return [
        (row.finished_at - row.started_at).total_seconds()
        for row in rows.values()
        if row.finished_at is not None and row.started_at is not None
    ]


def _outcome(cluster: Cluster, ids: list[str], rows: dict[str, Any]) -> dict[str, Any]:
    statuses = [rows[i].status if i in rows else "missing" for i in ids]
    return {
        "jobs": len(ids),
        "lost": sum(s not in ("succeeded", "failed", "cancelled") for s in statuses),
        "succeeded": statuses.count("succeeded"),
        "failed": statuses.count("failed"),
        "max_attempts": max((rows[i].attempts for i in ids if i in rows), default=0),
        "leftovers": cluster.leftovers(ids),
        "errors": dict(
            Counter(rows[i].error_message for i in ids if i in rows and rows[i].error_message)
        ),
    }


# --- 1. kill storm ---------------------------------------------------------------------------


def reference_run(cluster: Cluster, n_jobs: int, timeout: float) -> dict[str, Any]:
    """The undisturbed run the kill storm is compared with."""
    client = cluster.client("reference")
    files = upload(client, cluster.inputs)
    cluster.start_worker()
    try:
        started = time.monotonic()
        ids = submit(client, cluster.inputs, files, n_jobs)
        rows = cluster.wait_terminal(ids, timeout)
        wall = time.monotonic() - started
    finally:
        cluster.stop_workers()
    digests = [cluster.checkpoint_digests(i) if rows[i].status == "succeeded" else {} for i in ids]
    return {
        **_outcome(cluster, ids, rows),
        "ids": ids,
        "digests": digests,
        "wall_seconds": round(wall, 1),
        "job_seconds_median": _median(_job_seconds(rows)),
    }


def kill_storm(
    cluster: Cluster, reference: dict[str, Any], n_kills: int, seed: int, timeout: float
) -> dict[str, Any]:
    """The same jobs again, the worker SIGKILLed (parent and pool child) at `n_kills`
    random moments and restarted at once, as a container restart policy would."""
    client = cluster.client("storm")
    files = upload(client, cluster.inputs)
    rng = random.Random(seed)
    job_seconds = reference["job_seconds_median"] or 5.0
    worker = cluster.start_worker()
    started = time.monotonic()
    ids = submit(client, cluster.inputs, files, reference["jobs"])
    kills: list[dict[str, Any]] = []

    def running_or_done() -> Any:
        if all(
            row.status in ("succeeded", "failed", "cancelled") for row in cluster.jobs(ids).values()
        ):
            return "done"
        return cluster.running_job(ids)

    try:
        for _ in range(n_kills):
            if poll(running_or_done, timeout) in (None, "done"):
                break  # everything finished: no moment left to kill in
            time.sleep(rng.uniform(0.1, 1.0) * job_seconds)  # somewhere inside a job
            victim = cluster.running_job(ids, progressing=False)
            progress = victim.progress if victim is not None else None
            killed_at = cluster.kill_worker(worker)
            worker = cluster.start_worker()  # the supervisor's restart
            back = poll(running_or_done, timeout)
            recovered = time.monotonic() - killed_at if back not in (None, "done") else None
            again = None
            if victim is not None:
                victim_id = victim.id

                def victim_running(victim_id: str = victim_id) -> Any:
                    if cluster.jobs([victim_id])[victim_id].status in TERMINAL:
                        return "terminal"  # e.g. failed at the attempt cap
                    return cluster.running_job([victim_id])

                again = poll(victim_running, timeout)
            kills.append(
                {
                    "job": victim.id if victim is not None else None,
                    "progress_at_kill": progress,
                    "recovery_seconds": round(recovered, 2) if recovered is not None else None,
                    "victim_running_again_seconds": (
                        round(time.monotonic() - killed_at, 2)
                        if again not in (None, "terminal")
                        else None
                    ),
                }
            )
        rows = cluster.wait_terminal(ids, timeout * max(1, len(ids)))
        wall = time.monotonic() - started
    finally:
        cluster.stop_workers()
    identical = [
        rows[i].status == "succeeded" and cluster.checkpoint_digests(i) == reference["digests"][k]
        for k, i in enumerate(ids)
    ]
    recoveries = [k["recovery_seconds"] for k in kills if k["recovery_seconds"] is not None]
    again = [k["victim_running_again_seconds"] for k in kills if k["victim_running_again_seconds"]]
    return {
        **_outcome(cluster, ids, rows),
        "kills": len(kills),
        "kill_log": kills,
        "identical": sum(identical),
        "requeued": cluster.count_events("requeued", ids),
        "recovery_seconds_median": _median(recoveries),
        "victim_running_again_seconds_median": _median(again),
        "wall_seconds": round(wall, 1),
    }


# --- 2. poison job ---------------------------------------------------------------------------


def healthy_throughput(cluster: Cluster, n_jobs: int, poison: bool, timeout: float) -> dict:
    """Jobs per minute of `n_jobs` healthy jobs, with or without a poison job queued first
    (one that SIGKILLs its pool child on every attempt; see worker/faults.py)."""
    client = cluster.client("poison" if poison else "healthy")
    files = upload(client, cluster.inputs)
    cluster.start_worker()
    try:
        started = time.monotonic()
        bad = []
        if poison:
            bad = submit(client, cluster.inputs, files, 1, metadata={"poison": "yes"})
        ids = submit(client, cluster.inputs, files, n_jobs)
        rows = cluster.wait_terminal(ids, timeout)
        wall = time.monotonic() - started
        bad_rows = cluster.wait_terminal(bad, timeout) if bad else {}
    finally:
        cluster.stop_workers()
    result = {
        **_outcome(cluster, ids, rows),
        "wall_seconds": round(wall, 1),
        "jobs_per_minute": round(60 * n_jobs / wall, 2),
    }
    if bad:
        row = bad_rows[bad[0]]
        result["poison"] = {
            "status": row.status,
            "attempts": row.attempts,
            "error_code": row.error_code,
            "events": cluster.event_types(bad[0]),
            "leftovers": cluster.leftovers(bad),
        }
    return result


# --- 3. broker and API restarts ----------------------------------------------------------------


def restarts(cluster: Cluster, n_jobs: int, timeout: float) -> dict[str, Any]:
    """With jobs queued and one running: SIGKILL redis-server and restart it on the same
    port and AOF directory (a job is created while it is down), then SIGKILL the API and
    restart it (another job is created right after). Every job must still finish."""
    client = cluster.client("restarts")
    files = upload(client, cluster.inputs)
    cluster.start_worker()
    try:
        ids = submit(client, cluster.inputs, files, n_jobs)
        started = time.monotonic()
        assert poll(lambda: cluster.running_job(ids), timeout) is not None, cluster.diagnose(ids)
        queued_before = cluster.redis.queue_length()
        cluster.redis.kill()
        down_at = time.monotonic()
        ids += submit(client, cluster.inputs, files, 1)  # accepted while the broker is down
        create_while_down = round(time.monotonic() - down_at, 2)
        time.sleep(2)
        cluster.redis.start()
        broker_down = round(time.monotonic() - down_at, 2)
        queued_after = cluster.redis.queue_length()
        assert poll(lambda: cluster.running_job(ids), timeout) is not None, cluster.diagnose(ids)
        cluster.api.kill()
        api_down_at = time.monotonic()
        cluster.api.start()
        api_down = round(time.monotonic() - api_down_at, 2)
        ids += submit(client, cluster.inputs, files, 1)
        rows = cluster.wait_terminal(ids, timeout * len(ids))
        wall = time.monotonic() - started
    finally:
        cluster.stop_workers()
    return {
        **_outcome(cluster, ids, rows),
        "redis_queue_before_kill": queued_before,
        "redis_queue_after_restart": queued_after,
        "create_while_broker_down_seconds": create_while_down,
        "broker_down_seconds": broker_down,
        "api_down_seconds": api_down,
        "requeued": cluster.count_events("requeued", ids),
        "resent": cluster.count_events("resent", ids),
        "wall_seconds": round(wall, 1),
    }


# --- 4. cancel while running ---------------------------------------------------------------------


def cancel_running(cluster: Cluster, slow_inputs: Any, timeout: float) -> dict[str, Any]:
    """Warm the pool child with one job (its idle RSS is the baseline), run a long job,
    cancel it mid-run: seconds to `cancelled`, RSS of the same child after, storage."""
    client = cluster.client("cancel")
    files = upload(client, cluster.inputs)
    slow_files = upload(client, slow_inputs)
    worker = cluster.start_worker()
    try:
        warm = submit(client, cluster.inputs, files, 1)
        rows = cluster.wait_terminal(warm, timeout)
        assert rows[warm[0]].status == "succeeded", rows[warm[0]].error_message
        pid = int(rows[warm[0]].worker_id.rsplit(":", 1)[1])
        time.sleep(1.0)
        baseline = rss_bytes(pid)
        body = {
            "method": "hcnr",
            "base": slow_inputs.base,
            "finetuned": slow_inputs.finetuned,
            "honesty_file": slow_files["honesty"],
            "task_file": slow_files["task"],
            "metadata": {"slow": "yes"},  # each progress event sleeps (worker/faults.py)
        }
        job_id = client.repair_jobs.create(**body).id
        running = poll(lambda: cluster.running_job([job_id]), timeout, interval=0.05)
        assert running is not None, "the long job never ran"
        peak = 0
        deadline = time.monotonic() + 1.5  # let it get well into its work
        while time.monotonic() < deadline:
            peak = max(peak, rss_bytes(pid) or 0)
            time.sleep(0.05)
        progress_at_cancel = cluster.jobs([job_id])[job_id].progress
        requested = time.monotonic()
        status_after_request = client.repair_jobs.cancel(job_id).status
        done = poll(
            lambda: cluster.jobs([job_id])[job_id].status in ("cancelled", "succeeded", "failed"),
            timeout,
            interval=0.05,
        )
        to_cancelled = time.monotonic() - requested if done else None
        after_samples = []
        for _ in range(20):  # RSS over the next 2 s
            after_samples.append(rss_bytes(pid) or 0)
            time.sleep(0.1)
        row = cluster.jobs([job_id])[job_id]
        try:
            client.repair_jobs.list_artifacts(job_id)
            artifacts_error = None
        except APIStatusError as exc:
            artifacts_error = exc.code
        same_child = pid in worker.pool_pids()
    finally:
        cluster.stop_workers()
    job_dir = cluster.artifacts_root / "jobs" / job_id
    return {
        "status": row.status,
        "status_after_request": status_after_request,
        "progress_at_cancel": progress_at_cancel,
        "seconds_to_cancelled": round(to_cancelled, 2) if to_cancelled is not None else None,
        "rss_baseline_mib": _mib(baseline),
        "rss_peak_mib": _mib(peak),
        "rss_after_mib": _mib(min(after_samples)),
        "rss_after_last_mib": _mib(after_samples[-1]),
        "same_pool_child": same_child,
        "artifacts_api": artifacts_error,
        "artifact_rows": len(_artifact_rows(cluster, job_id)),
        "job_dir_exists": job_dir.exists(),
        "leftovers": cluster.leftovers([job_id]),
        "events": cluster.event_types(job_id),
    }


def _mib(value: int | None) -> float | None:
    return round(value / 2**20, 1) if value else None


def _artifact_rows(cluster: Cluster, job_id: str) -> list:
    from sqlalchemy import select

    from store.models import Artifact

    with cluster.session_factory() as session:
        return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id)).all())


# --- 5. a stalled worker comes back ---------------------------------------------------------


def stalled_worker(cluster: Cluster, slow_inputs: Any, timeout: float) -> dict[str, Any]:
    """SIGSTOP a worker mid-job (a paused VM, a partition, a swap storm) until its lease
    expires and a second worker re-runs the job, then SIGCONT it while the second attempt
    runs: the job must succeed once, with the second attempt's files intact."""
    import os
    import signal

    client = cluster.client("stalled")
    files = upload(client, slow_inputs)
    body = {
        "method": "hcnr",
        "base": slow_inputs.base,
        "finetuned": slow_inputs.finetuned,
        "honesty_file": files["honesty"],
        "task_file": files["task"],
    }
    first = cluster.start_worker()
    try:
        job_id = client.repair_jobs.create(**body).id
        assert poll(lambda: cluster.running_job([job_id]), timeout), cluster.diagnose([job_id])
        os.killpg(first.process.pid, signal.SIGSTOP)
        cluster.start_worker()

        def second_attempt_progressing() -> bool:
            row = cluster.jobs([job_id])[job_id]
            return row.status == "running" and row.attempts == 2 and row.progress > 0

        moved = poll(second_attempt_progressing, timeout)
        os.killpg(first.process.pid, signal.SIGCONT)
        assert moved, cluster.diagnose([job_id])
        rows = cluster.wait_terminal([job_id], timeout)
        gave_up = poll(lambda: "lease lost" in first.log.read_text(errors="replace"), 60)
        time.sleep(2)  # let the first worker finish whatever it does after giving up
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.process.pid, signal.SIGCONT)
        cluster.stop_workers()
    row = rows[job_id]
    stored = cluster.checkpoint_digests(job_id) if row.status == "succeeded" else {}
    recorded = {a.name: a.sha256 for a in _artifact_rows(cluster, job_id)}
    recorded.pop("hcnr_report.json", None)
    return {
        "status": row.status,
        "attempts": row.attempts,
        "first_worker_gave_up": bool(gave_up),
        "files_match_artifact_rows": bool(stored) and stored == recorded,
        "leftovers": cluster.leftovers([job_id]),
        "events": cluster.event_types(job_id),
    }
