"""A job's experiment tracking (issue 17): its `integrations` logged by the GPU worker.

Credentials: the tenant's own secrets (`PUT /v1/secrets/wandb_api_key`, `.../mlflow_token`,
store/secrets.py, encrypted at rest) when set, else the operator's environment of the
worker (WANDB_API_KEY, MLFLOW_TRACKING_TOKEN, ...). A job body never carries one.

A W&B integration with no `mode` runs online when a key is at hand and offline otherwise;
an offline run is published with the checkpoint as `wandb-offline.tar`, which the user
unpacks and uploads with `wandb sync offline-run-*`.

Nothing here fails a job: a tracker that cannot start or log is recorded in the report's
`tracking` (status failed, errors) and in the worker's log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hcnr_core.errors import RepairCancelled
from hcnr_core.tracking import (
    Integration,
    Tracking,
    make_tracker,
    published_report,
    record_in_report,
)
from hcnr_core.writer import sha256_file
from store import repositories, secrets
from store.db import session_scope
from store.models import Job

log = logging.getLogger("hcnr.worker.tracking")

WANDB_TAR = "wandb-offline.tar"
SECRET_OF = {"wandb": "wandb_api_key", "mlflow": "mlflow_token"}


def start(ctx: Any, job: Job, config: Any, options: Any, scratch: Path) -> Tracking:
    """The job's runs, started (a no-op `Tracking` without integrations)."""
    specs: list[Integration] = []
    for stored in job.integrations:
        try:
            specs.append(Integration.model_validate(stored))
        except ValueError as exc:  # validated at POST; a row from an older rule
            log.warning("job %s: integration %r ignored: %s", job.id, stored, exc)
    keys = _credentials(ctx, job, specs)
    if any(spec.type == "mlflow" for spec in specs):
        # MLflow's defaults (7 retries with exponential backoff, 120 s timeouts) would hold
        # a GPU job for minutes on a dead server; the operator's own values win.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    specs = [_with_mode(spec, keys.get(spec.type)) for spec in specs]
    params = {
        "method": job.method,
        "config": options.recorded(config),
        "job_id": job.id,
        "inputs": {
            "base": job.base_ref,
            "finetuned": job.finetuned_ref,
            "honesty_file": job.honesty_file_id,
            "task_file": job.task_file_id,
            "eval_file": job.eval_file_id,
            "validation_file": job.validation_file_id,
        },
        "artifacts": f"/v1/repair-jobs/{job.id}/artifacts",
    }
    tracking = Tracking(
        specs,
        job.id,
        params,
        {"hcnr.job_id": job.id, "hcnr.method": job.method},
        workdir=scratch / "tracking",
        factory=lambda spec, workdir: make_tracker(spec, workdir, keys.get(spec.type)),
        warn=lambda message: log.warning("job %s: %s", job.id, message),
    )
    tracking.start()
    tracking.job = (ctx, job.id)  # type: ignore[attr-defined]  # for `finish`'s event
    return tracking


def _credentials(ctx: Any, job: Job, specs: list[Integration]) -> dict[str, str]:
    """The tenant's stored key per tracker type that has one."""
    found: dict[str, str] = {}
    if not specs:
        return found
    try:
        with session_scope(ctx.session_factory) as session:
            for spec in specs:
                value = secrets.value(session, ctx.settings, job.tenant_id, SECRET_OF[spec.type])
                if value:
                    found[spec.type] = value
    except Exception as exc:  # unreadable (a rotated HCNR_SECRET_KEY): the operator's apply
        log.warning("job %s: tracker secrets unreadable (%s); using the worker's", job.id, exc)
    return found


def _with_mode(spec: Integration, key: str | None) -> Integration:
    """W&B with no mode: online with a key (the tenant's or WANDB_API_KEY), else offline
    (published as wandb-offline.tar) rather than a run that cannot start."""
    if spec.type != "wandb" or spec.mode is not None:
        return spec
    online = key or os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "online"
    return spec.model_copy(update={"mode": "online" if online else "offline"})


@contextlib.contextmanager
def closed_on_error(tracking: Tracking) -> Iterator[None]:
    try:
        yield
    except BaseException as exc:
        abandon(tracking, exc)
        raise


def abandon(tracking: Tracking, exc: BaseException) -> None:
    """Close the runs of a job that stops: cancelled or failed (once; later calls no-op)."""
    tracking.finish("cancelled" if isinstance(exc, RepairCancelled) else "failed")


def finish(tracking: Tracking, report: dict[str, Any], out: Path) -> None:
    """Log the report and plots, close the runs, publish offline W&B runs as
    `wandb-offline.tar`, and record `tracking` in the report (row and file)."""
    if not tracking.integrations:
        return
    name = report["report_name"]
    tracking.log_report(published_report(report, out / name), out, name)
    summary = tracking.finish("succeeded")
    offline = [Path(e["offline_dir"]) for e in summary if e.get("offline_dir")]
    if offline:
        _flush_wandb()
        tar = out / WANDB_TAR
        try:
            with tarfile.open(tar, "w") as archive:
                for run_dir in offline:  # W&B's own layout: `wandb sync offline-run-*`
                    archive.add(run_dir, arcname=run_dir.name, filter=_no_links)
            files = report.setdefault("files", {})
            files[WANDB_TAR] = {"sha256": sha256_file(tar), "bytes": tar.stat().st_size}
            for entry in summary:
                if entry.get("offline_dir"):
                    entry["offline_artifact"] = WANDB_TAR
                    entry.pop("offline_dir")  # the worker's scratch: meaningless to the user
        except OSError as exc:
            log.warning("could not publish the offline W&B run: %s", exc)
            tar.unlink(missing_ok=True)
    report["tracking"] = summary
    record_in_report(out / name, summary)
    _event(tracking, summary)


def _event(tracking: Tracking, summary: list[dict[str, Any]]) -> None:
    """One `tracking` event on the job: where each run is, or why it is not."""
    ctx, job_id = getattr(tracking, "job", (None, None))
    if ctx is None:
        return
    failed = [e["type"] for e in summary if e["status"] == "failed"]
    message = f"tracking failed: {', '.join(failed)}" if failed else "tracked"
    try:
        with session_scope(ctx.session_factory) as session:
            job = repositories.get_job_by_id(session, job_id)
            repositories.add_event(session, job, "tracking", message, {"tracking": summary})
    except Exception:  # the report holds it too
        log.exception("job %s: could not record the tracking event", job_id)


def _flush_wandb() -> None:
    """`run.finish()` can return before W&B's service has written the whole transaction
    log (`run-*.wandb`); shutting the service down flushes it. A worker runs one job at
    a time, and the next run starts a new service."""
    try:
        import wandb

        wandb.teardown()
    except Exception as exc:  # the tarball may then lack the last records
        log.warning("could not flush the W&B service: %s", exc)


def _no_links(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """Regular files and directories only: a link could point outside the run."""
    return info if info.isfile() or info.isdir() else None
