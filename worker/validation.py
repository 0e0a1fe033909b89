"""Validation of a recorded job: its own Celery task on a CPU queue (`hcnr.validation`),
never on a GPU worker.

`POST /v1/repair-jobs` answers at once with status `validating` after the quick checks
(files and their purposes, hyper-parameters, reference syntax, webhook address). This
task then does the checks that read the inputs — every sample parsed and tokenised with
the model's own tokenizer and chat template, both checkpoints inspected and matched,
the limits of `hcnr_core.limits` — in a child process under the wall-clock, CPU and
memory limits (`hcnr_core.bounded`), and moves the job to `queued` (and sends it to the
GPU workers) or to `failed` with the same codes and line-numbered messages a synchronous
check answers with. It is idempotent: a job that is no longer `validating` (cancelled
meanwhile, or validated by a duplicate message) is left as it is.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jinja2.exceptions import SecurityError, TemplateError
from pydantic import ValidationError

from hcnr_core.bounded import validate_bounded
from hcnr_core.errors import HCNRError
from hcnr_core.methods import MethodInputs
from hcnr_core.registry import get_method
from store import job_state, repositories, secrets
from store.db import session_scope
from store.models import File
from store.references import fetch_reference
from store.settings import Settings
from store.storage import Storage
from worker import metrics as worker_metrics

log = logging.getLogger("hcnr.validation")


def validate_job(
    job_id: str,
    session_factory: Any,
    storage: Storage,
    settings: Settings,
    enqueue: Callable[[str], None],
    notify: Callable[[str], None] | None = None,
) -> str:
    """Validate one job; returns its status afterwards (queued, failed, or what it was).
    Its duration and outcome go to the worker's metrics (worker/metrics.py)."""
    started, outcome, code = time.monotonic(), "error", None
    try:
        status, outcome, code = _validate(
            job_id, session_factory, storage, settings, enqueue, notify
        )
        return status
    finally:
        worker_metrics.validation_done(outcome, time.monotonic() - started, code)


def _validate(
    job_id: str,
    session_factory: Any,
    storage: Storage,
    settings: Settings,
    enqueue: Callable[[str], None],
    notify: Callable[[str], None] | None,
) -> tuple[str, str, str | None]:
    """(status afterwards, the metric's outcome, the failure's code)."""
    with session_scope(session_factory) as session:
        job = repositories.get_job_by_id(session, job_id)
        if job is None:
            return "missing", "skipped", None
        if job.status != "validating":
            return job.status, "skipped", None
        method, config_values = job.method, job.hyperparameters
        refs = (job.base_ref, job.finetuned_ref)
        tenant_id = job.tenant_id
        hub_token = _hub_token(session, settings, tenant_id, refs)
        keys = {
            role: session.get(File, file_id).storage_key
            for role, file_id in (
                ("honesty", job.honesty_file_id),
                ("task", job.task_file_id),
                ("validation", job.validation_file_id),
            )
            if file_id is not None
        }
    pinned: dict[str, str | None] = {}
    failure = _check(
        method, config_values, refs, keys, storage, settings, pinned, tenant_id, hub_token
    )
    with session_scope(session_factory) as session:
        if failure is not None:
            moved = job_state.fail_validation(session, job_id, *failure)
        else:
            try:
                moved = job_state.queue(session, job_id, pinned)
            except job_state.TransitionRefused:
                moved = None
        status = moved.status if moved is not None else _status(session, job_id)
    if moved is not None and status == "queued":
        _send(enqueue, job_id, "job")
    elif moved is not None and notify is not None:  # failed: its webhook is due
        _send(notify, job_id, "webhook")
    if moved is None:  # cancelled (or validated by a duplicate) meanwhile
        return status, "skipped", None
    return status, status, failure[0] if failure is not None else None


def _check(
    method: str,
    config_values: dict[str, Any],
    refs: tuple[str, str],
    keys: dict[str, str],
    storage: Storage,
    settings: Settings,
    pinned: dict[str, str | None],
    tenant_id: str,
    hub_token: str | None,
) -> tuple[str, str, Any] | None:
    """(code, message, details) of the refusal, None when the job may run. `hf:`/`s3://`
    models are fetched into the model cache here and what was fetched is put in `pinned`
    (base_resolved, finetuned_resolved) for the job's row."""
    try:
        config = get_method(method).make_config(config_values)
        base, pinned["base_resolved"] = fetch_reference(refs[0], settings, tenant_id, hub_token)
        finetuned, pinned["finetuned_resolved"] = fetch_reference(
            refs[1], settings, tenant_id, hub_token
        )
        settings.scratch_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=settings.scratch_dir) as scratch:
            local = {
                role: storage.local_path(key) or storage.get_file(key, Path(scratch) / f"{role}")
                for role, key in keys.items()
            }
            inputs = MethodInputs(
                base, finetuned, local["honesty"], local["task"], local.get("validation")
            )
            validate_bounded(method, config, inputs, settings.limits, options=settings.run_options)
    except TemplateError as exc:  # the model's chat template refuses these samples
        code = "unsafe_checkpoint" if isinstance(exc, SecurityError) else "invalid_data"
        return code, f"the chat template refused a sample: {exc}", None
    except HCNRError as exc:
        return exc.code, str(exc), exc.details()
    except ValidationError as exc:
        return "invalid_hyperparameters", str(exc), None
    except Exception as exc:  # recorded on the job: the user sees what went wrong
        log.exception("validation of job %s failed", refs)
        return "internal_error", f"validation failed: {type(exc).__name__}: {exc}", None
    return None


def _hub_token(session: Any, settings: Settings, tenant_id: str, refs: tuple[str, str]) -> Any:
    """The tenant's own `hf_token` (decrypted here only, for the download), when a
    reference names the hub. Unreadable (the secret key rotated without listing the old
    one in HCNR_PREVIOUS_SECRET_KEYS): the download goes without, and says so."""
    if not any(ref.startswith("hf:") for ref in refs):
        return None
    try:
        return secrets.value(session, settings, tenant_id, "hf_token")
    except secrets.SecretUnreadable:
        log.error(
            "the hf_token of tenant %s cannot be decrypted with the configured keys", tenant_id
        )
        return None


def _status(session: Any, job_id: str) -> str:
    job = repositories.get_job_by_id(session, job_id)
    return job.status if job is not None else "missing"


def _send(send: Callable[[str], None], job_id: str, what: str) -> None:
    try:
        send(job_id)
    except Exception:  # the reconciler re-sends a queued job whose message was lost
        log.exception("could not send the %s message of job %s", what, job_id)


def inline(session_factory: Any, storage: Storage, settings: Settings, enqueue, notify=None):
    """A `validate(job_id)` that runs the validation in this process at once: for tests
    and embedding without a validation worker."""

    def validate(job_id: str) -> None:
        validate_job(job_id, session_factory, storage, settings, enqueue, notify)

    return validate
