"""What the `hcnr` sub-command modules share: the error console, `fail`, the progress
bar, quieting the libraries, `--set` parsing, the bounded validation and the JSON summary
of a run. It imports no other `hcnr_cli` module, so every sub-command module can import
it at the top and `main` imports them all: no import cycle (tests/test_cli_imports.py)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

err = Console(stderr=True, soft_wrap=True)  # never split an error message


# What each optional part needs and how a user gets it (pyproject.toml's extras).
EXTRAS = {
    "compute": "install torch (the build you want), then pip install 'hcnr[compute]'",
    "service": "pip install 'hcnr[service]'",
    "client": "pip install hcnr-client (clients/python in the repository)",
}


def require(extra: str, command: str) -> None:
    """Exit with a clear error when `command` needs an extra that is not installed."""
    modules = {
        "compute": ("torch", "transformers", "peft", "trl"),
        "service": ("fastapi", "uvicorn", "celery", "sqlalchemy", "alembic", "redis"),
        "client": ("hcnr_client",),
    }[extra]
    import importlib.util

    def absent(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is None
        except (ImportError, ValueError):
            return True

    missing = [m for m in modules if absent(m)]
    if missing:
        fail(MissingDependency(f"`{command}` needs {', '.join(missing)}: {EXTRAS[extra]}"))


class MissingDependency(Exception):
    code = "missing_dependency"


def quiet_libraries() -> None:
    """transformers' per-load progress bars and advisories drown our own output."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def fail(exc: Exception, code: int = 2) -> None:
    """Print `error [code]: message` on stderr and exit non-zero."""
    label = escape(f"[{getattr(exc, 'code', 'invalid_argument')}]")
    err.print(f"[bold red]error[/] {label}: {escape(str(exc))}", highlight=False)
    raise typer.Exit(code)


