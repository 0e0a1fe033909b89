"""Leftovers of job attempts that died (SIGKILL, OOM, a lost machine): their scratch
directories and whatever they wrote under the job's storage prefix (a half-written
staging directory, or a checkpoint published but never recorded). Light imports only:
the reconciler calls this in the worker's parent process, where torch is never loaded."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from store.settings import Settings
from store.storage import Storage, job_prefix, make_storage

log = logging.getLogger("hcnr.worker")


def remove_leftovers(settings: Settings, job_id: str, storage: Storage | None = None) -> None:
    """Remove this machine's scratch of `job_id` and everything under its storage prefix.

    Only for a job that no live attempt is writing: one just claimed (its earlier attempts
    are dead: the claim needs the lease gone) or one the reconciler ends. Nothing under the
    prefix is published until an attempt records success, and a succeeded job is never
    claimed again."""
    for path in sorted(settings.scratch_dir.glob(f"{job_id}-*")):
        log.warning("removing scratch %s of a dead attempt", path)
        shutil.rmtree(path, ignore_errors=True)
    if storage is None and "://" not in settings.artifacts_location:
        local: Path | None = Path(settings.artifacts_location) / job_prefix(job_id)
    else:
        storage = storage or make_storage(settings)
        local = storage.local_path(job_prefix(job_id))
    if local is None:
        storage.delete_prefix(job_prefix(job_id))
    elif local.exists():
        log.warning("removing %s left by a dead attempt", local)
        shutil.rmtree(local, ignore_errors=True)
