"""One job run: claim the row, run the pipeline with progress -> database, publish.

Called by the Celery task with a job id; it opens its own sessions and records every
state change, progress step and error on the job row.
"""

from __future__ import annotations

import logging
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from hcnr_core.errors import HCNRError, JobTimeoutError, RepairCancelled
from hcnr_core.limits import use_limits
from hcnr_core.methods import MethodInputs
from hcnr_core.progress import ProgressEvent
from hcnr_core.registry import get_method
from hcnr_core.writer import sha256_file
from store import job_state, repositories
from store.db import session_scope
from store.models import Artifact, File, Job
from store.references import resolve_reference
from store.settings import Settings
from store.storage import Storage, job_prefix
from worker import cleanup, faults, hub_card, job_tracking
from worker import metrics as worker_metrics

log = logging.getLogger("hcnr.worker")


def worker_id() -> str:
    import os

    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Context:
    settings: Settings
    session_factory: sessionmaker[Session]
    storage: Storage
    worker: str = field(default_factory=worker_id)
    # Sends the webhook delivery task of a finished job (worker.celery_app.notify_with);
    # None: no webhooks (the delivery itself never runs here, in the GPU worker's job).
    notify: Callable[[str], None] | None = None


def checkpoint_prefix(job_id: str) -> str:
    return f"{job_prefix(job_id)}/checkpoint"


# --- lease and cancellation ------------------------------------------------------------


class Lease:
    """Renews the job's lease in a thread and notices cancellation requests.

    It also enforces `job_timeout_seconds` (issue 14): at the limit it asks the job to
    stop (`timed_out`, `cancelled`); if the job has not stopped
    `job_timeout_grace_seconds` later, it records the job failed (code timeout) itself
    and renews no more, so a stuck job is never kept alive by its lease."""

    def __init__(self, ctx: Context, job_id: str):
        self.ctx, self.job_id = ctx, job_id
        self.cancelled, self._stop = threading.Event(), threading.Event()
        self.timed_out = threading.Event()
        self.deadline = time.monotonic() + ctx.settings.job_timeout_seconds
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"lease-{job_id}")

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        settings = self.ctx.settings
        give_up = self.deadline + settings.job_timeout_grace_seconds
        next_renewal = time.monotonic() + settings.heartbeat_seconds
        while True:
            now = time.monotonic()
            wake = min(next_renewal, give_up if self.timed_out.is_set() else self.deadline)
            if self._stop.wait(max(0.0, wake - now)):
                return
            now = time.monotonic()
            if now >= self.deadline and not self.timed_out.is_set():
                log.warning("job %s: past job_timeout_seconds; stopping it", self.job_id)
                self.timed_out.set()
                self.cancelled.set()
            if self.timed_out.is_set() and now >= give_up:
                self._record_timeout()
                return  # no more renewals: the row is terminal now
            if now >= next_renewal:
                next_renewal = now + settings.heartbeat_seconds
                try:
                    self.renew()
                except Exception:
                    log.exception("lease renewal of %s failed", self.job_id)

    def renew(self) -> None:
        with session_scope(self.ctx.session_factory) as session:
            status = job_state.renew_lease(
                session, self.job_id, self.ctx.worker, self.ctx.settings.lease_seconds
            )
        if status != "running":  # cancelling, or no longer ours (None): stop
            if status is None and not self.cancelled.is_set():
                log.warning("job %s: lease lost to another attempt; stopping", self.job_id)
            self.cancelled.set()

    def _record_timeout(self) -> None:
        """The job did not stop within the grace: failed (timeout), recorded from here."""
        outcome = timeout_outcome(self.ctx.settings)
        try:
            _finish(self.ctx, self.job_id, "failed", outcome)
        except Exception:
            log.exception("could not record the timeout of %s", self.job_id)


def timeout_outcome(settings: Settings) -> dict[str, str]:
    limit = settings.job_timeout_seconds
    return {
        "code": JobTimeoutError.code,
        "message": f"the job ran past its {limit:g}-second limit (job_timeout_seconds)",
    }


