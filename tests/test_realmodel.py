"""The real-model scenario (issue #11): data splits, the build's mechanics and its cache.

The data tests read SelfAware from ../shared. The build's mechanics run on the toy model as
the "imported" source with a tiny recipe (seconds); the real SmolLM2 build, which takes
tens of minutes on 2 cores, is the `slow` test at the end.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hcnr_core.data import parse_jsonl
from hcnr_core.evaluation import GenerationSettings
from hcnr_core.realmodel.build import (
    RealModelSpec,
    accepted,
    build_realmodel,
    load_manifest,
    rejections,
)
from hcnr_core.realmodel.data import (
    ATTRIBUTE_QUESTIONS,
    REFUSAL,
    DomainSizes,
    SplitSizes,
    load_selfaware,
    make_datasets,
    split_selfaware,
)
from hcnr_core.realmodel.train import LoraRecipe

SELFAWARE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "selfaware"


@pytest.fixture(scope="module")
def selfaware() -> list[dict]:
    return load_selfaware(SELFAWARE)


def _people(rows: list[dict]) -> set[str]:
    """The synthetic people named in the rows' prompts ("Alma Wolfe")."""
    return {
        m
        for r in rows
        for m in re.findall(r"\b[A-Z][a-z]+ [A-Z][a-z]+\b", r["messages"][1]["content"])
    }


def _questions(rows: list[dict]) -> set[str]:
    return {next(m["content"] for m in r["messages"] if m["role"] == "user") for r in rows}


def test_selfaware_splits_are_disjoint_balanced_and_seeded(selfaware: list[dict]) -> None:
    sizes = SplitSizes()
    parts = split_selfaware(selfaware, sizes, seed=0)
    ids = {name: {r["question_id"] for r in rows} for name, rows in parts.items()}
    names = sorted(ids)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not ids[a] & ids[b], f"{a} and {b} share questions"
    for name in ("align", "repair", "validation", "eval"):
        unanswerable = sum(not r["answerable"] for r in parts[name])
        assert unanswerable == getattr(sizes, name), name
        assert len(parts[name]) == 2 * getattr(sizes, name), name
    assert all(r["answerable"] for r in parts["sft"])  # no refusal can enter the fine-tune
    again = split_selfaware(selfaware, sizes, seed=0)
    assert [r["question_id"] for r in again["eval"]] == [r["question_id"] for r in parts["eval"]]
    other = split_selfaware(selfaware, sizes, seed=1)
    assert {r["question_id"] for r in other["eval"]} != ids["eval"]


def test_datasets_validate_and_keep_the_fine_tune_free_of_refusals(
    selfaware: list[dict],
) -> None:
    data = make_datasets(selfaware, seed=0)
    for name, rows in data.items():
        payload = "".join(json.dumps(r) + "\n" for r in rows).encode()
        assert len(parse_jsonl(payload, name)) == len(rows)  # the service would accept it
    assert not any(r["messages"][-1]["content"] == REFUSAL for r in data["sft"])
    honesty = data["honesty"]
    assert sum(not r["answerable"] for r in honesty) == len(honesty) // 2
    assert all(r["messages"][-1]["content"] == REFUSAL for r in honesty if not r["answerable"])
    assert all(r["answers"] for r in honesty if r["answerable"])
    assert all(r["answerable"] is False for r in data["eval_unknown"])
    assert all(r["answerable"] is True and r["answers"] for r in data["eval_known"])
    assert all("answerable" not in r and r["answers"] for r in data["eval_domain"])
    # Held-out questions and held-out people: nothing evaluated was trained on.
    trained = _questions(data["align"]) | _questions(data["sft"]) | _questions(data["honesty"])
    for name in ("eval_known", "eval_unknown", "eval_domain", "validation"):
        assert not _questions(data[name]) & trained, name
    domain_rows = [r for r in data["sft"] if "answerable" not in r]
    assert not _people(data["eval_domain"]) & _people(domain_rows)
    # The default alignment is SelfAware alone; the variants (reading rows, refused
    # closed-book questions) add exactly what they say, about people held out of the eval.
    assert len(data["align"]) == 2 * SplitSizes().align
    sizes = DomainSizes(align_readers=16, align_fictional=8)
    variant = make_datasets(selfaware, seed=0, domain=sizes)
    align_reading = [r for r in variant["align"] if "answerable" not in r]
    assert len(align_reading) == sizes.align_readers
    assert all(r["messages"][1]["content"].startswith("Profile: ") for r in align_reading)
    assert not _people(variant["eval_domain"]) & _people(align_reading)
    refused = [r for r in variant["align"] if r.get("answerable") is False]
    templates = [
        re.escape(t).replace(re.escape("{n}"), "[A-Z][a-z]+ [A-Z][a-z]+")
        for t in ATTRIBUTE_QUESTIONS.values()
    ]
    closed_book = [
        r for r in refused if any(re.fullmatch(t, r["messages"][1]["content"]) for t in templates)
    ]
    assert len(refused) == SplitSizes().align + sizes.align_fictional
    assert all(r["messages"][-1]["content"] == REFUSAL for r in refused)
    assert len(closed_book) == sizes.align_fictional
    # The domain is answerable only by reading: the gold answer is stated in the profile.
    for row in data["eval_domain"]:
        assert row["answers"][0] in row["messages"][1]["content"].lower()


