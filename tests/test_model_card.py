"""The Hub model card every method writes (`hcnr_core.card`, issue 17), on the library and
CLI paths: `hcnr repair` (HCNR) and `hcnr baseline rait`, with and without `--eval`.

The card is a huggingface_hub `ModelCard`: base_model, tags, the method and its
hyper-parameters (the report's config), and with `--eval` a model-index whose values are
the report's before/after metrics. It holds no timestamp or run id, so two runs on the
same inputs publish the same card bytes; and its sha256 in the report stays true after
`--eval` rewrites it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hcnr_cli.main import app
from hcnr_core.card import METRICS, CardInputs, hub_model_id, render_card
from hcnr_core.config import RunOptions
from hcnr_core.writer import sha256_file
from tests.toy_cli import repair_argv


def run_cli(argv: list[str]) -> dict:
    result = CliRunner().invoke(app, [str(a) for a in argv])
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def eval_file(toy: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy's honesty rows (answerable or not) and its task rows with their answers."""
    tasks = [json.loads(line) for line in toy["task"].read_text().splitlines()]
    rows = [
        *(json.loads(line) for line in toy["honesty"].read_text().splitlines()),
        *({**t, "answers": [t["response"].rstrip(" .")]} for t in tasks),
    ]
    path = tmp_path_factory.mktemp("card-eval") / "toy-eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read(out: Path, report_name: str) -> tuple[object, str, dict]:
    from huggingface_hub import ModelCard

    text = (out / "README.md").read_text(encoding="utf-8")
    return ModelCard(text), text, json.loads((out / report_name).read_text())


def expected_model_index(metrics: dict) -> dict[str, float]:
    expected = {}
    for role, suffix in (("repaired", ""), ("finetuned", "_finetuned"), ("base", "_base")):
        for key, _ in METRICS:
            if metrics[role].get(key) is not None:
                expected[key + suffix] = round(metrics[role][key], 6)
    if metrics.get("recovery") is not None:
        expected["refusal_f1_recovery"] = round(metrics["recovery"], 6)
    return expected


def assert_card_of(card, text: str, report: dict, method: str, out: Path) -> None:
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert {"hcnr", "honesty", "model-repair", method} <= set(data.tags)
    assert data.base_model is None  # local directories are no Hub ids
    assert data.hcnr["method"] == method
    # The config less the run options, which change where, not what, is computed.
    assert data.hcnr["hyperparameters"] == {
        k: v for k, v in report["config"].items() if k not in RunOptions.model_fields
    }
    assert not set(RunOptions.model_fields) & set(data.hcnr["hyperparameters"])
    assert "device" in report["config"]  # the report still records how it ran
    # A local directory by its name: a card pushed to the Hub publishes no local paths.
    finetuned = Path(report["inputs"]["finetuned"])
    assert finetuned.is_absolute() and data.hcnr["finetuned"] == finetuned.name
    for given in (report["inputs"]["finetuned"], report["inputs"].get("base")):
        assert given is None or str(Path(given).parent) not in text
    assert data.hcnr["hcnr_version"] == report["hcnr_version"]
    # Nothing that differs between two runs on the same inputs.
    assert report["created_at"] not in text and str(out) not in text
    assert "job" not in text.lower()
    # The report's digest of the card is the card on disk.
    assert report["files"]["README.md"]["sha256"] == sha256_file(out / "README.md")


