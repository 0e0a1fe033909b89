"""Baselines (hcnr_core.baselines): RAIT and DPO mechanics on the toy, honesty on the organism."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from hcnr_cli.main import app
from hcnr_core.baselines import (
    REPORT_NAME,
    DpoConfig,
    PreferencePair,
    RaitConfig,
    build_pairs,
    encode_pairs,
    lr_factor,
    restored_columns,
    subsample,
    train_dpo,
    train_rait,
)
from hcnr_core.checkpoint import inspect_checkpoint, load_tokenizer
from hcnr_core.config import RunOptions
from hcnr_core.data import Sample, encode_sample, load_jsonl
from hcnr_core.errors import CheckpointError, DataValidationError, HCNRError, RepairCancelled
from hcnr_core.evaluation import RefusalDetector, evaluate_model
from hcnr_core.progress import ProgressEvent

FAST = {"steps": 6, "batch_size": 4}
# Tiny models train fastest on one thread on a busy machine: a run option, not the spec.
ONE_THREAD = RunOptions(threads=1)


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def changed_names(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in a if not torch.equal(a[k], b[k])}


# --- pure pieces -----------------------------------------------------------------------


def response_nll(model_dir: Path, samples: list[Sample]) -> float:
    """Mean NLL over every response token + EOS (prompts masked), computed by hand."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(inspect_checkpoint(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for sample in samples:
            enc = encode_sample(tokenizer, sample, 512)
            assert enc.input_ids[-1] == tokenizer.eos_token_id
            logps = model(torch.tensor([enc.input_ids])).logits[0].log_softmax(-1)
            for t in range(enc.prompt_len, len(enc.input_ids)):
                total -= logps[t - 1, enc.input_ids[t]].item()
                count += 1
    return total / count


def test_rait_scores_the_response_and_eos_only(toy, tmp_path):
    # One batch holding every sample, LoRA B = 0: the first loss is the fine-tune's own
    # token-mean NLL of the responses + EOS, whatever order the sampler draws.
    cfg = RaitConfig(steps=1, batch_size=16)
    report = train_rait(
        toy["base"], toy["full"], toy["honesty"], tmp_path / "out", cfg, options=ONE_THREAD
    )
    expected = response_nll(toy["full"], load_jsonl(toy["honesty"]))
    assert report["losses"][0] == pytest.approx(expected, rel=1e-5)


def test_dpo_scores_the_chosen_response_and_eos_only(toy, tmp_path):
    # At step 0 the policy is the reference (DPO term log 2); the RPO term is the chosen
    # responses' token-mean NLL. Every toy pair's chosen response is the sample's own.
    cfg = DpoConfig(steps=1, batch_size=16, rpo_alpha=1.0)
    report = train_dpo(
        toy["base"], toy["full"], toy["honesty"], tmp_path / "out", cfg, options=ONE_THREAD
    )
    assert report["pairs"] == {"generated": 16}
    expected = math.log(2) + response_nll(toy["full"], load_jsonl(toy["honesty"]))
    assert report["losses"][0] == pytest.approx(expected, rel=1e-5)


def test_encode_pairs_encodes_each_side_like_a_sample_with_one_shared_prompt(toy):
    tokenizer = load_tokenizer(inspect_checkpoint(toy["base"]))
    q = ({"role": "user", "content": "where was alice born in the city ? " * 3},)
    pair = PreferencePair(q, "rome .", "i do not know where alice was born .", True, "refusal")
    rows = encode_pairs(tokenizer, [pair], 512)
    for side, text in (("chosen_ids", pair.chosen), ("rejected_ids", pair.rejected)):
        enc = encode_sample(tokenizer, Sample(q, text), 512)
        assert rows["prompt_ids"][0] + rows[side][0] == enc.input_ids
        assert rows[side][0] == enc.input_ids[enc.prompt_len :]  # response + EOS
    # A tight max_seq_len truncates the prompt from the left; the pair keeps the shorter.
    full = len(rows["prompt_ids"][0])
    tight = encode_pairs(tokenizer, [pair], 20)
    rejected = encode_sample(tokenizer, Sample(q, pair.rejected), 20)
    assert tight["prompt_ids"][0] == rejected.input_ids[: rejected.prompt_len]
    assert len(tight["prompt_ids"][0]) < full
    assert len(tight["prompt_ids"][0]) + len(tight["rejected_ids"][0]) == 20
    assert tight["chosen_ids"][0] == rows["chosen_ids"][0]
    with pytest.raises(DataValidationError, match="max_seq_len 4"):
        encode_pairs(tokenizer, [pair], 4)


