"""The `hcnr` command line: `app`, the library commands (repair, toy, build-honesty-data,
probe) and the sub-command modules, each registering its commands on `app`. Shared
helpers live in `hcnr_cli.common`; no `hcnr_cli` module imports this one."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from hcnr_cli import (
    baseline_cmd,
    gguf_cmd,
    hub_opts,
    jobs_cmd,
    keys_cmd,
    organism_cmd,
    realmodel_cmd,
    serve_cmd,
    tracking_opts,
)
from hcnr_cli.common import (
    SHARED_FLAGS,
    EvalFile,
    ProgressPrinter,
    check_eval_file,
    err,
    evaluate_into_card,
    fail,
    parse_settings,
    quiet_libraries,
    require,
    spec_and_options,
    summary_of,
    validate_within_limits,
)
from hcnr_cli.config_flags import config_flags
from hcnr_core.config import DEFAULT_METHOD, RepairConfig, RunOptions

app = typer.Typer(
    name="hcnr",
    help="Repair the honesty of fine-tuned LLMs (HCNR): library CLI and service client.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.command()
@config_flags(RunOptions, main="Run options")
@config_flags(RepairConfig, main="HCNR options")
def repair(
    base: Annotated[Path, typer.Option(help="Base (pre-trained/aligned) model directory")],
    finetuned: Annotated[
        Path, typer.Option(help="Fine-tuned model directory or PEFT LoRA adapter directory")
    ],
    honesty: Annotated[Path, typer.Option(help="Honesty set D_hon (JSONL)")],
    out: Annotated[
        Path | None,
        typer.Option(help="Output directory (must not exist or be empty); not with --estimate"),
    ] = None,
    task: Annotated[
        Path | None, typer.Option(help="Task set D_task (JSONL); needed by HCNR")
    ] = None,
    method: Annotated[
        str,
        typer.Option(
            help="auto (try HCNR candidates on a validation split, keep the most honest "
            "that beats the fine-tune within --set max_domain_drop=2) | hcnr (the options "
            "below) | rait (SFT of a LoRA on D_hon) | dpo (DPO on IDK pairs)"
        ),
    ] = DEFAULT_METHOD,
    validation: Annotated[
        Path | None,
        typer.Option(help="auto: validation JSONL [carved from --honesty and --task]"),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="YAML/JSON config of the method (run options may sit beside its fields "
            "under their names); flags override it"
        ),
    ] = None,
    settings: Annotated[
        list[str],
        typer.Option(
            "--set",
            help="KEY=VALUE of the method's config or a run option (e.g. lr=1e-3), repeatable",
        ),
    ] = [],  # noqa: B006
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar")] = False,
    estimate: Annotated[
        bool,
        typer.Option(
            "--estimate",
            help="Print parameters, tokens, peak memory and wall time on this machine, and "
            "exit without repairing (exit 1: it does not fit here)",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="--estimate as JSON")] = False,
    track: tracking_opts.Track = [],  # noqa: B006
    track_project: tracking_opts.TrackProject = None,
    track_uri: tracking_opts.TrackUri = None,
    track_entity: tracking_opts.TrackEntity = None,
    track_name: tracking_opts.TrackName = None,
    push_to_hub: hub_opts.PushToHub = None,
    hub_private: hub_opts.HubPrivate = True,
    eval_file: EvalFile = None,
    **flags: Any,
) -> None:
    """Repair a fine-tuned model's honesty with METHOD and write the checkpoint to OUT.

    HCNR restores honesty-critical columns (its options below, generated from
    `RepairConfig`); `--method rait|dpo|auto` takes its options with --set or --config. The
    run options (from `RunOptions`) say how any method runs, as far as it runs with them."""
    from pydantic import ValidationError

    from hcnr_core import HCNRError
    from hcnr_core.devices import resolve_devices
    from hcnr_core.methods import MethodInputs
    from hcnr_core.registry import get_method

    require("compute", "hcnr repair")
    quiet_libraries()
    overrides = {k: v for k, v in flags.items() if v is not None}
    try:
        spec = get_method(method)
        if method != "hcnr":
            foreign = sorted(
                k for k in overrides if k not in SHARED_FLAGS and k not in RunOptions.model_fields
            )
            if foreign:
                names = ", ".join("--" + k.replace("_", "-") for k in foreign)
                raise ValueError(
                    f"{names}: HCNR options (add --method hcnr; the default method is "
                    f"{DEFAULT_METHOD}); {method} takes --set KEY=VALUE"
                )
        cfg, options = spec_and_options(spec, config, overrides, parse_settings(settings))
    except (ValidationError, ValueError, OSError, HCNRError) as exc:
        fail(exc)
    try:
        if not estimate:  # an estimate may be for devices this machine lacks
            resolve_devices(options.device)  # before reading any data
    except HCNRError as exc:
        fail(exc)
    inputs = MethodInputs(base, finetuned, honesty, task, validation)
    validate_within_limits(method, cfg, options, inputs)
    if estimate:  # nothing is loaded or written: headers, tokenizer and the models
        from hcnr_cli.estimate_cmd import estimate_and_exit

        estimate_and_exit(method, cfg, options, inputs, as_json)
    if out is None:
        fail(ValueError("--out is required (except with --estimate)"))
    integrations = tracking_opts.integrations_of(
        track, track_project, track_uri, track_entity, track_name
    )
    check_eval_file(eval_file)
    hub_target = hub_opts.target_of(push_to_hub, hub_private)  # token and id: before work
    tracking = tracking_opts.start(integrations, method, cfg, options, inputs, out)
    try:
        with ProgressPrinter(enabled=not no_progress and sys.stderr.isatty()) as bar:
            report = spec.run(cfg, inputs, out, options=options, progress=tracking.progress(bar))
    except HCNRError as exc:
        tracking.finish("failed")
        fail(exc)
    if eval_file is not None:
        evaluate_into_card(method, spec, cfg, options, inputs, out, report, eval_file)
    tracked = tracking_opts.finish(tracking, report, out, spec.report_name)
    summary = summary_of(method, out, report)
    if tracked:
        summary["tracking"] = tracked
    pushed = hub_opts.push(hub_target, out, report, spec.report_name)
    if pushed:
        summary["hub"] = pushed
    typer.echo(json.dumps(summary))


@app.command()
def toy(
    out: Annotated[Path, typer.Option(help="Directory for the toy checkpoints and data")],
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Write tiny random checkpoints (base, LoRA adapter, merged) and data, for smoke tests."""
    quiet_libraries()
    from hcnr_core.toy import build_toy

    paths = build_toy(out, seed=seed)
    typer.echo(json.dumps({k: str(v) for k, v in paths.items()}))


