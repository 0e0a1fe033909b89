"""Experiment tracking: a repair's hyper-parameters, stage timings, metrics, selected-matrix
table and plots, logged to Weights & Biases or MLflow.

    integrations = [Integration(type="mlflow", uri="http://mlflow:5000", project="honesty")]
    check_integrations(integrations)              # refused up front: misconfigured, not installed
    with Tracking(integrations, "my-run", params) as tracking:
        report = method.run(config, inputs, out, progress=tracking.progress(bar))
        tracking.log_report(report, out)
    report["tracking"] = tracking.summary         # run ids, links, failures

The library works without either tracker installed (`pip install 'hcnr[tracking]'` adds
them): each is imported when a run starts. A misconfigured integration is refused before
any work (`check_integrations`); a tracker that fails later — cannot start, a server that
stops answering — never fails the repair: the failure is warned about, recorded in
`summary` (and so in the report) and that tracker is dropped for the rest of the run.

Credentials are never part of an `Integration` (a job body is stored and echoed): W&B
reads `WANDB_API_KEY` (or `wandb login`), MLflow `MLFLOW_TRACKING_TOKEN` /
`MLFLOW_TRACKING_USERNAME` + `MLFLOW_TRACKING_PASSWORD` from the environment.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import struct
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hcnr_core.errors import RepairCancelled
from hcnr_core.progress import ProgressEvent

log = logging.getLogger("hcnr.tracking")

TrackerType = Literal["wandb", "mlflow"]
TRACKER_TYPES: tuple[str, ...] = ("wandb", "mlflow")
DEFAULT_PROJECT = "hcnr"
LIVE_STAGE = "stage_wall_seconds"  # logged as each stage ends; the report's are stage_seconds
# What each tracker's Python package is called, and the extra that installs it.
PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}
INSTALL_HINT = "pip install 'hcnr[tracking]'"
# Keys a client might use to pass a credential: refused with a message saying where they go.
CREDENTIAL_KEYS = ("api_key", "apikey", "key", "token", "password", "secret", "credentials")

# W&B project and entity names: letters, digits, '-', '_', '.' (W&B refuses / \ # ? % :);
# MLflow experiment names allow more, but one rule for both keeps a job portable.
Name = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
RunName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")]
TagKey = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._/-]+$")]
TagValue = Annotated[str, Field(max_length=256, pattern=r"^[^\x00-\x1f\x7f]*$")]


class Integration(BaseModel):
    """One tracker to log a repair to. No credentials: see the module's docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: TrackerType = Field(description="wandb (Weights & Biases) or mlflow")
    project: Name | None = Field(
        None, description=f"W&B project or MLflow experiment name [{DEFAULT_PROJECT}]"
    )
    entity: Name | None = Field(None, description="W&B only: team or user [the key's default]")
    uri: str | None = Field(
        None,
        max_length=2000,
        description="MLflow only: tracking URI [MLFLOW_TRACKING_URI, else MLflow's default]",
    )
    mode: Literal["online", "offline"] | None = Field(
        None, description="W&B only: offline writes the run locally for `wandb sync` [WANDB_MODE]"
    )
    run_name: RunName | None = Field(None, description="The run's name [the job id or output]")
    tags: dict[TagKey, TagValue] = Field(default_factory=dict, max_length=16)

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, data: Any) -> Any:
        if isinstance(data, dict):
            given = [k for k in data if str(k).lower() in CREDENTIAL_KEYS]
            if given:
                raise ValueError(
                    f"{', '.join(given)}: an integration takes no credentials (they would be "
                    "stored and shown); W&B reads WANDB_API_KEY and MLflow "
                    "MLFLOW_TRACKING_TOKEN where the repair runs"
                )
        return data

    @model_validator(mode="after")
    def _fields_of_the_type(self) -> Integration:
        if self.type == "mlflow":
            wrong = [f for f in ("entity", "mode") if getattr(self, f) is not None]
        else:
            wrong = ["uri"] if self.uri is not None else []
        if wrong:
            raise ValueError(f"{', '.join(wrong)}: not an option of a {self.type} integration")
        if self.uri is not None:
            parts = urlsplit(self.uri)
            if not parts.scheme:
                raise ValueError(f"uri {self.uri!r} has no scheme (http(s)://, file:, sqlite:)")
            if parts.username or parts.password:
                raise ValueError(
                    "uri must not carry credentials: MLflow reads MLFLOW_TRACKING_USERNAME/"
                    "MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN"
                )
            if any(ord(c) < 33 or ord(c) == 127 for c in self.uri):
                raise ValueError("uri must not contain spaces or control characters")
        return self


