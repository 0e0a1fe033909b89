"""Whole-model, layer-by-layer (`--layerwise`) and device-list (`--device cuda:0,cuda:1`)
repairs: one `RepairPipeline` run in this (child) process."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.scale.measure import cpu_seconds, current_rss_gib, repair_figures


def run_one(
    root: Path, device: str, dtype: str, budget_mb: int, layerwise: bool, threads: int
) -> dict[str, Any]:
    """One repair in this process; returns timings and peak memory."""
    import shutil

    import torch

    from hcnr_core import RepairConfig
    from hcnr_core.config import RunOptions
    from hcnr_core.pipeline import RepairPipeline

    torch.set_num_threads(threads)
    cpu_started = cpu_seconds()
    out = root / "repaired"
    shutil.rmtree(out, ignore_errors=True)
    config = RepairConfig(dtype=dtype, max_seq_len=128)
    options = RunOptions(device=device, hessian_budget_mb=budget_mb, layerwise=layerwise)
    stage_rss: dict[str, float] = {}

    def sample_rss(event: Any) -> None:  # current RSS at every progress tick, per stage
        rss = current_rss_gib()
        stage_rss[event.stage] = max(stage_rss.get(event.stage, 0.0), rss)

    started = time.perf_counter()
    pipeline = RepairPipeline(config, options, progress=sample_rss)
    prepared = pipeline.prepare(
        root / "base", root / "adapter", root / "data/honesty.jsonl", root / "data/task.jsonl"
    )
    prepare_s = time.perf_counter() - started
    report = pipeline.run(prepared, out)
    total = time.perf_counter() - started
    cpu = cpu_seconds() - cpu_started
    shutil.rmtree(out, ignore_errors=True)
    figures = repair_figures(report, prepared, total, device)
    figures["stage_rss_gib"] = {k: round(v, 2) for k, v in stage_rss.items()}
    return {"prepare_s": round(prepare_s, 2), "cpu_s": round(cpu, 1), "threads": threads, **figures}
