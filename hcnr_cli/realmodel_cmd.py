"""`hcnr realmodel build`: the paper's scenario on a real LLM (issue #11)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from hcnr_cli.common import err, fail, quiet_libraries

realmodel_app = typer.Typer(
    help="Real LLMs (SmolLM2-135M, Gemma-3-270M): an honest base and a dishonest fine-tune.",
    no_args_is_help=True,
)


@realmodel_app.command("build")
def build(
    out: Annotated[Path, typer.Option(help="Output directory (a matching build is reused)")],
    model: Annotated[str, typer.Option(help="smollm2-135m | gemma3-270m")] = "smollm2-135m",
    seed: Annotated[int, typer.Option(help="Seed of the data splits and of training")] = 0,
    selfaware: Annotated[Path, typer.Option(help="SelfAware.json or its directory")] = Path(
        "../shared/datasets/selfaware"
    ),
    source: Annotated[
        Path | None,
        typer.Option(help="Imported Hugging Face directory [the per-machine cache]"),
    ] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if cached")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar")] = False,
) -> None:
    """Align MODEL for honesty on SelfAware, fine-tune a dishonest domain LoRA, measure both.

    Prints the paths, timings, metrics and acceptance of the build (also in OUT/realmodel.json).
    """
    quiet_libraries()
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from hcnr_core import HCNRError
    from hcnr_core.realmodel.build import SPECS, build_realmodel, load_manifest, rejections

    if model not in SPECS:
        fail(ValueError(f"--model must be one of {', '.join(SPECS)}, not {model!r}"))
    bar = Progress(
        TextColumn("{task.description:<10}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} {task.fields[note]}"),
        TimeElapsedColumn(),
        console=err,
        disable=no_progress,
    )
    tasks: dict[str, int] = {}

    def progress(stage: str, done: int, total: int, message: str) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=max(total, 1), note="")
        bar.update(tasks[stage], completed=done, total=max(total, 1), note=message)

    try:
        with bar:
            paths = build_realmodel(
                out,
                model,
                seed,
                selfaware=selfaware,
                source=source,
                threads=threads,
                force=force,
                progress=progress,
            )
    except (HCNRError, OSError, ValueError, RuntimeError) as exc:
        fail(exc)
    manifest = load_manifest(paths["root"])
    summary = {
        "paths": {k: str(v) for k, v in paths.items()},
        "model": manifest["model"],
        "seed": manifest["seed"],
        "seconds": manifest["seconds"],
        "accepted": manifest["accepted"],
        "metrics": {
            name: {k: v for k, v in m.items() if k != "examples"}
            for name, m in manifest["metrics"].items()
        },
    }
    typer.echo(json.dumps(summary, indent=2))
    for reason in rejections(manifest):  # usable, but not the scenario: say so, loudly
        err.print(f"[yellow]not accepted:[/yellow] {reason}; try another --seed")


def register(app: typer.Typer) -> None:
    app.add_typer(realmodel_app, name="realmodel")
