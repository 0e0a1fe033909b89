"""`hcnr repair --estimate`: what the repair would cost on this machine, then exit.

Parameters and shapes from config.json and the safetensors headers; tokens counted with
the checkpoint's tokenizer (after `validate_within_limits` has checked, in a bounded
child process, that the data and tokenizer are within the limits); memory and time from
the models in hcnr_core/estimate.py. The worker is this machine (its physical memory,
and each GPU's memory when torch sees it). Exits 1 with `no_worker_fits` when the
repair would not fit here."""

from __future__ import annotations

import json
from typing import Any

import typer

from hcnr_cli.common import fail

GIB = 1024**3


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f} GiB"


def _table(estimate: Any) -> str:
    e = estimate
    rows = [
        ("method", e.method),
        ("parameters", f"{e.parameters:,} (base) + {e.adapter_parameters:,} (adapter)"),
        ("devices / dtype", f"{','.join(e.devices)} / {e.dtype}"),
    ]
    for name, size in e.tokens.items():
        rows.append((f"tokens {name}", f"{size.tokens:,} in {size.samples} samples ({size.basis})"))
    rows.append(
        ("whole model", f"host {_gib(e.whole.host_bytes)}, device {_gib(e.whole.device_bytes)}")
    )
    if e.layerwise is not None:
        lw = e.layerwise
        rows.append(
            ("layer by layer", f"host {_gib(lw.host_bytes)}, device {_gib(lw.device_bytes)}")
        )
    needed = {True: "yes", False: "no", None: "unknown"}[e.layerwise_needed]
    rows += [
        ("layer by layer needed", needed),
        (
            "wall time",
            f"~{e.wall_seconds:.0f} s ({e.wall_seconds_low:.0f}-{e.wall_seconds_high:.0f} s)",
        ),
        ("time basis", e.wall_basis),
    ]
    for w in e.workers:
        rows.append(
            (
                f"worker {w.name}",
                f"{w.device}: host {_gib(w.host_memory_bytes)}, "
                f"device {_gib(w.device_memory_bytes)} ({w.source})",
            )
        )
    rows.append(("runnable", "yes" if e.runnable else "no"))
    rows += [("note", note) for note in e.notes]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def estimate_and_exit(method: str, cfg: Any, options: Any, inputs: Any, as_json: bool) -> None:
    """Print the estimate (a table, or JSON with byte figures) and exit: 0 when it fits
    this machine, 1 (`no_worker_fits`) when it does not."""
    from hcnr_core import HCNRError
    from hcnr_core import estimate as est
    from hcnr_core.checkpoint import inspect_checkpoint, load_tokenizer
    from hcnr_core.data import load_jsonl

    try:
        base = inputs.base or inputs.finetuned  # RAIT/DPO on a full fine-tune: no base
        shapes = est.read_shapes(base, inputs.finetuned)
        infos = [inspect_checkpoint(inputs.finetuned)]
        if inputs.base is not None:
            infos.append(inspect_checkpoint(inputs.base))
        tokenizer = load_tokenizer(*infos)  # the repair's choice: the fine-tune's first
        sets = {}
        for name in ("honesty", "task"):
            path = getattr(inputs, name)
            if path is not None:
                samples = load_jsonl(path)
                sets[name] = est.tokens_from_tokenizer(tokenizer, samples, cfg.max_seq_len)
        machine = est.this_machine(options.device, layerwise=method == "hcnr")
        estimate = est.estimate_repair(shapes, cfg, sets, method, [machine], options)
    except HCNRError as exc:
        fail(exc)
    typer.echo(json.dumps(estimate.to_dict()) if as_json else _table(estimate))
    if estimate.refusal is not None:
        fail(est.NoWorkerFitsError(estimate.refusal["message"], estimate), code=1)
    raise typer.Exit(0)
