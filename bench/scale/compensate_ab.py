"""`--compensate-ab`: the compensate stage timed per matrix and per shared input."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def run_compensate_ab(root: Path, dtype: str, threads: int, repeats: int) -> dict[str, Any]:
    """The compensate stage of one real repair, timed per matrix and per shared input.

    The repair runs as usual (dry run); its Fisher scores and Hessians are computed once
    (a Fisher cache, and runners that record their Hessian passes and replay them), then
    the repair runs `repeats` more times each way, alternating: "per matrix" damps and
    inverts a shared-input group's H for every member (as before the shared path existed;
    same operations, tests/test_repair_e2e.py checks the bits), and "shared" does it once
    per group. The time is the report's compensate stage (the Hessians' share excluded).
    Alternating keeps a busy machine's drift out of the comparison; the minimum of each is
    reported.
    """
    import torch

    import hcnr_core.pipeline as pipeline_module
    from hcnr_core import RepairConfig
    from hcnr_core.config import RunOptions
    from hcnr_core.pipeline import RepairPipeline
    from hcnr_core.runners import runner_kind

    torch.set_num_threads(threads)
    shared_groups = pipeline_module._shared_input_groups
    timings: dict[str, list[float]] = {"per_matrix": [], "shared": []}
    config = RepairConfig(dtype=dtype, max_seq_len=128)
    options = RunOptions()  # one CPU, whole model
    runners = _ReplayedHessians(runner_kind(options.layerwise, options.hessian_budget_mb))
    fisher_cache: dict[str, dict] = {}

    def repair() -> dict[str, Any]:
        pipeline = RepairPipeline(config, fisher_cache=fisher_cache, runners=runners)
        prepared = pipeline.prepare(
            root / "base", root / "adapter", root / "data/honesty.jsonl", root / "data/task.jsonl"
        )
        return pipeline.run(prepared, None)

    report = repair()  # computes and records the Fisher scores and the Hessians
    try:
        for _ in range(repeats):
            for way in ("per_matrix", "shared"):
                pipeline_module._shared_input_groups = (
                    shared_groups if way == "shared" else lambda chunk, _h: list(chunk)
                )
                timings[way].append(repair()["stage_seconds"]["compensate"])
    finally:
        pipeline_module._shared_input_groups = shared_groups
    kept = [m["name"] for m in report["selected_matrices"]]
    return {
        "threads": threads,
        "repeats": repeats,
        "selected_matrices": len(kept),
        "kept_by_kind": dict(sorted(_kinds(kept).items())),
        "per_matrix_s": timings["per_matrix"],
        "shared_s": timings["shared"],
        "per_matrix_min_s": min(timings["per_matrix"]),
        "shared_min_s": min(timings["shared"]),
    }


class _ReplayedHessians:
    """A `RunnerKind` whose runners record each Hessian pass (by its modules) and replay
    it afterwards: the compensate A/B times compensation, not forward passes."""

    def __init__(self, kind: Any):
        self.kind, self.recorded = kind, {}

    def finetuned(self, at: Any) -> tuple[Any, Any]:
        runner, source = self.kind.finetuned(at)
        return _Replaying(runner, self.recorded), source

    def base(self, at: Any, source: Any) -> Any:
        return _Replaying(self.kind.base(at, source), self.recorded)


class _Replaying:
    def __init__(self, runner: Any, recorded: dict):
        self.runner, self.recorded = runner, recorded

    def fisher(self, *args: Any) -> dict:
        return self.runner.fisher(*args)

    def hessians(self, batches: Any, modules: list[str], pad_id: int, tick: Any) -> Any:
        key = (len(batches), tuple(modules))
        if key not in self.recorded:
            self.recorded[key] = list(self.runner.hessians(batches, modules, pad_id, tick))
        return iter(self.recorded[key])

    def blockwise(self) -> Any:
        return self.runner.blockwise()

    def set_weight(self, module: str, weight: Any) -> None:
        self.runner.set_weight(module, weight)


def _kinds(names: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name in names:
        kind = name.split(".")[-2]
        out[kind] = out.get(kind, 0) + 1
    return out