class TrackingConfigError(ValueError):
    """A misconfigured integration, refused before the repair starts."""

    code = "invalid_integration"


def check_integrations(integrations: Sequence[Integration]) -> None:
    """Refuse up front what cannot work: the same tracker twice, a tracker not installed."""
    kinds = [i.type for i in integrations]
    twice = sorted({k for k in kinds if kinds.count(k) > 1})
    if twice:
        raise TrackingConfigError(f"{', '.join(twice)} given twice: one run per tracker")
    missing = [k for k in dict.fromkeys(kinds) if not _installed(PACKAGES[k])]
    if missing:
        raise TrackingConfigError(f"{', '.join(missing)} is not installed: {INSTALL_HINT}")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# --- the trackers ----------------------------------------------------------------------------


class Tracker(Protocol):
    """One run in one tracker. Every method may raise: `Tracking` contains the failure."""

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> None: ...

    def log_stage(self, stage: str, seconds: float) -> None:
        """A stage's wall time as it ends (`stage_wall_seconds/<stage>`: from its first
        progress event to the next stage's, so it includes the freeing between stages;
        the report's own `stage_seconds/<stage>` come with the final metrics)."""

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """Final values (`stage_seconds/...` included: the report's exact timings)."""

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None: ...

    def log_file(self, path: Path, figure: bool = False) -> None:
        """A file of the output; `figure`: a plot, shown as an image where the tracker can."""

    def finish(self, status: str) -> None:
        """status: succeeded | failed | cancelled."""

    def link(self) -> dict[str, Any]:
        """Where the run is: ids, URL, local directory."""


class WandbTracker:
    """A W&B run. `directory`: where W&B writes (offline runs stay there); WANDB_DIR or
    the working directory by default."""

    def __init__(
        self, integration: Integration, directory: Path | None = None, api_key: str | None = None
    ):
        self.integration, self.directory, self.api_key = integration, directory, api_key
        self.run: Any = None

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        import wandb

        spec = self.integration
        settings = wandb.Settings(
            silent=True, console="off", disable_git=True, save_code=False, x_disable_stats=True
        )
        if self.api_key:  # a service tenant's own key; otherwise W&B's environment
            settings.api_key = self.api_key
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=spec.project or DEFAULT_PROJECT,
            entity=spec.entity,
            name=run_name,
            job_type="repair",
            config=params,
            tags=[f"{k}:{v}"[:64] for k, v in tags.items()],
            mode=spec.mode,
            dir=None if self.directory is None else str(self.directory),
            reinit="create_new",  # several runs in one process (a worker, a test session)
            settings=settings,
        )

    def log_stage(self, stage: str, seconds: float) -> None:
        self.run.log({f"{LIVE_STAGE}/{stage}": seconds})

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self.run.summary.update(metrics)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        import wandb

        self.run.log({name: wandb.Table(columns=columns, data=rows)})

    def log_file(self, path: Path, figure: bool = False) -> None:
        import wandb

        if figure:
            self.run.log({f"plots/{path.stem}": wandb.Image(str(path))})
            return
        # A copy, not W&B's symlink: the output may move (a worker's scratch) before a sync.
        copy = Path(self.run.dir) / path.name
        shutil.copyfile(path, copy)
        self.run.save(str(copy), base_path=self.run.dir, policy="now")

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "succeeded" else 1)

    def link(self) -> dict[str, Any]:
        if self.run is None:
            return {}
        offline = self.run.settings.mode in ("offline", "dryrun")
        return {
            "run_id": self.run.id,
            "url": None if offline else self.run.url,
            "offline_dir": str(Path(self.run.dir).parent) if offline else None,
        }


