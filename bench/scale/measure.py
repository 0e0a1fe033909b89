"""What every mode shares: CPU time, memory, a repair's figures, the machine's name,
scale.json and the fresh child process each measurement runs in."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.scale.render import ROOT, render


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def current_rss_gib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def repair_figures(report: dict, prepared: Any, total: float, device: str) -> dict[str, Any]:
    """Timings, throughput and peak memory of one repair (this process)."""
    import torch

    tokens = sum(len(s.input_ids) for s in prepared.honesty + prepared.task)
    fisher_s = report["stage_seconds"]["fisher_task"] + report["stage_seconds"]["fisher_honesty"]
    gpus = [d for d in device.split(",") if d.startswith("cuda")]
    # The largest per-device peak: each replica's device must hold it.
    gpu_peak = max(torch.cuda.max_memory_allocated(d) for d in gpus) / 2**30 if gpus else None
    return {
        "total_s": round(total, 2),
        "stage_seconds": report["stage_seconds"],
        "fisher_tokens_per_s": round(tokens / fisher_s, 1),
        "peak_cpu_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "peak_gpu_gib": None if gpu_peak is None else round(gpu_peak, 2),
        "selected_matrices": report["n_selected_matrices"],
        "fraction_target_params_changed": round(report["fraction_target_params_changed"], 4),
        "fraction_model_params_changed": round(report["fraction_model_params_changed"], 4),
    }


def machine(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        gpus = len(device.split(","))
        name = torch.cuda.get_device_name(0)
        return f"{gpus} x {name}" if gpus > 1 else f"{name} + {os.cpu_count()} CPU cores"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"


def save(store: Path, key: str, row: dict[str, Any]) -> None:
    """Add one result to scale.json (re-read first: other runs may have written to it)."""
    print("KEY " + key + " " + json.dumps(row), flush=True)
    results = json.loads(store.read_text()) if store.exists() else {}
    results[key] = row
    store.write_text(json.dumps(results, indent=2) + "\n")
    render(results)


def child(argv: list[str], what: str) -> dict[str, Any]:
    """Run `python -m bench.scale argv` in a fresh process (from the repository root, so
    `bench` imports); its RESULT line as a dict."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.scale", *argv],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{what} failed (exit {proc.returncode})")
    return json.loads(line[0].removeprefix("RESULT "))