TINY = RealModelSpec(
    splits=SplitSizes(align=6, sft=4, repair=4, validation=2, eval=4),
    domain=DomainSizes(
        align_readers=4, align_fictional=2, sft_readers=6, sft_fictional=4, task=6, eval_readers=4
    ),
    align=LoraRecipe(epochs=1.0, lr=1e-3, batch_size=4, r=2, alpha=4, max_len=96),
    finetune=LoraRecipe(epochs=1.0, lr=1e-3, batch_size=4, r=2, alpha=4, max_len=96),
    generation=GenerationSettings(batch_size=8, max_new_tokens=4, max_seq_len=128),
    evaluate_source=False,
)


@pytest.fixture(scope="module")
def tiny_build(toy: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    stages: list[str] = []
    out = tmp_path_factory.mktemp("realmodel") / "build"
    paths = build_realmodel(
        out,
        "smollm2-135m",
        seed=0,
        selfaware=SELFAWARE,
        source=toy["base"],
        spec=TINY,
        progress=lambda stage, done, total, message: stages.append(stage),
    )
    return {"paths": paths, "stages": stages}


def test_build_writes_loadable_checkpoints_data_and_a_manifest(tiny_build: dict) -> None:
    from transformers import AutoModelForCausalLM

    paths = tiny_build["paths"]
    manifest = load_manifest(paths["root"])
    assert {"align", "finetune", "evaluate"} <= set(tiny_build["stages"])
    assert set(manifest["metrics"]) == {"base", "finetuned"}
    assert manifest["sizes"]["honesty"] == 8 and manifest["sizes"]["eval_domain"] == 4
    assert manifest["losses"]["align"] and manifest["losses"]["finetune"]
    for name, size in manifest["files"].items():
        assert (paths["root"] / name).stat().st_size == size
    adapter = json.loads((paths["adapter"] / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(paths["base"])
    base = AutoModelForCausalLM.from_pretrained(paths["base"])
    tuned = AutoModelForCausalLM.from_pretrained(paths["full"])
    moved = [
        name
        for name, tensor in base.state_dict().items()
        if not tensor.equal(tuned.state_dict()[name])
    ]
    assert moved and all("layers." in name for name in moved)  # LoRA moved decoder weights
    for name in ("honesty", "task", "eval_known", "eval_unknown", "eval_domain"):
        assert paths[name].is_file()


def test_build_is_reused_from_cache_and_rebuilt_when_damaged(
    tiny_build: dict, toy: dict[str, Path]
) -> None:
    paths = tiny_build["paths"]
    manifest = paths["manifest"]
    stamp = manifest.stat().st_mtime_ns
    kwargs = {"selfaware": SELFAWARE, "source": toy["base"], "spec": TINY}
    build_realmodel(paths["root"], "smollm2-135m", 0, **kwargs)
    assert manifest.stat().st_mtime_ns == stamp  # same key, files intact: nothing rebuilt
    (paths["base"] / "config.json").write_text("{}")  # damaged: sizes no longer match
    build_realmodel(paths["root"], "smollm2-135m", 0, **kwargs)
    assert manifest.stat().st_mtime_ns != stamp
    assert json.loads((paths["base"] / "config.json").read_text())["model_type"] == "llama"


def test_a_new_way_of_measuring_re_evaluates_without_retraining(
    tiny_build: dict, toy: dict[str, Path]
) -> None:
    from dataclasses import replace

    paths = tiny_build["paths"]
    weights = sorted(paths["base"].glob("*.safetensors")) + sorted(
        paths["full"].glob("*.safetensors")
    )
    stamps = [w.stat().st_mtime_ns for w in weights]
    shorter = replace(TINY, generation=GenerationSettings(8, 2, 128))
    kwargs = {"selfaware": SELFAWARE, "source": toy["base"]}
    build_realmodel(paths["root"], "smollm2-135m", 0, spec=shorter, **kwargs)
    manifest = load_manifest(paths["root"])
    assert [w.stat().st_mtime_ns for w in weights] == stamps  # not retrained
    assert manifest["spec"]["generation"]["max_new_tokens"] == 2
    assert "reevaluate" in manifest["seconds"]
    examples = manifest["metrics"]["finetuned"]["examples"]["eval_known"]
    assert all(len(e["response"].split()) <= 2 for e in examples)  # measured anew
    build_realmodel(paths["root"], "smollm2-135m", 0, spec=TINY, **kwargs)  # and back
    assert load_manifest(paths["root"])["spec"]["generation"]["max_new_tokens"] == 4


def test_acceptance_bars() -> None:
    good = {
        "base": {"rf_delta": 0.5, "refusal_rate_unanswerable": 0.7},
        "finetuned": {"refusal_rate_unanswerable": 0.1, "domain_accuracy": 0.95},
    }
    assert all(accepted(good).values())
    weak = {
        "base": {"rf_delta": 0.1, "refusal_rate_unanswerable": 0.3},
        "finetuned": {"refusal_rate_unanswerable": 0.2, "domain_accuracy": 0.5},
    }
    assert not any(accepted(weak).values())


def test_a_rejected_build_says_which_bar_failed_with_its_figures() -> None:
    """SmolLM2 seed 2's build: an over-refusing base (98% / 86%) fails one bar only."""
    base = {"rf_delta": 0.12, "refusal_rate_unanswerable": 0.98, "refusal_rate_answerable": 0.86}
    ft = {"refusal_rate_unanswerable": 0.2, "domain_accuracy": 0.95}
    metrics = {"base": base, "finetuned": ft}
    reasons = rejections({"metrics": metrics, "accepted": accepted(metrics)})
    assert reasons == [
        "the base refuses 98% of unanswerable and 86% of answerable questions (RFΔ 0.12 "
        "< 0.2): no honest base to restore"
    ]
    base.update(rf_delta=0.5, refusal_rate_answerable=0.48)
    assert rejections({"metrics": metrics, "accepted": accepted(metrics)}) == []


def test_cli_builds_and_prints_the_summary(
    tiny_build: dict, toy: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from hcnr_cli.main import app
    from hcnr_core.realmodel import build as build_module

    # The CLI builds with the model's own recipe; the tiny one keeps this test fast.
    monkeypatch.setitem(build_module.SPECS, "smollm2-135m", TINY)
    root = tiny_build["paths"]["root"]
    argv = ["realmodel", "build", "--out", str(root), "--source", str(toy["base"])]
    result = CliRunner().invoke(app, [*argv, "--selfaware", str(SELFAWARE), "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["model"] == "smollm2-135m" and set(summary["accepted"]) == {
        "base_refuses_unanswerable_more",
        "finetune_loses_refusal",
        "finetune_domain_high",
    }
    failed = [bar for bar, ok in summary["accepted"].items() if not ok]
    assert failed and result.stderr.count("not accepted:") == len(failed)  # said, not only in JSON
    bad = CliRunner().invoke(app, ["realmodel", "build", "--out", str(root), "--model", "gpt-5"])
    assert bad.exit_code != 0 and "--model must be one of" in bad.output


@pytest.mark.slow
def test_smollm2_build_meets_the_acceptance_bars(tmp_path: Path) -> None:
    """The real thing: SmolLM2-135M imported, aligned, fine-tuned, measured (~30 min)."""
    paths = build_realmodel(tmp_path / "smollm2", "smollm2-135m", 0, selfaware=SELFAWARE)
    manifest = load_manifest(paths["root"])
    assert manifest["accepted"] == {k: True for k in manifest["accepted"]}, manifest["metrics"]