@pytest.fixture(scope="module")
def hcnr_cli_runs(toy, eval_file, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("card-hcnr")
    outs = {"a": root / "a", "b": root / "b", "layerwise": root / "lw", "eval": root / "eval"}
    run_cli(repair_argv(toy, outs["a"], "--r-iw", "0.3"))
    run_cli(repair_argv(toy, outs["b"], "--r-iw", "0.3"))
    run_cli(repair_argv(toy, outs["layerwise"], "--r-iw", "0.3", "--layerwise"))
    summary = run_cli(repair_argv(toy, outs["eval"], "--r-iw", "0.3", "--eval", str(eval_file)))
    assert set(summary["refusal_f1"]) == {"base", "finetuned", "repaired"}
    return outs


def test_hcnr_cli_card_is_a_hub_card_of_the_report(hcnr_cli_runs) -> None:
    card, text, report = read(hcnr_cli_runs["a"], "hcnr_report.json")
    assert_card_of(card, text, report, "hcnr", hcnr_cli_runs["a"])
    assert report["config"]["r_iw"] == 0.3
    assert card.data.eval_results is None  # no --eval: no model-index
    assert f"Matrices restored: {report['n_selected_matrices']} of" in text


def test_hcnr_cards_of_two_runs_on_the_same_inputs_are_the_same_bytes(hcnr_cli_runs) -> None:
    a, b = (hcnr_cli_runs[k] / "README.md" for k in ("a", "b"))
    assert a.read_bytes() == b.read_bytes()
    # Layer by layer is a run option: same weights (bench/results/repair_digests.txt), and
    # so the same card, though the reports' configs differ.
    layerwise = hcnr_cli_runs["layerwise"]
    assert (layerwise / "README.md").read_bytes() == a.read_bytes()
    assert json.loads((layerwise / "hcnr_report.json").read_text())["config"]["layerwise"]
    reports = [json.loads((hcnr_cli_runs[k] / "hcnr_report.json").read_text()) for k in "ab"]
    assert reports[0]["files"]["README.md"] == reports[1]["files"]["README.md"]


def test_hcnr_cli_eval_puts_the_reports_metrics_in_the_model_index(hcnr_cli_runs) -> None:
    out = hcnr_cli_runs["eval"]
    card, text, report = read(out, "hcnr_report.json")
    assert_card_of(card, text, report, "hcnr", out)
    metrics = report["metrics"]  # written into the report on disk by --eval
    assert set(metrics) == {"base", "finetuned", "repaired", "recovery"}
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == expected_model_index(metrics)
    assert "domain_accuracy_base" in results  # the eval set has domain rows
    assert {r.dataset_name for r in card.data.eval_results} == {"toy-eval.jsonl"}
    assert "## Honesty before and after" in text
    # Only the card and the report change: the weights are those of the run without --eval.
    plain = json.loads((hcnr_cli_runs["a"] / "hcnr_report.json").read_text())
    weights = {k: v for k, v in report["files"].items() if k.endswith(".safetensors")}
    assert weights == {k: v for k, v in plain["files"].items() if k.endswith(".safetensors")}


def test_rait_cli_card_with_eval(toy, eval_file, tmp_path) -> None:
    out = tmp_path / "rait"
    argv = ["baseline", "rait", "--base", toy["base"], "--finetuned", toy["adapter"]]
    argv += ["--honesty", toy["honesty"], "--out", out, "--steps", "3", "--batch-size", "4"]
    argv += ["--lora-r", "2", "--threads", "1", "--no-progress", "--eval", eval_file]
    summary = run_cli(argv)
    card, text, report = read(out, "baseline_report.json")
    assert_card_of(card, text, report, "rait", out)
    assert report["config"]["steps"] == 3 and report["config"]["lora_r"] == 2
    assert f"A LoRA ({report['trainable_params']} parameters) trained for 3 steps" in text
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == expected_model_index(report["metrics"])
    assert summary["refusal_f1"]["repaired"] == report["metrics"]["repaired"]["refusal_f1"]
    # The same inputs render the same card (the report's timings and date are not in it).
    again = dict(report, created_at="2000-01-01T00:00:00Z", stage_seconds={})
    inputs = CardInputs.of_report("rait", report)
    assert render_card(inputs, again, "toy-eval.jsonl") == text


def test_hub_model_id() -> None:
    assert hub_model_id("hf:org/name@main") == "org/name"
    assert hub_model_id("hf:org/name") == "org/name"
    assert hub_model_id("path:models/x") is None
    assert hub_model_id("/abs/dir") is None
    assert hub_model_id(None) is None


def test_an_auto_checkpoint_carries_the_auto_card(toy, tmp_path) -> None:
    """auto publishes the chosen candidate's checkpoint with a card of its own (method
    auto, which candidate and why); the candidate's report records that card's digest."""
    from hcnr_core.methods import MethodInputs
    from hcnr_core.registry import get_method

    method = get_method("auto")
    config = method.make_config(
        {
            "candidates": [{"name": "paper", "method": "hcnr"}],
            "max_domain_drop": 100.0,
            "require_improvement": False,  # the toy never refuses
            "max_new_tokens": 4,
        }
    )
    out = tmp_path / "out"
    inputs = MethodInputs(toy["base"], toy["adapter"], toy["honesty"], toy["task"])
    report = method.run(config, inputs, out)
    card, text, on_disk = read(out, "auto_report.json")
    assert card.data.hcnr["method"] == "auto" and "auto" in card.data.tags
    assert card.data.hcnr["hyperparameters"] == {
        k: v for k, v in report["config"].items() if k not in RunOptions.model_fields
    }
    assert card.data.hcnr["finetuned"] == str(toy["adapter"])
    assert f"`auto` chose **{report['chosen']}**" in text
    refit = report["refit"]  # on by default: the card says the weights are the refit's
    assert f"Published: {refit['candidate']} repaired again from every sample" in text
    assert f"({refit['honesty']} honesty + {refit['task']} task rows" in text
    digest = sha256_file(out / "README.md")
    inner = json.loads((out / "hcnr_report.json").read_text())
    assert inner["files"]["README.md"]["sha256"] == digest
    assert on_disk["files"]["README.md"]["sha256"] == digest
    assert on_disk["files"]["hcnr_report.json"]["sha256"] == sha256_file(out / "hcnr_report.json")
