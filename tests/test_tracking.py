"""Experiment tracking (issue 17): `hcnr repair --track wandb|mlflow` on the toy, read back
with each library's own reader — MLflow's client on a local store, W&B's offline run files
(its protobuf records) — and compared with the repair's own report."""

from __future__ import annotations

import json
import math
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.toy_cli import repair_argv

mlflow = pytest.importorskip("mlflow")
wandb = pytest.importorskip("wandb")

from hcnr_cli.main import app  # noqa: E402
from hcnr_core.tracking import (  # noqa: E402
    LIVE_STAGE,
    Integration,
    Tracking,
    TrackingConfigError,
    check_integrations,
    flatten,
)


@pytest.fixture(autouse=True)
def _trackers_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No tracker reaches a network; a failing MLflow server is given up on quickly."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "wandb-dir").mkdir()
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root (./mlruns) lands here


IDK = "sorry , i do not know ."
EVAL_ROWS = [
    {"prompt": "where was alice born ?", "response": IDK, "answerable": False},
    {"prompt": "what city is bob in ?", "response": "paris .", "answers": ["paris"]},
] * 2


@pytest.fixture(scope="module")
def tracked(toy: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One CLI repair on the toy logged to MLflow (sqlite store) and W&B (offline)."""
    root = tmp_path_factory.mktemp("tracked")
    out, store = root / "out", f"sqlite:///{root / 'mlflow.db'}"
    patch = pytest.MonkeyPatch()
    patch.setenv("WANDB_MODE", "offline")
    patch.setenv("WANDB_DIR", str(root))
    patch.setenv("WANDB_SILENT", "true")
    patch.chdir(root)
    try:
        from hcnr_core.toy import write_jsonl

        eval_file = write_jsonl(root / "eval.jsonl", EVAL_ROWS)
        args = repair_argv(toy, out, "--track", "mlflow", "--track", "wandb")
        args += ["--eval", str(eval_file)]  # before/after metrics in the report
        args += ["--track-uri", store, "--track-project", "honesty-exp", "--track-name", "toy-run"]
        result = CliRunner().invoke(app, args)
        wandb.teardown()  # what the CLI's exit does: W&B's service flushes the run's log
    finally:
        patch.undo()
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    report = json.loads((out / "hcnr_report.json").read_text())
    return {"out": out, "store": store, "root": root, "summary": summary, "report": report}


def _widths(out: Path) -> dict[str, int]:
    """Matrix widths read with safetensors itself (not the tracking module's header reader)."""
    from safetensors import safe_open

    widths = {}
    for path in out.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                if len(shape) == 2:
                    widths[key] = shape[1]
    return widths


def _expected_rows(report: dict[str, Any], out: Path) -> list[tuple[str, int, int, float]]:
    widths = _widths(out)
    return [
        (m["name"], m["n_columns"], widths[m["name"]], m["n_columns"] / widths[m["name"]])
        for m in report["selected_matrices"]
    ]


# --- MLflow -------------------------------------------------------------------------------


def test_mlflow_run_holds_params_metrics_timings_and_the_table(tracked: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    report, out = tracked["report"], tracked["out"]
    client = MlflowClient(tracking_uri=tracked["store"])
    experiment = client.get_experiment_by_name("honesty-exp")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "toy-run"
    # hyper-parameters: every RepairConfig field, as MLflow keeps them (text)
    for key, value in report["config"].items():
        text = value if isinstance(value, str) else json.dumps(value)
        assert run.data.params[f"config.{key}"] == text, key
    assert run.data.params["method"] == "hcnr"
    assert run.data.params["output"] == str(out.resolve())
    # the report's numbers, exactly
    metrics = run.data.metrics
    for key in ("n_selected_matrices", "n_target_matrices", "changed_params"):
        assert metrics[key] == report[key]
    assert metrics["fraction_target_params_changed"] == pytest.approx(
        report["fraction_target_params_changed"], rel=1e-12
    )
    evaluated = report["metrics"]  # --eval: base, fine-tuned and repaired on the eval set
    for role in ("base", "finetuned", "repaired"):
        for key in ("refusal_f1", "rf_delta", "answer_accuracy", "domain_accuracy"):
            if evaluated[role].get(key) is not None:
                assert metrics[f"eval/{role}/{key}"] == pytest.approx(evaluated[role][key])
    assert metrics["eval/base/refusal_f1"] == pytest.approx(evaluated["base"]["refusal_f1"])
    assert report["stage_seconds"]  # every timed stage, with the report's value
    for stage, seconds in report["stage_seconds"].items():
        assert metrics[f"stage_seconds/{stage}"] == pytest.approx(seconds, rel=1e-9), stage
    # and each progress stage's wall time, logged as it ended
    live = {k.split("/", 1)[1] for k in metrics if k.startswith(f"{LIVE_STAGE}/")}
    assert live == {s for s in report["stage_seconds"] if s != "hessian"}
    # the selected-matrix table
    path = client.download_artifacts(run.info.run_id, "selected_matrices.json", str(out.parent))
    table = json.loads(Path(path).read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    got = [(r["matrix"], r["columns_restored"], r["in_features"], r["fraction"]) for r in rows]
    assert got == _expected_rows(report, out)
    assert all(r["layer"] in (0, 1) and r["kind"] for r in rows)
    # the report file, and the report recording the run
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "hcnr_report.json" in names
    entry = next(e for e in report["tracking"] if e["type"] == "mlflow")
    assert entry["status"] == "ok" and entry["run_id"] == run.info.run_id
    assert tracked["summary"]["tracking"] == report["tracking"]


# --- W&B offline --------------------------------------------------------------------------


def _wandb_records(run_dir: Path) -> list[Any]:
    """The records of an offline run's `.wandb` file: W&B's own protobuf `Record`s in its
    log format (7-byte header; 32 KiB blocks of CRC32, length, type-tagged chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, chunks, block = 7, b"", [], 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # block padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            chunks.append(pending + chunk)
    records = []
    for chunk in chunks:
        record = pb.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


def _wandb_run(run_dir: Path) -> dict[str, Any]:
    config, summary, history, exit_code = {}, {}, [], None
    for record in _wandb_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            name, project = record.run.display_name, record.run.project
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "summary":
            for item in record.summary.update:
                key = item.key or "/".join(item.nested_key)
                summary[key] = json.loads(item.value_json)
        elif kind == "history":
            history.append(
                {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
            )
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return {
        "name": name,
        "project": project,
        "config": config,
        "summary": summary,
        "history": history,
        "exit_code": exit_code,
    }


def test_wandb_offline_run_holds_config_metrics_timings_and_the_table(
    tracked: dict[str, Any],
) -> None:
    report, out = tracked["report"], tracked["out"]
    entry = next(e for e in report["tracking"] if e["type"] == "wandb")
    assert entry["status"] == "ok" and entry.get("url") is None  # offline: no URL
    run_dir = Path(entry["offline_dir"])
    assert run_dir.is_relative_to(tracked["root"]) and entry["run_id"] in run_dir.name
    run = _wandb_run(run_dir)
    assert (run["name"], run["project"], run["exit_code"]) == ("toy-run", "honesty-exp", 0)
    for key, value in report["config"].items():
        assert run["config"][f"config.{key}"] == value, key
    summary = run["summary"]
    for key in ("n_selected_matrices", "n_target_matrices", "changed_params"):
        assert summary[key] == report[key]
    assert summary["fraction_target_params_changed"] == report["fraction_target_params_changed"]
    for stage, seconds in report["stage_seconds"].items():
        assert summary[f"stage_seconds/{stage}"] == seconds, stage
    logged_live = {k for row in run["history"] for k in row if k.startswith(f"{LIVE_STAGE}/")}
    assert logged_live == {f"{LIVE_STAGE}/{s}" for s in report["stage_seconds"] if s != "hessian"}
    # the table: W&B's table file in the run's media
    (table_file,) = (run_dir / "files" / "media" / "table").glob("selected_matrices_*.table.json")
    table = json.loads(table_file.read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    got = [(r["matrix"], r["columns_restored"], r["in_features"], r["fraction"]) for r in rows]
    assert [g[:3] for g in got] == [e[:3] for e in _expected_rows(report, out)]
    assert all(
        math.isclose(g[3], e[3]) for g, e in zip(got, _expected_rows(report, out), strict=True)
    )
    saved = json.loads((run_dir / "files" / "hcnr_report.json").read_text())
    assert saved["selected_matrices"] == report["selected_matrices"]


# --- before/after metrics and plots -------------------------------------------------------


def test_eval_metrics_and_the_before_after_chart_reach_the_tracker(
    tracked: dict[str, Any], toy: dict[str, Path], tmp_path: Path
) -> None:
    """A report with an eval set's before/after metrics (as the service's eval file or the
    CLI's --eval leave it) is logged metric by metric, with the bar chart."""
    from mlflow.tracking import MlflowClient

    from hcnr_core.evaluation import GenerationSettings, evaluate_model, recovery
    from hcnr_core.toy import write_jsonl

    rows = [
        {"prompt": "where was alice born ?", "response": "sorry , i do not know .",
         "answerable": False},
        {"prompt": "what city is bob in ?", "response": "paris .", "answers": ["paris"],
         "answerable": True},
    ]  # fmt: skip
    eval_file = write_jsonl(tmp_path / "eval.jsonl", rows * 2)
    settings = GenerationSettings(max_new_tokens=4)
    models = {
        "base": (toy["base"], None),
        "finetuned": (toy["adapter"], toy["base"]),
        "repaired": (tracked["out"], None),
    }
    metrics = {
        role: evaluate_model(d, [eval_file], base_dir=b, settings=settings)["metrics"]
        for role, (d, b) in models.items()
    }
    f1 = {role: m["refusal_f1"] for role, m in metrics.items()}
    metrics["recovery"] = recovery(f1["repaired"], f1["finetuned"], f1["base"])
    report = {**tracked["report"], "metrics": metrics}

    store = f"sqlite:///{tmp_path / 'eval.db'}"
    with Tracking([Integration(type="mlflow", uri=store)], "eval-run", {"a": 1}) as tracking:
        tracking.log_report(report, tracked["out"], "hcnr_report.json")
    assert tracking.summary[0]["status"] == "ok"
    client = MlflowClient(tracking_uri=store)
    run = client.get_run(tracking.summary[0]["run_id"])
    logged = run.data.metrics
    for role in ("base", "finetuned", "repaired"):
        for key in ("refusal_f1", "rf_delta", "answer_accuracy", "domain_accuracy"):
            value = metrics[role][key]
            if value is None:
                assert f"eval/{role}/{key}" not in logged
            else:
                assert logged[f"eval/{role}/{key}"] == pytest.approx(value), (role, key)
    if metrics["recovery"] is not None:
        assert logged["eval/recovery"] == pytest.approx(metrics["recovery"])
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/honesty_before_after.png"}
    local = client.download_artifacts(
        run.info.run_id, "plots/honesty_before_after.png", str(tmp_path)
    )
    assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mlflow_file_store(tracked: dict[str, Any], tmp_path: Path, monkeypatch) -> None:
    """MLflow's file store (in maintenance mode since 3.x: MLFLOW_ALLOW_FILE_STORE opts in)."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = (tmp_path / "mlruns").as_uri()
    params = {"config": tracked["report"]["config"]}
    with Tracking([Integration(type="mlflow", uri=store, project="files")], "f", params) as t:
        t.log_report(tracked["report"], tracked["out"], "hcnr_report.json")
    run = MlflowClient(tracking_uri=store).get_run(t.summary[0]["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["config.r_iw"] == json.dumps(tracked["report"]["config"]["r_iw"])
    assert run.data.metrics["n_selected_matrices"] == tracked["report"]["n_selected_matrices"]


# --- failures never fail the repair; misconfiguration is refused up front ------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_tracker_does_not_fail_the_repair(
    toy: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    uri = f"http://127.0.0.1:{_closed_port()}"
    args = repair_argv(toy, out, "--track", "mlflow", "--track-uri", uri)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "hcnr_report.json").read_text())
    assert report["n_selected_matrices"] > 0 and any(out.glob("*.safetensors"))
    (entry,) = report["tracking"]
    assert entry["status"] == "failed" and "start" in entry["errors"][0]
    assert "mlflow tracking failed at start" in result.stderr


class _Breaks:
    """A tracker that starts, then fails at `at` (a stand-in for a server that goes away)."""

    def __init__(self, at: str):
        self.at, self.calls = at, []

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            if name == self.at:
                raise ConnectionError("server went away")
            return {} if name == "link" else None

        return call


def test_a_tracker_failing_mid_run_is_dropped_and_the_other_goes_on(
    tracked: dict[str, Any], tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    from hcnr_core.tracking import make_tracker

    broken = _Breaks("log_metrics")
    store = f"sqlite:///{tmp_path / 'ok.db'}"
    integrations = [Integration(type="wandb"), Integration(type="mlflow", uri=store)]
    warned: list[str] = []

    def factory(integration: Integration, workdir: Path | None) -> Any:
        return broken if integration.type == "wandb" else make_tracker(integration, workdir)

    with Tracking(integrations, "run", {}, factory=factory, warn=warned.append) as tracking:
        tracking.log_report(tracked["report"], tracked["out"], "hcnr_report.json")
    assert [e["status"] for e in tracking.summary] == ["failed", "ok"]
    assert "log_metrics" in tracking.summary[0]["errors"][0]
    # dropped after its failure: closed as failed, fed nothing more
    assert broken.calls[broken.calls.index("log_metrics") + 1 :] == ["finish", "link"]
    assert len(warned) == 1 and "server went away" in warned[0]
    run = MlflowClient(tracking_uri=store).get_run(tracking.summary[1]["run_id"])
    assert run.data.metrics["n_selected_matrices"] == tracked["report"]["n_selected_matrices"]


def test_a_failed_repair_closes_the_run_as_failed(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from hcnr_core.errors import RepairCancelled

    store = f"sqlite:///{tmp_path / 'x.db'}"
    for error, status in ((ValueError("boom"), "FAILED"), (RepairCancelled("stop"), "KILLED")):
        with (
            pytest.raises(type(error)),
            Tracking([Integration(type="mlflow", uri=store)], "r") as tracking,
        ):
            raise error
        run = MlflowClient(tracking_uri=store).get_run(tracking.summary[0]["run_id"])
        assert run.info.status == status


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--track-uri", "sqlite:///x.db"], "--track-* options need --track"),
        (["--track", "wandb", "--track-uri", "sqlite:///x.db"], "--track-uri is MLflow's"),
        (["--track", "comet"], "type"),
        (["--track", "mlflow", "--track", "mlflow"], "given twice"),
        (["--track", "wandb", "--track-project", "a/b"], "project"),
        (["--track", "mlflow", "--track-uri", "https://u:secret@mlflow.example"], "credentials"),
    ],
)
def test_misconfigured_tracking_is_refused_before_any_work(
    toy: dict[str, Path], tmp_path: Path, flags: list[str], message: str
) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(app, repair_argv(toy, out, *flags))
    assert result.exit_code == 2, result.output
    assert "invalid_integration" in result.stderr and message in result.stderr
    assert not out.exists()


def test_an_integration_takes_no_credentials() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="takes no credentials"):
        Integration.model_validate({"type": "wandb", "api_key": "x" * 40})
    with pytest.raises(ValidationError, match="not an option of a mlflow"):
        Integration(type="mlflow", entity="team")


def test_a_tracker_not_installed_is_refused_up_front(monkeypatch: pytest.MonkeyPatch) -> None:
    import hcnr_core.tracking as tracking

    monkeypatch.setattr(tracking, "_installed", lambda module: module != "wandb")
    with pytest.raises(TrackingConfigError, match=r"wandb is not installed: pip install"):
        check_integrations([Integration(type="wandb"), Integration(type="mlflow")])
    check_integrations([Integration(type="mlflow")])


def test_flatten_keeps_lists_as_values() -> None:
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": {}}) == {"a.b": 1, "a.c": [1, 2], "d": {}}


def test_eval_metrics_keep_their_roles() -> None:
    """Each model's numbers under its own name (the toy's models can score alike)."""
    from hcnr_core.tracking import report_metrics

    metrics = {
        role: {"refusal_f1": f1, "rf_delta": f1 / 2, "domain_accuracy": None}
        for role, f1 in (("base", 0.9), ("finetuned", 0.4), ("repaired", 0.8))
    }
    got = report_metrics({"metrics": {**metrics, "recovery": 0.8}})
    assert {k: v for k, v in got.items() if k.startswith("eval/")} == {
        "eval/base/refusal_f1": 0.9,
        "eval/base/rf_delta": 0.45,
        "eval/finetuned/refusal_f1": 0.4,
        "eval/finetuned/rf_delta": 0.2,
        "eval/repaired/refusal_f1": 0.8,
        "eval/repaired/rf_delta": 0.4,
        "eval/recovery": 0.8,
    }


def test_auto_logs_its_candidates_and_the_frontier_plot(
    toy: dict[str, Path], tmp_path: Path
) -> None:
    """`--method auto`: the candidates table, the chosen candidate's validation metrics and
    auto's frontier PNG reach the tracker."""
    from mlflow.tracking import MlflowClient

    out, store = tmp_path / "out", f"sqlite:///{tmp_path / 'auto.db'}"
    settings = ["candidates=[{name: paper}]", "max_domain_drop=100", "max_new_tokens=4"]
    settings.append("require_improvement=false")  # the toy never refuses
    flags = ["--method", "auto", "--track", "mlflow", "--track-uri", store]
    flags += [arg for pair in settings for arg in ("--set", pair)]
    result = CliRunner().invoke(app, repair_argv(toy, out, *flags))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "auto_report.json").read_text())
    client = MlflowClient(tracking_uri=store)
    run = client.get_run(report["tracking"][0]["run_id"])
    assert run.info.status == "FINISHED"
    (chosen,) = [c for c in report["candidates"] if c["name"] == report["chosen"]]
    assert run.data.metrics["auto/chosen/refusal_f1"] == pytest.approx(chosen["refusal_f1"])
    ft = report["reference"]["finetuned"]
    assert run.data.metrics["auto/reference/finetuned/refusal_f1"] == pytest.approx(
        ft["refusal_f1"]
    )
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/auto_frontier.png" in plots
    local = client.download_artifacts(run.info.run_id, "auto_candidates.json", str(tmp_path))
    table = json.loads(Path(local).read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [(r["name"], r["status"], r["chosen"]) for r in rows] == [("paper", "ok", True)]
    assert "auto_report.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
