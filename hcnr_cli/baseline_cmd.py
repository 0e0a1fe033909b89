"""`hcnr baseline rait|dpo`: the methods HCNR is compared against (hcnr_core.baselines)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from hcnr_cli.common import (
    EvalFile,
    ProgressPrinter,
    check_eval_file,
    evaluate_into_card,
    fail,
    quiet_libraries,
    require,
    spec_and_options,
    summary_of,
    validate_within_limits,
)

baseline_app = typer.Typer(
    help="Baselines to compare HCNR with: RAIT (SFT on IDK data) and DPO on IDK pairs.",
    no_args_is_help=True,
)

Base = Annotated[
    Path | None, typer.Option(help="Base model directory (required for an adapter fine-tune)")
]
Finetuned = Annotated[
    Path, typer.Option(help="Fine-tuned model directory or PEFT LoRA adapter directory")
]
Honesty = Annotated[Path, typer.Option(help="Honesty set (JSONL; refusals + gold answers)")]
Out = Annotated[Path, typer.Option(help="Output directory (must not exist or be empty)")]
Config = Annotated[Path | None, typer.Option(help="YAML/JSON config; flags override it")]
Lr = Annotated[float | None, typer.Option(help="Peak learning rate of the LoRA")]
Steps = Annotated[int | None, typer.Option(help="Optimizer steps [60]")]
Epochs = Annotated[float | None, typer.Option(help="Passes over the data (instead of steps)")]
BatchSize = Annotated[int | None, typer.Option(help="Samples (DPO: pairs) per step [16]")]
LoraR = Annotated[int | None, typer.Option(help="LoRA rank [8]")]
LoraAlpha = Annotated[float | None, typer.Option(help="LoRA alpha [16]")]
LoraTargets = Annotated[
    str | None, typer.Option(help="Comma-separated module names [q,k,v,o,gate,up,down _proj]")
]
Seed = Annotated[int | None, typer.Option(help="Random seed [0]")]
MaxSeqLen = Annotated[int | None, typer.Option(help="Max tokens per sample [512]")]
Device = Annotated[
    str | None, typer.Option(help="cpu | cuda | cuda:N [cpu]", rich_help_panel="Run options")
]
Dtype = Annotated[str | None, typer.Option(help="float32 | bfloat16 | float16 | auto [float32]")]
NSamples = Annotated[int | None, typer.Option(help="Seeded subset of the honesty set")]
Threads = Annotated[
    int | None,
    typer.Option(help="torch CPU threads [torch's default]", rich_help_panel="Run options"),
]
PATHS = ("base", "finetuned", "honesty", "out", "no_progress", "eval_file")  # not config
NoProgress = Annotated[bool, typer.Option("--no-progress", help="No progress bar")]


def _run(method: str, config_file: Path | None, flags: dict[str, Any], **paths: Any) -> None:
    """The same method as `hcnr repair --method rait|dpo`, with typed flags."""
    from pydantic import ValidationError

    require("compute", f"hcnr baseline {method}")
    quiet_libraries()
    from hcnr_core import HCNRError
    from hcnr_core.devices import resolve_devices
    from hcnr_core.methods import MethodInputs
    from hcnr_core.registry import get_method

    spec = get_method(method)
    overrides = {k: v for k, v in flags.items() if v is not None}
    if isinstance(overrides.get("lora_targets"), str):
        overrides["lora_targets"] = [t.strip() for t in overrides["lora_targets"].split(",")]
    try:
        cfg, options = spec_and_options(spec, config_file, overrides, {})
        resolve_devices(options.device)
    except (ValidationError, ValueError, OSError, HCNRError) as exc:
        fail(exc)
    inputs = MethodInputs(paths["base"], paths["finetuned"], paths["honesty"])
    validate_within_limits(method, cfg, options, inputs)
    check_eval_file(paths["eval_file"])
    try:
        with ProgressPrinter(enabled=not paths["no_progress"] and sys.stderr.isatty()) as bar:
            report = spec.run(cfg, inputs, paths["out"], options=options, progress=bar)
    except HCNRError as exc:
        fail(exc)
    if paths["eval_file"] is not None:
        evaluate_into_card(
            method, spec, cfg, options, inputs, paths["out"], report, paths["eval_file"]
        )
    summary = summary_of(method, paths["out"], report)
    summary["trainable_params"] = report["trainable_params"]
    typer.echo(json.dumps(summary))


@baseline_app.command("rait")
def rait(
    finetuned: Finetuned,
    honesty: Honesty,
    out: Out,
    base: Base = None,
    config: Config = None,
    lr: Lr = None,
    steps: Steps = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    lora_r: LoraR = None,
    lora_alpha: LoraAlpha = None,
    lora_targets: LoraTargets = None,
    seed: Seed = None,
    max_seq_len: MaxSeqLen = None,
    device: Device = None,
    dtype: Dtype = None,
    n_samples: NSamples = None,
    threads: Threads = None,
    no_progress: NoProgress = False,
    eval_file: EvalFile = None,
) -> None:
    """RAIT: fine-tune a LoRA on the honesty set (refusals + gold answers), merge, save."""
    flags = dict(locals())
    paths = {k: flags.pop(k) for k in PATHS}
    _run("rait", flags.pop("config"), flags, **paths)


@baseline_app.command("dpo")
def dpo(
    finetuned: Finetuned,
    honesty: Honesty,
    out: Out,
    base: Base = None,
    config: Config = None,
    lr: Lr = None,
    steps: Steps = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    beta: Annotated[float | None, typer.Option(help="DPO temperature β [0.1]")] = None,
    rpo_alpha: Annotated[
        float | None, typer.Option(help="NLL weight on chosen; 0 = pure DPO [1.0]")
    ] = None,
    refusal: Annotated[
        str | None, typer.Option(help="Rejected answer of answerable prompts [data's IDK]")
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Tokens generated per rejected answer [32]")
    ] = None,
    lora_r: LoraR = None,
    lora_alpha: LoraAlpha = None,
    lora_targets: LoraTargets = None,
    seed: Seed = None,
    max_seq_len: MaxSeqLen = None,
    device: Device = None,
    dtype: Dtype = None,
    n_samples: NSamples = None,
    threads: Threads = None,
    no_progress: NoProgress = False,
    eval_file: EvalFile = None,
) -> None:
    """DPO on IDK pairs (refusal vs the model's own answer), the fine-tune as reference."""
    flags = dict(locals())
    paths = {k: flags.pop(k) for k in PATHS}
    _run("dpo", flags.pop("config"), flags, **paths)


def register(app: typer.Typer) -> None:
    app.add_typer(baseline_app, name="baseline")
