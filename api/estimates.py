"""POST /v1/repair-jobs/estimate: what a job would cost, and whether a worker can run it.

The same quick checks as job creation (`services.check_job`: the tenant's files, the
hyper-parameters, the references), then header reads only (hcnr_core/estimate.py): no
job row, nothing enqueued, no weight or sample read. Tokens come from the uploaded
files' sizes (the tokenizer runs in the validation task, in a bounded child process,
never in a request), so their basis is `file_bytes`.

Worker capacity: operator settings (`HCNR_WORKER_MEMORY_GIB`,
`HCNR_WORKER_DEVICE_MEMORY_GIB`) with what this machine reports as the fallback. The
API and every worker read the same `HCNR_*` environment, and `hcnr serve` runs its
worker on this machine, so the fallback is exact there. Workers do not announce
themselves: the leases they renew are per job, and no table lists idle workers.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from sqlalchemy.orm import Session

from api import services
from api.errors import APIError
from api.schemas import EstimatePublic, MemoryPeak, RepairJobCreate, TokenCount, WorkerCapacity
from hcnr_core import estimate as est
from hcnr_core.limits import GIB
from store.models import Tenant
from store.references import (
    ReferenceNotFoundError,
    check_reference,
    parse_hub,
    resolve_reference,
)
from store.remote_models import cached_snapshot
from store.settings import Settings


@lru_cache(maxsize=8)
def _device_memory(device: str) -> int | None:
    return est.device_memory_bytes(device.split(","))  # imports torch once, for cuda only


def worker_capacity(settings: Settings) -> est.Capacity:
    """The service's worker: whole model only (layer by layer is a run option the
    worker never sets, `Settings.run_options`)."""
    host, device = settings.worker_memory_gib, settings.worker_device_memory_gib
    configured = host is not None or device is not None
    return est.Capacity(
        name="worker",
        device=settings.worker_device,
        host_memory_bytes=int(host * GIB) if host is not None else est.host_memory_bytes(),
        device_memory_bytes=(
            int(device * GIB) if device is not None else _device_memory(settings.worker_device)
        ),
        layerwise=False,
        source="settings" if configured else "detected",
    )


def _gib(value: int | None) -> float | None:
    return None if value is None else round(value / GIB, 3)


def public(estimate: est.Estimate) -> EstimatePublic:
    def memory(m: est.ModeMemory) -> MemoryPeak:
        return MemoryPeak(host_gib=_gib(m.host_bytes), device_gib=_gib(m.device_bytes))

    return EstimatePublic(
        method=estimate.method,
        parameters=estimate.parameters,
        adapter_parameters=estimate.adapter_parameters,
        total_parameters=estimate.parameters + estimate.adapter_parameters,
        finetuned_kind=estimate.finetuned_kind,
        devices=estimate.devices,
        dtype=estimate.dtype,
        tokens={k: TokenCount(**vars(v)) for k, v in estimate.tokens.items()},
        memory_whole=memory(estimate.whole),
        memory_layerwise=memory(estimate.layerwise) if estimate.layerwise else None,
        layerwise_needed=estimate.layerwise_needed,
        wall_seconds=estimate.wall_seconds,
        wall_seconds_low=estimate.wall_seconds_low,
        wall_seconds_high=estimate.wall_seconds_high,
        wall_basis=estimate.wall_basis,
        workers=[
            WorkerCapacity(
                name=w.name,
                device=w.device,
                host_memory_gib=_gib(w.host_memory_bytes),
                device_memory_gib=_gib(w.device_memory_bytes),
                layerwise=w.layerwise,
                source=w.source,
            )
            for w in estimate.workers
        ],
        runnable=estimate.runnable,
        notes=estimate.notes,
    )


def local_model(reference: str, settings: Settings, tenant: Tenant) -> Path:
    """No network in a request: `path:` models, `s3://` models a validation pinned, and
    `hf:` models already in the model cache that this tenant may read (a private commit
    another tenant fetched is not found, as if absent); otherwise reference_not_found."""
    if reference.startswith("hf:"):
        check_reference(reference, settings)
        repo_id, revision = parse_hub(reference)
        found = cached_snapshot(settings.model_cache, repo_id, revision or "main", tenant.id)
        if found is None:
            raise ReferenceNotFoundError(
                f"{reference}: not in the model cache yet; the estimate reads what a job's "
                "validation has fetched (create the job, or estimate a local copy)"
            )
        return found
    return resolve_reference(reference, settings.models_dir, settings.model_cache)


def estimate_job(
    session: Session, settings: Settings, tenant: Tenant, body: RepairJobCreate
) -> EstimatePublic:
    """The estimate of `body`, or 422 `no_worker_fits` (its details: the estimate)."""
    config = services.check_job(session, settings, tenant, body)
    base, finetuned = (local_model(ref, settings, tenant) for ref in (body.base, body.finetuned))
    shapes = est.read_shapes(base, finetuned, settings.limits)
    sets = {}
    for name, file_id in (("honesty", body.honesty_file), ("task", body.task_file)):
        file = services.get_file(session, tenant, file_id)
        sets[name] = est.tokens_from_bytes(file.samples, file.bytes, config.max_seq_len)
    workers = [worker_capacity(settings)]
    estimate = est.estimate_repair(shapes, config, sets, body.method, workers, settings.run_options)
    answer = public(estimate)
    if estimate.refusal is not None:
        raise APIError(
            estimate.refusal["code"], estimate.refusal["message"], answer.model_dump(mode="json")
        )
    return answer
