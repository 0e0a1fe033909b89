"""`hcnr organism build` (the self-contained demo organism) and `hcnr eval`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from hcnr_cli.common import err, fail, quiet_libraries

organism_app = typer.Typer(
    help="The model organism: an honest base and a dishonest LoRA fine-tune, built locally.",
    no_args_is_help=True,
)


@organism_app.command("build")
def build(
    out: Annotated[Path, typer.Option(help="Output directory (a matching build is reused)")],
    size: Annotated[str, typer.Option(help="tiny (CPU, minutes) | small (GPU)")] = "tiny",
    seed: Annotated[int, typer.Option(help="Seed of the world and of training")] = 0,
    device: Annotated[str | None, typer.Option(help="cpu | cuda [cuda when available]")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if cached")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No training log on stderr")] = False,
) -> None:
    """Train (or reuse) the organism in OUT; prints its paths and acceptance metrics."""
    quiet_libraries()
    from hcnr_core.organism import SIZES, build_organism, load_manifest

    if size not in SIZES:
        fail(ValueError(f"--size must be one of {', '.join(SIZES)}, not {size!r}"))
    log = (lambda _: None) if quiet else (lambda m: err.print(m, highlight=False))
    try:
        paths = build_organism(out, size=size, seed=seed, device=device, force=force, log=log)
    except (OSError, ValueError, RuntimeError) as exc:
        fail(exc)
    manifest = load_manifest(paths["root"])
    summary = {
        "paths": {k: str(v) for k, v in paths.items()},
        "size": manifest["size"],
        "seed": manifest["seed"],
        "seconds": manifest["seconds"],
        "metrics": manifest["metrics"],
    }
    typer.echo(json.dumps(summary, indent=2))


def eval_command(
    model: Annotated[Path, typer.Option(help="Model directory or PEFT LoRA adapter directory")],
    eval_files: Annotated[
        list[Path], typer.Option("--eval", help="Eval JSONL file (repeat the flag for more)")
    ],
    out: Annotated[Path | None, typer.Option(help="Write the JSON report here")] = None,
    base: Annotated[
        Path | None, typer.Option(help="Base model of an adapter [its adapter_config]")
    ] = None,
    refusal_patterns: Annotated[
        Path | None, typer.Option(help="File of refusal regexes, one a line [built-in list]")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Generation batch size")] = 32,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens generated per answer")] = 32,
    max_seq_len: Annotated[int, typer.Option(min=8, help="Prompt + answer token limit")] = 512,
    device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N")] = "cpu",
    no_responses: Annotated[
        bool, typer.Option("--no-responses", help="Leave per-sample responses out of the report")
    ] = False,
    reliability_png: Annotated[
        Path | None,
        typer.Option(help="Write a reliability diagram (answer confidence vs accuracy) here"),
    ] = None,
) -> None:
    """Generate greedily on eval sets; print refusal F1, RFΔ and accuracies (DESIGN §5)."""
    quiet_libraries()
    from hcnr_core import HCNRError
    from hcnr_core.evaluation import (
        GenerationSettings,
        RefusalDetector,
        evaluate_model,
        write_report,
    )

    try:
        patterns = (
            RefusalDetector.from_file(refusal_patterns).patterns if refusal_patterns else None
        )
        settings = GenerationSettings(batch_size, max_new_tokens, max_seq_len)
        result = evaluate_model(
            model,
            eval_files,
            base_dir=base,
            patterns=patterns,
            settings=settings,
            device=device,
            keep_responses=not no_responses,
        )
    except (HCNRError, OSError, ValueError) as exc:
        fail(exc)
    if out is not None:
        write_report(result, out)
    if reliability_png is not None:
        from hcnr_core.evaluation import reliability_diagram

        calibration = result["metrics"]["calibration"]
        if reliability_diagram({model.name: calibration}, reliability_png) is None:
            err.print("no reliability diagram: no graded answers (or matplotlib is missing)")
    typer.echo(json.dumps({"metrics": result["metrics"], "sets": result["sets"]}, indent=2))


def register(app: typer.Typer) -> None:
    """`hcnr organism build` and `hcnr eval`."""
    app.add_typer(organism_app, name="organism")
    app.command("eval")(eval_command)