MLFLOW_STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}


class MlflowTracker:
    """An MLflow run through `MlflowClient` (no global active run: safe beside a user's own)."""

    def __init__(self, integration: Integration, token: str | None = None):
        self.integration, self.token = integration, token
        self.client: Any = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.integration.uri)
        name = self.integration.project or DEFAULT_PROJECT
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                self.experiment_id = self.client.create_experiment(name)
            except Exception:  # created meanwhile by a concurrent run
                experiment = self.client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment is not None:
            self.experiment_id = experiment.experiment_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags))
        self.run_id = run.info.run_id
        items = [Param(k, _param_text(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_stage(self, stage: str, seconds: float) -> None:
        self.client.log_metric(self.run_id, f"{LIVE_STAGE}/{stage}", seconds)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        data = {c: [row[i] for row in rows] for i, c in enumerate(columns)}
        self.client.log_table(self.run_id, data=data, artifact_file=f"{name}.json")

    def log_file(self, path: Path, figure: bool = False) -> None:
        self.client.log_artifact(self.run_id, str(path), "plots" if figure else None)

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(status, "FAILED"))

    def link(self) -> dict[str, Any]:
        if self.run_id is None:
            return {}
        uri = self.client.tracking_uri if self.client is not None else None
        url = None
        if uri and uri.startswith(("http://", "https://")):
            url = f"{uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return {
            "run_id": self.run_id,
            "experiment_id": self.experiment_id,
            "tracking_uri": uri,
            "url": url,
        }


def make_tracker(
    integration: Integration, workdir: Path | None = None, credential: str | None = None
) -> Tracker:
    """The tracker of `integration`; `credential` (a W&B API key, an MLflow token) when
    the caller holds one, else the tracker's own environment applies."""
    if integration.type == "wandb":
        return WandbTracker(integration, workdir, credential)
    return (
        _WithToken(MlflowTracker(integration, credential))
        if credential
        else MlflowTracker(integration)
    )


class _WithToken:
    """An MlflowTracker whose calls see MLFLOW_TRACKING_TOKEN set to its token (MLflow's
    REST client reads its credentials from the environment at each request)."""

    def __init__(self, tracker: MlflowTracker):
        self.tracker = tracker

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.tracker, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            with _environment("MLFLOW_TRACKING_TOKEN", self.tracker.token):
                return method(*args, **kwargs)

        return call


@contextlib.contextmanager
def _environment(name: str, value: str | None) -> Iterator[None]:
    before = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


# --- a run logged to every tracker, failures contained ------------------------------------------


class Tracking:
    """A repair run logged to each integration; a failing tracker is dropped, never raised.

    Used as a context manager, the runs finish with the outcome of the block: succeeded,
    cancelled (`RepairCancelled`) or failed (any other exception, which propagates)."""

    def __init__(
        self,
        integrations: Sequence[Integration],
        run_name: str,
        params: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
        *,
        workdir: Path | None = None,
        factory: Callable[[Integration, Path | None], Tracker] = make_tracker,
        warn: Callable[[str], None] | None = None,
    ):
        self.integrations = list(integrations)
        self.run_name = run_name
        self.params = flatten(params or {})
        self.tags = dict(tags or {})
        self.workdir = workdir
        self._factory = factory
        self._warn = warn or (lambda message: warnings.warn(message, stacklevel=3))
        self._live: dict[int, Tracker] = {}
        self._dead: dict[int, Tracker] = {}  # failed after starting: linked, no longer fed
        self.summary: list[dict[str, Any]] = [
            {"type": i.type, "project": i.project or DEFAULT_PROJECT, "status": "pending"}
            for i in self.integrations
        ]
        self._stage: str | None = None
        self._stage_started = 0.0
        self.finished = False

    # -- lifecycle

    def __enter__(self) -> Tracking:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        if kind is None:
            self.finish("succeeded")
        elif issubclass(kind, RepairCancelled):
            self.finish("cancelled")
        else:
            self.finish("failed")

    def start(self) -> None:
        for index, integration in enumerate(self.integrations):
            tracker = self._factory(integration, self.workdir)
            name = integration.run_name or self.run_name
            tags = {**self.tags, **integration.tags}
            if self._call(index, "start", tracker.start, name, self.params, tags, live=False):
                self._live[index] = tracker
                self.summary[index].update(status="running", run_name=name)

    def finish(self, status: str) -> list[dict[str, Any]]:
        """Close every run with `status` (once); returns `summary`."""
        if self.finished:
            return self.summary
        self._end_stage()
        for index, tracker in list(self._live.items()):
            self._call(index, "finish", tracker.finish, status)
        for index in self._live:
            self.summary[index].update(status="ok", outcome=status)
        for index, entry in enumerate(self.summary):
            tracker = self._live.get(index) or self._dead.get(index)
            if tracker is not None:
                with contextlib.suppress(Exception):  # a link is a courtesy
                    entry.update({k: v for k, v in tracker.link().items() if v is not None})
        self.finished = True
        return self.summary

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [entry for entry in self.summary if entry["status"] == "failed"]

    # -- what is logged

    def progress(self, downstream: Callable[[ProgressEvent], None] | None = None) -> Callable:
        """A progress callback that passes events on and logs each stage's time as it ends."""

        def on_event(event: ProgressEvent) -> None:
            if downstream is not None:
                downstream(event)
            if event.stage != self._stage:
                self._end_stage()
                self._stage, self._stage_started = event.stage, time.perf_counter()

        return on_event

    def _end_stage(self) -> None:
        if self._stage is None:
            return
        seconds = round(time.perf_counter() - self._stage_started, 4)
        stage, self._stage = self._stage, None
        self._each("log_stage", lambda t: t.log_stage(stage, seconds))

    def log_report(
        self,
        report: dict[str, Any],
        out: Path | None = None,
        report_name: str | None = None,
        figures: Sequence[Path] = (),
    ) -> None:
        """The report's metrics and timings, the selected-matrix table, the plots in `out`
        (and `figures`), a before/after chart when the report has eval metrics, and the
        report file itself."""
        if not self._live:
            return
        self._end_stage()
        metrics = report_metrics(report)
        self._each("log_metrics", lambda t: t.log_metrics(metrics))
        table = selected_matrix_table(report, out)
        if table is not None:
            self._each("log_table", lambda t: t.log_table("selected_matrices", *table))
        candidates = candidate_table(report)
        if candidates is not None:
            self._each("log_table", lambda t: t.log_table("auto_candidates", *candidates))
        with tempfile.TemporaryDirectory(prefix="hcnr-tracking-") as scratch:
            plots = [p for p in figures if p.is_file()]
            if out is not None:
                plots += sorted(p for p in Path(out).glob("*.png") if p.is_file())
            chart = before_after_chart(report, Path(scratch) / "honesty_before_after.png")
            if chart is not None:
                plots.append(chart)
            for plot in plots:
                self._each("log_file", lambda t, p=plot: t.log_file(p, figure=True))
            if out is not None and report_name and (Path(out) / report_name).is_file():
                path = Path(out) / report_name
                self._each("log_file", lambda t: t.log_file(path))

    # -- containment

    def _each(self, what: str, call: Callable[[Tracker], None]) -> None:
        for index, tracker in list(self._live.items()):
            self._call(index, what, call, tracker)

    def _call(self, index: int, what: str, func: Callable, *args: Any, live: bool = True) -> bool:
        try:
            func(*args)
            return True
        except Exception as exc:
            integration = self.integrations[index]
            message = f"{integration.type} tracking failed at {what}: {type(exc).__name__}: {exc}"
            self._warn(f"{message}; the repair goes on without it")
            log.warning("%s", message)
            entry = self.summary[index]
            entry["status"] = "failed"
            entry.setdefault("errors", []).append(message[:1000])
            if live and index in self._live:
                self._dead[index] = self._live.pop(index)
                if what != "finish":  # close the run as failed, best effort
                    with contextlib.suppress(Exception):
                        self._dead[index].finish("failed")
            return False


# --- what a report holds, as tracker data ------------------------------------------------------


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as `a.b` keys; lists stay values (trackers show them as text)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _param_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:6000]  # MLflow's limit on a parameter value


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