class ProgressRecorder:
    """Pipeline progress -> the job row (throttled) and one event per stage."""

    def __init__(
        self,
        ctx: Context,
        job_id: str,
        lease: Lease,
        delay: float = 0.0,
        tracker: worker_metrics.JobTracker | None = None,
    ):
        self.ctx, self.job_id, self.lease = ctx, job_id, lease
        self.tracker = tracker  # the worker's metrics: the stage this job is in
        self.delay = delay  # fault injection only (worker/faults.py): 0 in production
        self.started = time.monotonic()
        self.stage: str | None = None
        self.last_write = 0.0
        self.stage_started = self.started
        self.stage_seconds: dict[str, float] = {}  # the method's report has the final ones

    def __call__(self, event: ProgressEvent) -> None:
        if self.delay:
            time.sleep(self.delay)
        if event.record is not None:  # a result (auto's candidates): always an event
            with session_scope(self.ctx.session_factory) as session:
                job = repositories.get_job_by_id(session, self.job_id)
                repositories.add_event(session, job, "candidate", event.message, event.record)
        now = time.monotonic()
        new_stage = event.stage != self.stage
        if new_stage:
            if self.stage is not None:
                self.stage_seconds[self.stage] = round(now - self.stage_started, 4)
            self.stage_started = now
            if self.tracker is not None:
                self.tracker.stage(event.stage, self.stage_seconds)
        if not new_stage and now - self.last_write < self.ctx.settings.progress_interval_seconds:
            return
        self.stage, self.last_write = event.stage, now
        elapsed = now - self.started
        eta = elapsed * (1 - event.fraction) / event.fraction if event.fraction > 0.02 else None
        with session_scope(self.ctx.session_factory) as session:
            job = repositories.get_job_by_id(session, self.job_id)
            if job.worker_id != self.ctx.worker:  # re-queued while we stalled: not ours
                self.lease.cancelled.set()
                return
            job.stage, job.progress = event.stage, round(event.fraction, 4)
            job.eta_seconds = round(eta, 1) if eta is not None else None
            job.stage_seconds = dict(self.stage_seconds)
            if new_stage:
                repositories.add_event(session, job, "stage", f"stage {event.stage} started")
            if job.status != "running":
                self.lease.cancelled.set()

    def should_cancel(self) -> bool:
        return self.lease.cancelled.is_set()


# --- the run ---------------------------------------------------------------------------


def run_job(job_id: str, ctx: Context) -> str:
    """Run one job if it can be claimed; returns its final (or current) status."""
    with session_scope(ctx.session_factory) as session:
        job = job_state.claim(session, job_id, ctx.worker, ctx.settings.lease_seconds)
        if job is None:
            job = repositories.get_job_by_id(session, job_id)
            return job.status if job else "missing"
        labels, attempt, method = job.metadata_dict, job.attempts, job.method
    faults.crash_if_poisoned(job_id, labels)  # a no-op unless a test switched it on
    if attempt > 1:  # earlier attempts died (the claim needed their lease gone): clear up
        cleanup.remove_leftovers(ctx.settings, job_id, ctx.storage)
    scratch = ctx.settings.scratch_dir / f"{job_id}-{ctx.worker.replace(':', '-')}"
    tracker = worker_metrics.JobTracker(method, ctx.settings.worker_device.split(","))
    result, outcome = "error", {}
    try:
        with Lease(ctx, job_id) as lease:
            status, outcome = _execute(ctx, job_id, lease, scratch, tracker)
            if _finish(ctx, job_id, status, outcome):
                result = status
            else:  # the lease thread recorded the timeout, or another attempt holds it
                result = "failed" if lease.timed_out.is_set() else "lost"
    finally:
        # The stages as the row records them: the report's on success, else those the
        # progress recorder completed.
        report = outcome.get("report") if result == "succeeded" else None
        tracker.finish(result, report.get("stage_seconds", {}) if report is not None else None)
        shutil.rmtree(scratch, ignore_errors=True)
    notify(ctx, job_id)
    return status


