"""`python -m bench.scale`: the command line (bench/scale/__init__.py has the usage).

The parent builds each size's checkpoint, then runs every measurement in a fresh child
process (`--child ROOT` plus the mode's flag), so each peak memory is that of one run;
`run_child` picks the mode's module, `main` records what the children print.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import bench.scale as package
from bench.scale.checkpoints import SIZES, build, param_count
from bench.scale.measure import ROOT, child, machine, save
from bench.scale.render import RESULTS, render


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    description = (package.__doc__ or "").split("\n\n")[0]
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=description)
    parser.add_argument(
        "--sizes", nargs="+", default=["llama-20m", "llama-64m"], choices=list(SIZES)
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--hessian-budget-mb", type=int, default=4096)
    parser.add_argument("--layerwise", action="store_true")
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="layer-by-layer dry run on weights generated on the device (no disk, no save)",
    )
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads, every method"
    )
    parser.add_argument(
        "--baselines",
        action="store_true",
        help="after each HCNR repair, train RAIT and DPO on the same checkpoints and data",
    )
    parser.add_argument(
        "--baseline-schedule",
        nargs="+",
        default=["steps:60", "epochs:3"],
        help="training lengths of the baselines, steps:N or epochs:E (default: both)",
    )
    parser.add_argument(
        "--compensate-ab",
        type=int,
        metavar="REPEATS",
        help="time only the compensate stage, per matrix vs once per shared input (CPU)",
    )
    parser.add_argument("--render", action="store_true", help="only rewrite scale.md/png")
    parser.add_argument("--work", type=Path, default=ROOT / ".hcnr" / "bench")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-baseline", choices=["rait", "dpo"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for schedule in args.baseline_schedule:
        kind, _, amount = schedule.partition(":")
        if kind not in ("steps", "epochs") or not amount.replace(".", "", 1).isdigit():
            parser.error(f"--baseline-schedule {schedule!r}: expected steps:N or epochs:E")
    if not args.child and args.baselines and (args.synthetic or args.layerwise):
        parser.error("--baselines compares with whole-model HCNR on real checkpoints")
    return args


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    """The one measurement this child process was started for (its mode's module)."""
    root = Path(args.child)
    if args.compensate_ab:
        from bench.scale.compensate_ab import run_compensate_ab

        return run_compensate_ab(root, args.dtype, args.threads, args.compensate_ab)
    if args.child_baseline:
        from bench.scale.baselines import run_baseline

        schedule = args.baseline_schedule[0]
        return run_baseline(
            root, args.child_baseline, schedule, args.device, args.dtype, args.threads
        )
    if args.synthetic:
        from bench.scale.synthetic import run_synthetic

        return run_synthetic(root, args.device, args.hessian_budget_mb)
    from bench.scale.repair import run_one  # whole model, --layerwise, a device list

    return run_one(
        root, args.device, args.dtype, args.hessian_budget_mb, args.layerwise, args.threads
    )


def compensate_ab(args: argparse.Namespace, store: Path, size: str, root: Path) -> None:
    common = ["--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads)]
    argv = ["--child", str(root), *common, "--compensate-ab", str(args.compensate_ab)]
    result = child(argv, f"{size}: compensate A/B")
    result.update(
        size=size,
        params=param_count(SIZES[size]),
        dtype=args.dtype,
        machine=machine("cpu"),
        measured_at=time.strftime("%Y-%m-%d"),
    )
    save(store, f"{result['machine']}|cpu|{args.dtype}|compensate-ab|{size}", result)


def repair_and_baselines(args: argparse.Namespace, store: Path, size: str, root: Path) -> None:
    """One HCNR repair (whole, --layerwise, --synthetic) and, with --baselines, RAIT and
    DPO on the same checkpoint, each with HCNR's figures of this same invocation."""
    common = ["--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads)]
    result = child(
        [
            "--child",
            str(root),
            *common,
            "--hessian-budget-mb",
            str(args.hessian_budget_mb),
            *(["--layerwise"] if args.layerwise else []),
            *(["--synthetic"] if args.synthetic else []),
        ],
        f"{size}: repair",
    )
    mode = "layerwise" if args.layerwise else "whole"
    mode = "synthetic-layerwise-dry-run" if args.synthetic else mode
    mode_key = mode if args.threads == (os.cpu_count() or 1) else f"{mode}-{args.threads}t"
    where = dict(
        size=size,
        params=param_count(SIZES[size]),
        device=args.device,
        dtype=args.dtype,
        machine=machine(args.device),
        measured_at=time.strftime("%Y-%m-%d"),
    )
    result.update(mode=mode, **where)
    save(store, f"{result['machine']}|{args.device}|{args.dtype}|{mode_key}|{size}", result)
    for method in ("rait", "dpo") if args.baselines else ():
        for schedule in args.baseline_schedule:
            argv = ["--child", str(root), "--child-baseline", method, *common]
            argv += ["--baseline-schedule", schedule]
            run = child(argv, f"{size}: {method} {schedule}")
            run.update(method=method, schedule=schedule, **where)
            # HCNR's figures from this same invocation: the ratio is a same-run one.
            same_run = ("total_s", "cpu_s", "peak_cpu_rss_gib", "stage_seconds")
            run["hcnr"] = {k: result[k] for k in same_run}
            run["hcnr"]["fraction_model_params_changed"] = result.get(
                "fraction_model_params_changed"
            )
            key = f"{run['machine']}|{args.device}|{args.dtype}|{method}-{schedule}"
            key += f"-{args.threads}t|{size}"
            save(store, key, run)


def main() -> None:
    args = parse_args()
    if args.render:
        render(json.loads((RESULTS / "scale.json").read_text()))
        return
    if args.child:  # one measurement, in a fresh process, its result on stdout
        print("RESULT " + json.dumps(run_child(args)))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    store = RESULTS / "scale.json"
    for size in args.sizes:
        started = time.perf_counter()
        root = build(size, args.work, weights=not args.synthetic)
        print(f"{size}: checkpoint ready in {time.perf_counter() - started:.1f}s", flush=True)
        if args.compensate_ab:
            compensate_ab(args, store, size, root)
        else:
            repair_and_baselines(args, store, size, root)


if __name__ == "__main__":
    main()
