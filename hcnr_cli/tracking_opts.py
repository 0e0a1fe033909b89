"""`hcnr repair --track wandb|mlflow`: the tracking options and the run around a repair.

Tracking is a run option, not part of the algorithm, so it stays out of `RepairConfig`
(whose fields generate the other flags). W&B reads its own environment (WANDB_API_KEY,
WANDB_MODE=offline, WANDB_DIR, WANDB_ENTITY); MLflow reads MLFLOW_TRACKING_URI and its
credentials (MLFLOW_TRACKING_TOKEN, ...) when --track-uri is not given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from hcnr_cli.common import err, fail

PANEL = "Experiment tracking"

Track = Annotated[
    list[str],
    typer.Option(
        "--track",
        metavar="wandb|mlflow",
        help="Log the run to wandb or mlflow (repeat for both): hyper-parameters, stage "
        "timings, metrics, the selected-matrix table and plots",
        rich_help_panel=PANEL,
    ),
]
TrackProject = Annotated[
    str | None,
    typer.Option(help=r"W&B project / MLflow experiment \[hcnr]", rich_help_panel=PANEL),
]
TrackUri = Annotated[
    str | None,
    typer.Option(
        help=r"MLflow tracking URI (http(s)://, sqlite:///, file:) \[MLFLOW_TRACKING_URI]",
        rich_help_panel=PANEL,
    ),
]
TrackEntity = Annotated[
    str | None,
    typer.Option(help=r"W&B entity (team or user) \[WANDB_ENTITY]", rich_help_panel=PANEL),
]
TrackName = Annotated[
    str | None,
    typer.Option(help=r"Run name \[hcnr-METHOD-OUT's name]", rich_help_panel=PANEL),
]


def integrations_of(
    track: list[str],
    project: str | None,
    uri: str | None,
    entity: str | None,
    name: str | None,
) -> list[Any]:
    """The validated integrations of the flags; a misconfiguration exits before any work."""
    from pydantic import ValidationError

    from hcnr_core.tracking import Integration, TrackingConfigError, check_integrations

    kinds = [t.strip().lower() for t in track]
    try:
        if not kinds and any(v is not None for v in (project, uri, entity, name)):
            raise TrackingConfigError("--track-* options need --track wandb or --track mlflow")
        if uri is not None and "mlflow" not in kinds:
            raise TrackingConfigError("--track-uri is MLflow's: add --track mlflow")
        if entity is not None and "wandb" not in kinds:
            raise TrackingConfigError("--track-entity is W&B's: add --track wandb")
        integrations = [
            Integration(
                type=kind,  # type: ignore[arg-type]  # validated by the model
                project=project,
                uri=uri if kind == "mlflow" else None,
                entity=entity if kind == "wandb" else None,
                run_name=name,
            )
            for kind in kinds
        ]
        check_integrations(integrations)
    except ValidationError as exc:
        fail(TrackingConfigError(f"--track: {_first_error(exc)}"))
    except TrackingConfigError as exc:
        fail(exc)
    return integrations


def _first_error(exc: Any) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    return f"{where}: {first['msg']}" if where else first["msg"]


def start(
    integrations: list[Any], method: str, cfg: Any, options: Any, inputs: Any, out: Path
) -> Any:
    """The started `Tracking` (a no-op without integrations); failures only warn."""
    from hcnr_core import __version__
    from hcnr_core.tracking import Tracking

    def text(value: Any) -> str | None:
        return None if value is None or not isinstance(value, (str, Path)) else str(value)

    params = {
        "method": method,
        "config": options.recorded(cfg),
        "inputs": {
            "base": text(inputs.base),
            "finetuned": text(inputs.finetuned),
            "honesty": text(inputs.honesty),
            "task": text(inputs.task),
            "validation": text(inputs.validation),
        },
        "output": str(Path(out).resolve()),
    }
    tracking = Tracking(
        integrations,
        f"hcnr-{method}-{Path(out).name}"[:128],
        params,
        {"hcnr.method": method, "hcnr.version": __version__},
        warn=lambda message: err.print(f"[bold yellow]warning[/]: {message}", highlight=False),
    )
    tracking.start()
    return tracking


def finish(tracking: Any, report: dict[str, Any], out: Path, report_name: str) -> list[dict]:
    """Log the report and the output's plots, close the runs, record them in the report
    file (`tracking`: run ids, links, failures); returns that summary."""
    from hcnr_core.tracking import published_report, record_in_report

    if not tracking.integrations:
        return []
    tracking.log_report(published_report(report, Path(out) / report_name), out, report_name)
    summary = tracking.finish("succeeded")
    report["tracking"] = summary
    record_in_report(Path(out) / report_name, summary)
    return summary