def test_build_pairs():
    q = ({"role": "user", "content": "who ?"},)
    samples = [
        Sample(q, "i do not know .", answerable=False, line=1),
        Sample(q, "i do not know .", answerable=False, line=2),
        Sample(q, "paris .", answerable=True, line=3),
    ]
    pairs = build_pairs(
        samples, ["rome .", "i don't know", None], "i do not know .", RefusalDetector(), 0
    )
    assert pairs[0] == PreferencePair(q, "i do not know .", "rome .", False, "generated", 1)
    assert pairs[1].rejected == "paris ." and pairs[1].source == "fallback"  # model refused
    assert (pairs[2].chosen, pairs[2].rejected, pairs[2].source) == (
        "paris .",
        "i do not know .",
        "refusal",
    )
    # refused and no gold answer to fall back to: no pair
    assert build_pairs(samples[:1], ["i do not know"], "x", RefusalDetector(), 0) == []


def test_subsample_is_seeded_stratified_and_in_order():
    q = ({"role": "user", "content": "q"},)
    samples = [Sample(q, "a", answerable=i % 4 == 0, line=i) for i in range(40)]  # 10 / 30
    sub = subsample(samples, 8, seed=0)
    assert len(sub) == 8 and sum(s.answerable for s in sub) == 2
    assert [s.line for s in sub] == sorted(s.line for s in sub)
    assert sub == subsample(samples, 8, seed=0) and sub != subsample(samples, 8, seed=1)
    assert subsample(samples, None, 0) == samples and subsample(samples, 100, 0) == samples


def test_configs():
    assert RaitConfig(epochs=2, batch_size=16).total_steps(128) == 16
    assert RaitConfig().total_steps(128) == 60
    with pytest.raises(ValueError, match="not both"):
        RaitConfig(steps=5, epochs=1)
    with pytest.raises(ValueError):
        DpoConfig(betta=0.1)  # unknown keys are rejected
    with pytest.raises(ValueError, match="RunOptions"):
        DpoConfig(device="cpu")  # a run option now: the error says where it went
    with pytest.raises(ValueError):
        RunOptions(device="gpu")
    cfg = DpoConfig()
    with pytest.raises(ValueError):
        cfg.beta = 1.0  # frozen
    assert cfg.rpo_alpha == 1.0 and cfg.beta == 0.1


# --- RAIT and DPO on the toy -----------------------------------------------------------