# The service (issue 4), the organism and evaluation and the baselines (issue 3), GGUF
# checkpoints (issue 11) and the real models: each module registers its commands.
for module in (serve_cmd, keys_cmd, jobs_cmd, organism_cmd, baseline_cmd, gguf_cmd, realmodel_cmd):
    module.register(app)


@app.command("build-honesty-data")
def build_honesty_data(
    model: Annotated[Path, typer.Option(help="Base model directory (the one to be repaired to)")],
    questions: Annotated[Path, typer.Option(help="SelfAware JSON, JSON list or JSONL questions")],
    out: Annotated[Path, typer.Option(help="Output JSONL (honesty set)")],
    n_samples: Annotated[
        int,
        typer.Option(
            min=2, help="Rows to write: half known, half IDK (fewer when either side is short)"
        ),
    ] = 128,
    idk: Annotated[str, typer.Option(help="Response for questions the model does not know")] = (
        "I don't know."
    ),
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option()] = "cpu",
    batch_size: Annotated[int, typer.Option()] = 32,
    max_new_tokens: Annotated[int, typer.Option()] = 32,
    allow_imbalance: Annotated[
        bool,
        typer.Option(
            "--allow-imbalance",
            help="Fill N_SAMPLES from the larger side when the model knows too few questions "
            "(or too many) [off: equal known and IDK rows, capped by the smaller side]",
        ),
    ] = False,
) -> None:
    """Build D_hon the R-Tuning way: the model's own answers decide what it knows.

    When the model answers few questions correctly the set is smaller than N_SAMPLES (or,
    with --allow-imbalance, mostly IDK rows); the JSON summary's `warnings` and stderr say
    so and what to do."""
    quiet_libraries()
    from hcnr_core import HCNRError
    from hcnr_core.evaluation import GenerationSettings, load_for_eval
    from hcnr_core.honesty_data import build_honesty_set, load_questions
    from hcnr_core.toy import write_jsonl

    if out.exists():
        fail(FileExistsError(f"{out} exists; choose a new output file"))
    try:
        asked = load_questions(questions)
        loaded, tokenizer = load_for_eval(model, None, device)
        settings = GenerationSettings(batch_size=batch_size, max_new_tokens=max_new_tokens)
        rows, stats = build_honesty_set(
            loaded,
            tokenizer,
            asked,
            n_samples=n_samples,
            idk=idk,
            seed=seed,
            settings=settings,
            allow_imbalance=allow_imbalance,
        )
    except HCNRError as exc:
        fail(exc)
    write_jsonl(out, rows)
    for warning in stats["warnings"]:
        err.print(f"[bold yellow]warning[/]: {escape(warning)}", highlight=False)
    typer.echo(json.dumps({"out": str(out), **stats}))


@app.command()
def probe(
    base: Annotated[Path, typer.Option(help="Base model directory")],
    finetuned: Annotated[Path, typer.Option(help="Fine-tuned model or LoRA adapter directory")],
    eval_files: Annotated[
        list[Path], typer.Option("--eval", help="JSONL with `answerable`; repeat per file")
    ],
    out: Annotated[Path, typer.Option(help="Report JSON")],
    plot_to: Annotated[Path | None, typer.Option("--plot", help="PNG of AUROC per layer")] = None,
    seed: Annotated[int, typer.Option(help="Train/test split seed")] = 0,
    device: Annotated[str, typer.Option()] = "cpu",
) -> None:
    """Per-layer probes: does the fine-tuned model still know what it doesn't know?"""
    quiet_libraries()
    import torch

    from hcnr_core import HCNRError
    from hcnr_core.data import load_jsonl
    from hcnr_core.evaluation import load_for_eval, write_report
    from hcnr_core.probe import last_token_states, plot, probe_layers

    try:
        samples = [s for f in eval_files for s in load_jsonl(f) if s.answerable is not None]
        labels = torch.tensor([not s.answerable for s in samples])
        if labels.all() or not labels.any():
            raise ValueError("the eval files need answerable and unanswerable questions")
        states = {}
        for name, directory, base_dir in (("base", base, None), ("ft", finetuned, base)):
            model, tokenizer = load_for_eval(directory, base_dir, device)
            states[name] = last_token_states(model, tokenizer, samples)
            del model
    except (HCNRError, ValueError) as exc:
        fail(exc)
    result = probe_layers(states["base"], states["ft"], labels, seed)
    report = {"samples": len(samples), "unanswerable": int(labels.sum()), "auroc": result}
    write_report(report, out)
    if plot_to is not None:
        try:
            plot(result, str(plot_to))
        except ImportError:
            fail(ImportError("--plot needs matplotlib: pip install matplotlib"))
    best = {k: round(max(v), 3) for k, v in result.items()}
    typer.echo(json.dumps({"out": str(out), "best_auroc": best}))


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
