"""`--baselines`: one RAIT or DPO training, as `hcnr baseline` runs it, in this process."""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

from bench.scale.measure import cpu_seconds


def run_baseline(
    root: Path, method: str, schedule: str, device: str, dtype: str, threads: int
) -> dict[str, Any]:
    """One baseline training (RAIT or DPO) in this process, as `hcnr baseline` runs it."""
    import shutil

    from hcnr_core.baselines import DpoConfig, RaitConfig, train_dpo, train_rait

    kind, _, amount = schedule.partition(":")
    length = {"steps": int(amount)} if kind == "steps" else {"epochs": float(amount)}
    settings = dict(device=device, dtype=dtype, threads=threads, max_seq_len=128, **length)
    config = RaitConfig(**settings) if method == "rait" else DpoConfig(**settings)
    train = train_rait if method == "rait" else train_dpo
    out = root / f"baseline-{method}"
    shutil.rmtree(out, ignore_errors=True)
    cpu_started, started = cpu_seconds(), time.perf_counter()
    report = train(root / "base", root / "adapter", root / "data/honesty.jsonl", out, config)
    total, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    shutil.rmtree(out, ignore_errors=True)
    return {
        "total_s": round(total, 2),
        "cpu_s": round(cpu, 1),
        "threads": threads,
        "stage_seconds": report["stage_seconds"],
        "peak_cpu_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "steps": report["steps"],
        "batch_size": config.batch_size,
        "samples_used": report["samples_used"],
        "trainable_params": report["trainable_params"],
        "fraction_model_params_changed": round(report["fraction_model_params_changed"], 4),
        "config": {k: report["config"][k] for k in ("lr", "lora_r", "lora_alpha", "batch_size")},
        "final_loss": report["losses"][-1],
    }