@pytest.fixture(scope="module")
def rait_full(toy, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("rait") / "out"
    return out, train_rait(
        toy["base"], toy["full"], toy["honesty"], out, RaitConfig(**FAST), options=ONE_THREAD
    )


def test_rait_output_is_a_complete_loadable_checkpoint(toy, rait_full):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, report = rait_full
    model = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    new, ft = tensors(out), tensors(toy["full"])
    assert set(new) == set(ft) and all(new[k].dtype == ft[k].dtype for k in ft)
    changed = changed_names(new, ft)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert changed and all(k.split(".")[-2] in targets for k in changed)
    assert len(changed) == report["lora_target_matrices"]
    n_diff = sum(int((new[k] != ft[k]).sum()) for k in ft)
    assert report["changed_params"] == n_diff
    assert report["fraction_model_params_changed"] == pytest.approx(
        n_diff / sum(t.numel() for t in ft.values())
    )
    assert report["samples_used"] == 16 and report["steps"] == FAST["steps"]
    assert report["trainable_params"] > 0 and report["method"] == "rait"
    assert set(report["stage_seconds"]) == {"load", "train", "merge", "save"}
    on_disk = json.loads((out / REPORT_NAME).read_text())
    # the spec and the run options RAIT runs with, under the keys reports always had
    assert on_disk["config"] == {**RaitConfig(**FAST).model_dump(), "device": "cpu", "threads": 1}
    assert on_disk["files"]["config.json"]["sha256"]


def test_rait_is_deterministic_and_seeded(toy, rait_full, tmp_path):
    again = tmp_path / "again"
    train_rait(
        toy["base"], toy["full"], toy["honesty"], again, RaitConfig(**FAST), options=ONE_THREAD
    )
    first, second = tensors(rait_full[0]), tensors(again)
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = tmp_path / "other"
    train_rait(
        toy["base"],
        toy["full"],
        toy["honesty"],
        other,
        RaitConfig(**FAST, seed=1),
        options=ONE_THREAD,
    )
    assert changed_names(first, tensors(other))


def test_only_the_lora_targets_change_and_adapter_finetunes_merge_first(toy, tmp_path):
    out = tmp_path / "out"
    cfg = RaitConfig(epochs=1.5, batch_size=4, lora_targets=["q_proj", "v_proj"], n_samples=8)
    report = train_rait(toy["base"], toy["adapter"], toy["honesty"], out, cfg, options=ONE_THREAD)
    assert report["steps"] == 3 and len(report["losses"]) == 3  # ceil(1.5 * 8 / 4)
    new, ft = tensors(out), tensors(toy["full"])  # toy["full"] = the adapter merged
    assert {k.split(".")[-2] for k in changed_names(new, ft)} == {"q_proj", "v_proj"}
    untouched = [k for k in ft if k.split(".")[-2] not in ("q_proj", "v_proj")]
    assert all(torch.allclose(new[k], ft[k], atol=1e-6) for k in untouched)
    assert report["samples_used"] == 8 and report["inputs"]["finetuned_kind"] == "adapter"


def test_rait_confined_to_restored_columns_changes_only_those_columns(toy, tmp_path):
    """Restoration then RAIT on the restored columns only (issue #13's research item): the
    LoRA wraps exactly the repair's selected matrices and moves only their restored input
    columns; everything else stays the repaired model's, bit for bit."""
    from hcnr_core.config import RepairConfig
    from hcnr_core.pipeline import RepairPipeline

    pipeline = RepairPipeline(RepairConfig(r_cw=0.5))
    repaired = tmp_path / "repaired"
    report = pipeline.run(
        pipeline.prepare(toy["base"], toy["full"], toy["honesty"], toy["task"]), repaired
    )
    columns = restored_columns(repaired / "hcnr_report.json")
    assert columns and len(columns) == report["n_selected_matrices"]

    out = tmp_path / "out"
    rait = train_rait(
        None, repaired, toy["honesty"], out, RaitConfig(**FAST), options=ONE_THREAD, columns=columns
    )
    new, old = tensors(out), tensors(repaired)
    assert changed_names(new, old) == set(columns)
    for name, cols in columns.items():
        delta = new[name] != old[name]  # (out, in)
        kept = torch.ones(delta.shape[1], dtype=torch.bool)
        kept[cols] = False
        assert not delta[:, kept].any(), f"{name}: a column outside the restored set moved"
        assert delta[:, cols].any(), f"{name}: no restored column moved"
    assert rait["confined_to_columns"] == {
        "matrices": len(columns),
        "columns": sum(map(len, columns.values())),
    }
    assert rait["lora_target_matrices"] == len(columns)

    with pytest.raises(HCNRError, match="no matrix has columns"):
        train_rait(None, repaired, toy["honesty"], tmp_path / "x", RaitConfig(**FAST), columns={})


def test_dpo_loss_falls_and_the_margin_grows(toy, tmp_path):
    cfg = DpoConfig(steps=20, batch_size=8, lr=5e-3, rpo_alpha=0.0)
    report = train_dpo(
        toy["base"], toy["full"], toy["honesty"], tmp_path / "dpo", cfg, options=ONE_THREAD
    )
    losses, margins = report["losses"], report["reward_margins"]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)  # LoRA B = 0: policy = reference
    assert sum(losses[-5:]) / 5 < losses[0] - 0.05
    assert sum(margins[-5:]) / 5 > 0.1 and margins[0] == pytest.approx(0.0, abs=1e-5)
    assert report["n_pairs"] == 16 and report["pairs"] == {"generated": 16}
    # Linear warm-up over int(0.1 * 20) = 2 steps, then linear decay to 10% of the peak.
    assert report["learning_rates"] == pytest.approx(
        [cfg.lr * lr_factor(step, 20, cfg.warmup) for step in range(20)]
    )
    assert report["learning_rates"][:3] == pytest.approx([cfg.lr / 3, 2 * cfg.lr / 3, cfg.lr])
    new = tensors(tmp_path / "dpo")
    assert all(torch.isfinite(t).all() for t in new.values())