# Report fields logged as metrics, when present (HCNR, RAIT/DPO).
SCALARS = (
    "n_target_matrices",
    "n_selected_matrices",
    "target_params",
    "restored_params",
    "changed_params",
    "fraction_target_params_restored",
    "fraction_target_params_changed",
    "fraction_model_params_changed",
    "samples_used",
    "steps",
    "seconds_total",
)
EVAL_KEYS = (
    "refusal_f1",
    "rf_delta",
    "refusal_rate_unanswerable",
    "refusal_rate_answerable",
    "answer_accuracy",
    "domain_accuracy",
)
ROLES = ("base", "finetuned", "repaired")


def report_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The numbers of a method report as flat metric names:
    report scalars; `stage_seconds/<stage>`; `fisher_mean_loss/<which>`; `final_loss`;
    `eval/<base|finetuned|repaired>/<metric>` and `eval/recovery` (an eval set's
    before/after metrics); `auto/reference/...` and `auto/chosen/...` (auto's validation)."""
    out: dict[str, float | None] = {k: _number(report.get(k)) for k in SCALARS}
    for stage, seconds in (report.get("stage_seconds") or {}).items():
        out[f"stage_seconds/{stage}"] = _number(seconds)
    for which, loss in (report.get("fisher_mean_loss") or {}).items():
        out[f"fisher_mean_loss/{which}"] = _number(loss)
    if report.get("losses"):
        out["final_loss"] = _number(report["losses"][-1])
    evaluation = report.get("metrics") or {}
    for role in ROLES:
        for key in EVAL_KEYS:
            out[f"eval/{role}/{key}"] = _number((evaluation.get(role) or {}).get(key))
    out["eval/recovery"] = _number(evaluation.get("recovery"))
    for role, values in (report.get("reference") or {}).items():
        for key in EVAL_KEYS:
            out[f"auto/reference/{role}/{key}"] = _number(values.get(key))
    chosen = next(
        (c for c in report.get("candidates") or [] if c.get("name") == report.get("chosen")), None
    )
    if chosen is not None:
        for key in (*EVAL_KEYS, "recovery", "domain_drop_points", "seconds"):
            out[f"auto/chosen/{key}"] = _number(chosen.get(key))
    return {k: v for k, v in out.items() if v is not None}


LAYER = re.compile(r"\.(\d+)\.")
TABLE_COLUMNS = ["matrix", "layer", "kind", "columns_restored", "in_features", "fraction"]


def selected_matrix_table(
    report: dict[str, Any], out: Path | None = None
) -> tuple[list[str], list[list[Any]]] | None:
    """(columns, rows) of HCNR's selected matrices: name, layer, kind (`mlp.down_proj`),
    columns restored, the matrix's width and the fraction of its columns restored (the
    width read from the published safetensors headers in `out`; None without them)."""
    selected = report.get("selected_matrices")
    if selected is None:
        return None
    widths = _widths(out) if out is not None else {}
    rows = []
    for entry in selected:
        name = entry["name"]
        match = LAYER.search(name)
        layer = int(match.group(1)) if match else None
        kind = name[match.end() :] if match else name
        width = widths.get(name)
        n = entry["n_columns"]
        rows.append(
            [name, layer, kind.removesuffix(".weight"), n, width, n / width if width else None]
        )
    return TABLE_COLUMNS, rows


def _widths(out: Path) -> dict[str, int]:
    """Each 2-D tensor's second dimension, from the safetensors headers (no weights read)."""
    widths: dict[str, int] = {}
    for path in sorted(Path(out).glob("*.safetensors")):
        try:
            with path.open("rb") as handle:
                (size,) = struct.unpack("<Q", handle.read(8))
                if size > 100 << 20:  # a header this large is no header we wrote
                    continue
                header = json.loads(handle.read(size))
        except (OSError, ValueError, struct.error):
            continue
        for name, info in header.items():
            shape = info.get("shape") if isinstance(info, dict) else None
            if isinstance(shape, list) and len(shape) == 2:
                widths[name] = int(shape[1])
    return widths


def candidate_table(report: dict[str, Any]) -> tuple[list[str], list[list[Any]]] | None:
    """auto's candidates: name, method, status, validation F1 and domain accuracy, drop."""
    candidates = report.get("candidates")
    if not candidates:
        return None
    keys = ("name", "method", "status", "refusal_f1", "domain_accuracy", "domain_drop_points",
            "recovery", "seconds")  # fmt: skip
    rows = [[c.get(k) for k in keys] + [c.get("name") == report.get("chosen")] for c in candidates]
    return [*keys, "chosen"], rows


def before_after_chart(report: dict[str, Any], path: Path) -> Path | None:
    """Bars of refusal F1 and domain/answer accuracy for base, fine-tuned and repaired
    (the report's eval metrics); None without them or without matplotlib."""
    evaluation = report.get("metrics") or {}
    roles = [r for r in ROLES if isinstance(evaluation.get(r), dict)]
    if not roles:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = ("refusal_f1", "answer_accuracy", "domain_accuracy")
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    width = 0.8 / len(roles)
    for i, role in enumerate(roles):
        values = [100 * (_number(evaluation[role].get(k)) or 0.0) for k in keys]
        ax.bar([j + i * width for j in range(len(keys))], values, width, label=role)
    ax.set_xticks([j + width * (len(roles) - 1) / 2 for j in range(len(keys))], keys)
    ax.set_ylabel("%")
    recovery = _number(evaluation.get("recovery"))
    title = "honesty before and after the repair"
    ax.set_title(title + (f" (recovery {100 * recovery:.0f}%)" if recovery is not None else ""))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def wandb_offline_runs(directory: Path) -> Iterator[Path]:
    """The offline run directories W&B wrote under `directory` (for `wandb sync`)."""
    yield from sorted((Path(directory) / "wandb").glob("offline-run-*"))


def record_in_report(path: Path, summary: list[dict[str, Any]]) -> None:
    """Add `tracking` (each run's id, link, status and failures) to a published report
    file, atomically: the report says where its run was logged, or why it was not."""
    path = Path(path)
    report = json.loads(path.read_text())
    report["tracking"] = summary
    staged = path.with_name(f".{path.name}.tracking")
    staged.write_text(json.dumps(report, indent=2) + "\n")
    staged.replace(path)


def published_report(report: dict[str, Any], path: Path) -> dict[str, Any]:
    """`report` as published at `path`: what the file says wins (HCNR's file times "save"
    up to its own writing, the returned dict a little later), and what was added after
    publishing (an eval set's `metrics`) is kept."""
    try:
        return {**report, **json.loads(Path(path).read_text())}
    except (OSError, ValueError):
        return report