def _execute(
    ctx: Context,
    job_id: str,
    lease: Lease,
    scratch: Path,
    tracker: worker_metrics.JobTracker | None = None,
) -> tuple[str, dict]:
    try:
        report, out = _repair(ctx, job_id, lease, scratch, tracker)
        return "succeeded", {"report": report, "out": out}
    except RepairCancelled:
        if lease.timed_out.is_set():
            return "failed", timeout_outcome(ctx.settings)
        return "cancelled", {}
    except HCNRError as exc:
        if lease.timed_out.is_set():
            return "failed", timeout_outcome(ctx.settings)
        return "failed", {"code": exc.code, "message": str(exc)}
    except Exception as exc:  # recorded on the row: the user sees what went wrong
        log.exception("job %s failed", job_id)
        return "failed", {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"}


def _inputs(ctx: Context, job: Job, scratch: Path) -> dict[str, Any]:
    def local(file_id: str | None) -> Path | None:
        if file_id is None:
            return None
        with session_scope(ctx.session_factory) as session:
            file = session.get(File, file_id)
        path = ctx.storage.local_path(file.storage_key)
        return path or ctx.storage.get_file(file.storage_key, scratch / f"{file.id}.jsonl")

    root, cache = ctx.settings.models_dir, ctx.settings.model_cache
    return {
        # what the validation pinned (hub commit, S3 listing), from the cache, offline
        "base": resolve_reference(job.base_resolved or job.base_ref, root, cache),
        "finetuned": resolve_reference(job.finetuned_resolved or job.finetuned_ref, root, cache),
        "honesty": local(job.honesty_file_id),
        "task": local(job.task_file_id),
        "eval": local(job.eval_file_id),
        "validation": local(job.validation_file_id),
    }


def _output_dir(ctx: Context, job_id: str, scratch: Path) -> Path:
    local = ctx.storage.local_path(checkpoint_prefix(job_id))
    if local is None:
        return scratch / "checkpoint"
    if local.exists():  # left by an attempt that died after publishing, before recording
        shutil.rmtree(local)
    return local


def _repair(
    ctx: Context,
    job_id: str,
    lease: Lease,
    scratch: Path,
    tracker: worker_metrics.JobTracker | None = None,
) -> tuple[dict, Path]:
    with session_scope(ctx.session_factory) as session:
        job = repositories.get_job_by_id(session, job_id)
    scratch.mkdir(parents=True, exist_ok=True)
    inputs = _inputs(ctx, job, scratch)
    method = get_method(job.method)
    config = method.make_config(job.hyperparameters)
    options = ctx.settings.run_options
    delay = faults.progress_delay(job.metadata_dict)
    recorder = ProgressRecorder(ctx, job_id, lease, delay, tracker)
    out = _output_dir(ctx, job_id, scratch)
    tracking = job_tracking.start(ctx, job, config, options, scratch)  # never raises
    with (
        job_tracking.closed_on_error(tracking),
        use_limits(ctx.settings.limits),  # the service's limits apply in `prepare` too
    ):
        report = method.run(
            config,
            MethodInputs(
                inputs["base"],
                inputs["finetuned"],
                inputs["honesty"],
                inputs["task"],
                inputs["validation"],
            ),
            out,
            options=options,
            progress=tracking.progress(recorder),
            should_cancel=recorder.should_cancel,
        )
    report["report_name"] = method.report_name
    try:  # from here on a published local checkpoint must go if anything stops the job
        if inputs["eval"] is not None:
            recorder(ProgressEvent("evaluate", 0, 1, 1.0, "before/after honesty metrics"))
            report["metrics"] = evaluate(config, options, inputs, out, recorder.should_cancel)
            _reliability_artifact(report, out)
        hub_card.publish(job, report, out, eval_name=job.eval_file_id)  # the Hub model card
        job_tracking.finish(tracking, report, out)  # before the upload: wandb-offline.tar
        if lease.cancelled.is_set():
            raise RepairCancelled("cancelled after the last step")
        if not ctx.storage.is_local:
            ctx.storage.put_dir(out, checkpoint_prefix(job_id))
    except BaseException as exc:
        job_tracking.abandon(tracking, exc)
        _discard(ctx, job_id, out)
        raise
    return report, out


RELIABILITY_PNG = "reliability.png"


def _reliability_artifact(report: dict, out: Path) -> None:
    """The reliability diagram of base, fine-tuned and repaired answers, as an artifact."""
    from hcnr_core.evaluation import reliability_diagram

    curves = {
        name: report["metrics"][name].get("calibration")
        for name in ("base", "finetuned", "repaired")
    }
    path = reliability_diagram(curves, out / RELIABILITY_PNG)
    if path is not None:
        report.setdefault("files", {})[RELIABILITY_PNG] = {
            "sha256": sha256_file(path),
            "bytes": path.stat().st_size,
        }


def _discard(ctx: Context, job_id: str, out: Path) -> None:
    if not _location_is_ours(ctx, job_id):
        log.warning("job %s: another attempt owns %s; leaving it", job_id, out)
        return
    shutil.rmtree(out, ignore_errors=True)
    if not ctx.storage.is_local:
        ctx.storage.delete_prefix(checkpoint_prefix(job_id))


def _location_is_ours(ctx: Context, job_id: str) -> bool:
    """False once another attempt holds the job, or has published and recorded it: a
    stalled worker that comes back must not delete the live attempt's checkpoint."""
    with session_scope(ctx.session_factory) as session:
        job = repositories.get_job_by_id(session, job_id)
    if job is None or job.status == "succeeded":
        return False
    return job.worker_id in (None, ctx.worker)


def evaluate(
    config: Any, options: Any, inputs: dict[str, Any], repaired: Path, should_cancel: Any
) -> dict[str, Any]:
    """Honesty metrics of base, fine-tuned and repaired models on the job's eval set, and
    the recovery of the refusal F1 (`hcnr_core.evaluation.evaluate_repair`)."""
    from hcnr_core.evaluation import evaluate_repair

    return evaluate_repair(
        inputs["base"],
        inputs["finetuned"],
        repaired,
        inputs["eval"],
        max_seq_len=config.max_seq_len,
        device=options.device,
        should_cancel=should_cancel,
    )


# --- recording the outcome -------------------------------------------------------------


def _artifacts(job_id: str, report: dict, out: Path) -> list[Artifact]:
    digests = dict(report.get("files", {}))
    name = report["report_name"]
    report_path = out / name
    digests[name] = {"sha256": sha256_file(report_path), "bytes": report_path.stat().st_size}
    prefix = checkpoint_prefix(job_id)
    return [
        Artifact(
            job_id=job_id,
            name=name,
            bytes=info["bytes"],
            sha256=info["sha256"],
            storage_key=f"{prefix}/{name}",
        )
        for name, info in sorted(digests.items())
    ]


def _finish(ctx: Context, job_id: str, status: str, outcome: dict) -> bool:
    """Record the terminal state, only if this worker still holds the job (True)."""
    with session_scope(ctx.session_factory) as session:
        job = job_state.finish(
            session,
            job_id,
            ctx.worker,
            status,
            report=outcome.get("report"),
            error_code=outcome.get("code"),
            error_message=outcome.get("message"),
        )
        if job is None:
            log.warning("job %s: lease lost before recording %s", job_id, status)
            if status == "succeeded":
                _discard(ctx, job_id, outcome["out"])
            return False
        if status == "succeeded":
            session.add_all(_artifacts(job_id, outcome["report"], outcome["out"]))
    return True


def notify(ctx: Context, job_id: str) -> None:
    if ctx.notify is None:
        return
    try:
        ctx.notify(job_id)
    except Exception:  # the job's outcome is recorded; only its webhook is lost
        log.exception("could not send the webhook task of job %s", job_id)