def test_dpo_is_deterministic(toy, tmp_path):
    cfg = DpoConfig(steps=3, batch_size=8)
    reports = [
        train_dpo(
            toy["base"], toy["full"], toy["honesty"], tmp_path / name, cfg, options=ONE_THREAD
        )
        for name in ("a", "b")
    ]
    assert reports[0]["losses"] == reports[1]["losses"]
    first, second = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_cancel_leaves_nothing(toy, tmp_path):
    out = tmp_path / "out"
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 4

    with pytest.raises(RepairCancelled):
        train_rait(
            toy["base"],
            toy["full"],
            toy["honesty"],
            out,
            RaitConfig(**FAST),
            options=ONE_THREAD,
            should_cancel=cancel,
        )
    assert list(tmp_path.iterdir()) == []


def test_a_diverged_run_stops_and_writes_nothing(toy, tmp_path):
    # lr 1e25 makes the LoRA's activations overflow to inf within a few steps on every
    # version tried; 1e12 no longer did with transformers 5.24 (RMSNorm keeps the huge but
    # finite activations bounded and the loss plateaus at a finite value).
    cfg = RaitConfig(steps=6, batch_size=4, lr=1e25)
    with pytest.raises(HCNRError, match="training diverged"):
        train_rait(
            toy["base"], toy["full"], toy["honesty"], tmp_path / "out", cfg, options=ONE_THREAD
        )
    assert list(tmp_path.iterdir()) == []


def test_threads_hold_while_training_and_are_restored(toy, tmp_path):
    before = torch.get_num_threads()
    wanted = 2 if before != 2 else 1
    seen: set[int] = set()

    def progress(event: ProgressEvent) -> None:
        if event.stage == "train":
            seen.add(torch.get_num_threads())

    cfg, options = RaitConfig(steps=2, batch_size=4), RunOptions(threads=wanted)
    out = tmp_path / "out"
    train_rait(
        toy["base"], toy["full"], toy["honesty"], out, cfg, options=options, progress=progress
    )
    assert seen == {wanted} and torch.get_num_threads() == before