class ProgressPrinter:
    """A rich progress bar fed by the pipeline's ProgressEvents."""

    def __init__(self, enabled: bool = True):
        self.progress = Progress(
            TextColumn("{task.description:<16}"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err,
            disable=not enabled,
        )
        self.task = self.progress.add_task("starting", total=1.0)

    def __enter__(self) -> ProgressPrinter:
        self.progress.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.progress.stop()

    def __call__(self, event: Any) -> None:
        self.progress.update(self.task, completed=event.fraction, description=event.stage)


def validate_within_limits(method: str, cfg: Any, options: Any, inputs: Any) -> None:
    """The method's checks in a child process under the limits (`HCNR_*`, see README
    "Limits"): a hostile config, chat template or tokenizer fails with a code instead of
    hanging the command; the run that follows repeats the same, now bounded, work."""
    from jinja2.exceptions import SecurityError, TemplateError

    from hcnr_core import HCNRError
    from hcnr_core.bounded import validate_bounded
    from hcnr_core.limits import Limits

    try:
        validate_bounded(method, cfg, inputs, Limits(), fork=True, options=options)
    except HCNRError as exc:
        fail(exc)
    except TemplateError as exc:  # the chat template refuses a sample
        exc.code = "unsafe_checkpoint" if isinstance(exc, SecurityError) else "invalid_data"
        fail(exc)


# Spec fields every method shares; the rest of `repair`'s spec flags are HCNR's own. (The
# run options are a model of their own, `RunOptions`, and apply as each method allows.)
SHARED_FLAGS = ("seed", "dtype", "max_seq_len")


def spec_and_options(
    method: Any, config_file: Path | None, flags: dict[str, Any], settings: dict[str, Any]
) -> tuple[Any, Any]:
    """The method's spec and its `RunOptions` from a `--config` file, flags and `--set`
    pairs (which win, in that order). A file or `--set` may hold run options under their
    own names (`device: cuda`) beside the spec's fields: one file still describes a run.
    Raises ValidationError, ValueError, OSError or HCNRError."""
    from hcnr_core.config import RunOptions, read_config_file, split_run_options

    spec_values: dict[str, Any] = {}
    option_values: dict[str, Any] = {}
    layers = [read_config_file(config_file)] if config_file else []
    for values in (*layers, flags, settings):
        spec_part, options_part = split_run_options(values)
        spec_values.update(spec_part)
        option_values.update(options_part)
    cfg = method.make_config(spec_values)
    return cfg, RunOptions(**option_values).check_for(type(cfg))


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` pairs; values are read as YAML (numbers, booleans, lists)."""
    import yaml

    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        values[key.strip()] = yaml.safe_load(raw) if raw.strip() else raw
    return values


def summary_of(method: str, out: Path, report: dict[str, Any]) -> dict[str, Any]:
    summary = _summary(method, out, report)
    if report.get("metrics"):  # --eval: the refusal F1 of each model and the recovery
        metrics = report["metrics"]
        summary["refusal_f1"] = {
            role: metrics[role]["refusal_f1"]
            for role in ("base", "finetuned", "repaired")
            if role in metrics
        }
        summary["recovery"] = metrics.get("recovery")
    return summary


def _summary(method: str, out: Path, report: dict[str, Any]) -> dict[str, Any]:
    if method == "auto":
        return {
            "out": str(out),
            "method": "auto",
            "chosen": report["chosen"],
            "reason": report["reason"],
            "candidates": [
                {
                    "name": r["name"],
                    "status": r["status"],
                    "refusal_f1": r.get("refusal_f1"),
                    "domain_drop_points": r.get("domain_drop_points"),
                }
                for r in report["candidates"]
            ],
        }
    if method == "hcnr":
        return {
            "out": str(out),
            "selected_matrices": report["n_selected_matrices"],
            "target_matrices": report["n_target_matrices"],
            "fraction_target_params_changed": round(report["fraction_target_params_changed"], 6),
            "seconds": round(sum(report["stage_seconds"].values()), 3),
        }
    summary = {
        "out": str(out),
        "method": method,
        "samples_used": report["samples_used"],
        "steps": report["steps"],
        "final_loss": report["losses"][-1],
        "fraction_model_params_changed": round(report["fraction_model_params_changed"], 6),
        "seconds": report["seconds_total"],
    }
    if "pairs" in report:
        summary["pairs"] = report["pairs"]
    return summary


EvalFile = Annotated[
    Path | None,
    typer.Option(
        "--eval",
        help="Eval JSONL (`answerable` / `answers` rows): evaluate base, fine-tuned and "
        "repaired models; the metrics go into the report and the card's model-index",
    ),
]


def check_eval_file(eval_file: Path | None) -> None:
    """A bad eval file fails before the repair, not after it."""
    if eval_file is None:
        return
    from hcnr_core import HCNRError
    from hcnr_core.data import load_jsonl

    try:
        load_jsonl(eval_file)
    except (HCNRError, OSError) as exc:
        fail(exc)


def evaluate_into_card(
    method: str,
    spec: Any,
    cfg: Any,
    options: Any,
    inputs: Any,
    out: Path,
    report: dict[str, Any],
    eval_file: Path,
) -> None:
    """Before/after metrics of a published run (`evaluate_repair`, as the service's eval
    file), written into its report and its Hub card's model-index (`write_card`)."""
    from hcnr_core import HCNRError
    from hcnr_core.card import CardInputs, hyperparameters, write_card
    from hcnr_core.evaluation import evaluate_repair

    try:
        report["metrics"] = evaluate_repair(
            inputs.base,
            inputs.finetuned,
            out,
            eval_file,
            max_seq_len=cfg.max_seq_len,
            device=options.device,
        )
    except HCNRError as exc:
        fail(exc)
    if "inputs" in report:
        card = CardInputs.of_report(method, report)
    else:  # auto's report names no inputs of its own
        base = None if inputs.base is None else str(inputs.base)
        card = CardInputs(method, base, str(inputs.finetuned), hyperparameters(report))
    report["report_name"] = spec.report_name
    write_card(out, card, report, eval_file.name)