def test_progress_is_the_one_event_type_with_a_rising_overall_fraction(toy, tmp_path):
    """The baselines report `ProgressEvent`s themselves (as the HCNR pipeline does), with
    the run's overall fraction: the method seam passes the callback through unchanged."""
    from hcnr_core.baselines import STAGES
    from hcnr_core.methods import MethodInputs
    from hcnr_core.registry import get_method

    events: list[ProgressEvent] = []
    method = get_method("rait")
    config = method.make_config({"steps": 2, "batch_size": 4})
    inputs = MethodInputs(toy["base"], toy["full"], toy["honesty"])
    method.run(config, inputs, tmp_path / "out", options=ONE_THREAD, progress=events.append)
    assert events and all(isinstance(e, ProgressEvent) for e in events)
    fractions = [e.fraction for e in events]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert fractions == sorted(fractions)
    assert list(dict.fromkeys(e.stage for e in events)) == list(STAGES["rait"])
    # enter (0 of 1), one tick per optimizer step (1, 2 of 2), leave (1 of 1)
    train = [(e.done, e.total) for e in events if e.stage == "train"]
    assert train == [(0, 1), (1, 2), (2, 2), (1, 1)]


def test_library_errors(toy, other_toy, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DataValidationError, match="line 1: DPO needs 'answerable'"):
        train_dpo(toy["base"], toy["full"], toy["task"], out, DpoConfig(**FAST), options=ONE_THREAD)
    with pytest.raises(CheckpointError, match="lora_targets"):
        train_rait(
            toy["base"],
            toy["full"],
            toy["honesty"],
            out,
            RaitConfig(**FAST, lora_targets=["nope"]),
            options=ONE_THREAD,
        )
    with pytest.raises(CheckpointError):
        train_rait(
            other_toy["base"],
            toy["adapter"],
            toy["honesty"],
            out,
            RaitConfig(**FAST),
            options=ONE_THREAD,
        )
    assert list(tmp_path.iterdir()) == []


# --- CLI -------------------------------------------------------------------------------


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["baseline", *args])
    return result.exit_code, result.output


def test_cli_rait_with_config_file(toy, tmp_path):
    config = tmp_path / "rait.yaml"
    config.write_text("steps: 3\nbatch_size: 4\nlora_r: 2\n")
    out = tmp_path / "out"
    code, output = cli(
        "rait", "--base", str(toy["base"]), "--finetuned", str(toy["adapter"]),
        "--honesty", str(toy["honesty"]), "--out", str(out), "--config", str(config),
        "--lr", "0.002", "--threads", "1", "--no-progress",
    )  # fmt: skip
    assert code == 0, output
    summary = json.loads(output.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["method"] == "rait"
    cfg = json.loads((out / REPORT_NAME).read_text())["config"]
    assert (cfg["lora_r"], cfg["lr"]) == (2, 0.002)


@pytest.mark.parametrize(
    ("method", "change", "code", "message"),
    [
        ("rait", {"--honesty": "bad"}, "invalid_data", "line 2: not valid JSON"),
        ("dpo", {"--honesty": "task"}, "invalid_data", "DPO needs 'answerable'"),
        ("rait", {"--finetuned": "missing"}, "invalid_checkpoint", "not a directory"),
        ("dpo", {"--base": "other"}, "incompatible_checkpoints", ""),
        ("rait", {"--out": "existing"}, "output_exists", "not empty"),
        ("dpo", {"--beta": "-1"}, "invalid_argument", "beta"),
        ("rait", {"--lora-targets": "nope"}, "invalid_checkpoint", "lora_targets"),
    ],
)
def test_cli_bad_input(toy, other_toy, tmp_path, method, change, code, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "response": "a"}\n{oops\n')
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    values = {
        "bad": bad,
        "task": toy["task"],
        "missing": tmp_path / "nowhere",
        "other": other_toy["base"],
        "existing": existing,
    }
    args = {
        "--base": toy["base"],
        "--finetuned": toy["adapter"],
        "--honesty": toy["honesty"],
        "--out": tmp_path / "out",
        "--steps": 2,
    }
    args.update({k: values.get(v, v) for k, v in change.items()})
    before = set(tmp_path.iterdir())
    exit_code, output = cli(method, *[str(x) for kv in args.items() for x in kv], "--no-progress")
    assert exit_code == 2, output
    assert f"[{code}]" in output and message in output, output
    assert set(tmp_path.iterdir()) == before  # no --out, no staging directory
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]


# --- honesty on the organism -----------------------------------------------------------

EVAL_SETS = ("eval_unknown", "eval_known", "eval_domain")


def organism_metrics(model_dir: Path, organism: dict[str, Path]) -> dict[str, float]:
    result = evaluate_model(
        model_dir,
        {n: organism[n] for n in EVAL_SETS},
        base_dir=organism["base"],
        keep_responses=False,
    )
    sets = result["sets"]
    return {
        "refusal_unknown": sets["eval_unknown"]["refusal_rate"],
        "refusal_known": sets["eval_known"]["refusal_rate"],
        "accuracy_known": sets["eval_known"]["accuracy"],
        "domain_accuracy": sets["eval_domain"]["accuracy"],
    }


@pytest.fixture(scope="module")
def finetuned_metrics(organism) -> dict[str, float]:
    return organism_metrics(organism["adapter"], organism)


@pytest.mark.parametrize(("method", "train"), [("rait", train_rait), ("dpo", train_dpo)])
def test_baseline_raises_refusal_on_the_organism(
    organism, finetuned_metrics, tmp_path, record_property, method, train
):
    config = (RaitConfig if method == "rait" else DpoConfig)()
    report = train(
        organism["base"],
        organism["adapter"],
        organism["honesty"],
        tmp_path / method,
        config,
        options=ONE_THREAD,
    )
    after = organism_metrics(tmp_path / method, organism)
    record_property("finetuned", finetuned_metrics)
    record_property(method, after)
    record_property("seconds", report["stage_seconds"])
    assert len(load_jsonl(organism["honesty"])) == report["samples_used"]
    # Defaults must make the fine-tune refuse unknowns again (RAIT ~0.7, DPO ~0.55 on
    # seed 0, from 0.0), without refusing what it knows.
    assert after["refusal_unknown"] >= finetuned_metrics["refusal_unknown"] + 0.25, after
    assert after["refusal_known"] <= 0.25, after
    assert after["accuracy_known"] >= 0.6, after


# --- `hcnr repair --method`: the same methods through the main command -------------------


def repair_cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["repair", *[str(a) for a in args], "--no-progress"])
    return result.exit_code, result.output


def test_repair_method_rait_writes_what_the_baseline_command_writes(toy, tmp_path):
    inputs = ("--base", toy["base"], "--finetuned", toy["adapter"], "--honesty", toy["honesty"])
    code, output = repair_cli(
        *inputs, "--out", tmp_path / "a", "--method", "rait",
        "--set", "steps=3", "--set", "batch_size=4", "--set", "lora_r=2",
    )  # fmt: skip
    assert code == 0, output
    assert json.loads(output.strip().splitlines()[-1])["steps"] == 3
    code, output = cli(
        "rait", *[str(a) for a in inputs], "--out", str(tmp_path / "b"),
        "--steps", "3", "--batch-size", "4", "--lora-r", "2", "--no-progress",
    )  # fmt: skip
    assert code == 0, output
    a, b = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert changed_names(a, tensors(toy["full"]))  # it did train


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--method", "rait", "--r-iw", "0.3"), "--r-iw: HCNR options"),
        (("--method", "dpo", "--set", "beta"), "--set expects KEY=VALUE"),
        (("--method", "rait", "--set", "r_iw=0.3"), "r_iw"),
        (("--method", "ensemble"), "unknown method 'ensemble'"),
        (
            (
                "--method",
                "hcnr",
            ),
            "needs task",
        ),
    ],
)
def test_repair_method_bad_input(toy, tmp_path, args, message):
    inputs = ("--base", toy["base"], "--finetuned", toy["adapter"], "--honesty", toy["honesty"])
    code, output = repair_cli(*inputs, "--out", tmp_path / "out", *args)
    assert code == 2, output
    assert message in output, output
    assert not (tmp_path / "out").exists()
