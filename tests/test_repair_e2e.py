"""End to end: tiny Llama base + LoRA adapter (or merged) -> repaired checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from hcnr_cli.main import app
from hcnr_core import RepairConfig
from hcnr_core.checkpoint import inspect_checkpoint
from hcnr_core.config import RunOptions, split_run_options
from hcnr_core.errors import RepairCancelled
from hcnr_core.pipeline import STAGES, TIMED_STAGES, RepairPipeline
from hcnr_core.writer import sha256_file
from tests.toy_cli import repair_argv


def repair(toy, out: Path, finetuned: str = "adapter", **values) -> dict:
    cfg, options = split_run_options(values)
    pipeline = RepairPipeline(RepairConfig(**cfg), RunOptions(**options))
    prepared = pipeline.prepare(toy["base"], toy[finetuned], toy["honesty"], toy["task"])
    return pipeline.run(prepared, out)


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def finetuned_tensors(toy, kind: str) -> dict[str, torch.Tensor]:
    """W_s: the toy's merged checkpoint is `merge_and_unload` of the adapter, so it is the
    reference for both kinds (the adapter path merges again, independently)."""
    assert kind in ("adapter", "full")
    return tensors(toy["full"])


@pytest.mark.parametrize("kind", ["adapter", "full"])
@pytest.mark.parametrize("compensation", ["paper", "exact", "task_aware", "none"])
def test_repair_end_to_end(toy, tmp_path, kind, compensation):
    out = tmp_path / "repaired"
    report = repair(toy, out, kind, compensation=compensation)

    model = AutoModelForCausalLM.from_pretrained(out)  # loads like any HF checkpoint
    assert all(torch.isfinite(p).all() for p in model.parameters())

    got, base, ft = tensors(out), tensors(toy["base"]), finetuned_tensors(toy, kind)
    assert set(got) == set(ft)  # every tensor present, nothing extra
    selected = {m["name"]: m["columns"] for m in report["selected_matrices"]}
    assert len(selected) == report["n_selected_matrices"] > 0
    for name, tensor in got.items():
        if name not in selected:
            assert torch.equal(tensor, ft[name]), f"{name} changed but was not reported"
            continue
        cols = torch.tensor(selected[name])
        others = torch.ones(tensor.shape[1], dtype=torch.bool)
        others[cols] = False
        assert torch.equal(tensor[:, others], ft[name][:, others]), name
        if compensation == "none":
            assert torch.equal(tensor[:, cols], base[name][:, cols])
        else:
            assert not torch.equal(tensor[:, cols], ft[name][:, cols])

    on_disk = json.loads((out / "hcnr_report.json").read_text())
    assert on_disk["selected_matrices"] == report["selected_matrices"]
    assert on_disk["config"]["compensation"] == compensation
    skipped = set() if compensation == "task_aware" else {"task_hessians"}
    assert set(on_disk["stage_seconds"]) == set(TIMED_STAGES) - skipped
    # Counts by hand from the tensors: targets are every linear of the blocks (7 a layer).
    targets = [n for n in ft if ".layers." in n and n.endswith("_proj.weight")]
    assert len(targets) == on_disk["n_target_matrices"] == 7 * 2
    target_params = sum(ft[n].numel() for n in targets)
    changed = sum(int((got[n] != ft[n]).sum()) for n in got)
    restored = sum(ft[n].shape[0] * len(cols) for n, cols in selected.items())
    all_params = sum(t.numel() for t in ft.values())
    assert on_disk["target_params"] == target_params
    assert on_disk["changed_params"] == changed > 0
    assert on_disk["restored_params"] == restored
    assert on_disk["fraction_target_params_changed"] == pytest.approx(changed / target_params)
    assert on_disk["fraction_target_params_restored"] == pytest.approx(restored / target_params)
    assert on_disk["fraction_model_params_changed"] == pytest.approx(changed / all_params)
    assert {"torch", "transformers", "peft", "hcnr"} <= set(on_disk["versions"])
    listed = on_disk["files"]
    assert set(listed) == {p.name for p in out.iterdir()} - {"hcnr_report.json"}
    for name, entry in listed.items():
        assert sha256_file(out / name) == entry["sha256"]
    assert (out / "model.safetensors.index.json").is_file()
    assert "HCNR" in (out / "README.md").read_text()
    assert inspect_checkpoint(out).kind == "full"  # our own output passes our own checks


def test_adapter_and_merged_give_the_same_repair(toy, tmp_path):
    a = repair(toy, tmp_path / "a", "adapter")
    b = repair(toy, tmp_path / "b", "full")
    assert a["selected_matrices"] == b["selected_matrices"]
    ta, tb = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    for name in ta:
        torch.testing.assert_close(ta[name], tb[name], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def wide_toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A toy wide enough that one input Hessian is a sizeable part of a 1-2 MiB budget:
    hidden 384 (q/v/up inputs: 384² x 4 B = 576 KiB each), MLP 768 (down: 2.25 MiB)."""
    from hcnr_core.toy import build_toy

    return build_toy(tmp_path_factory.mktemp("wide-toy"), seed=3, hidden=384)


@pytest.mark.parametrize("compensation", ["paper", "task_aware"])
def test_hessian_budget_changes_passes_not_results(wide_toy, tmp_path, monkeypatch, compensation):
    """The budget splits the kept matrices into chunks, one forward pass over D_hon each
    (and over D_task for task-aware), and changes nothing in the output. Passes are seen
    through public seams: the InputHessians built (one per pass, with its modules) and the
    model's forward calls counted by a global hook."""
    from transformers import LlamaForCausalLM

    from hcnr_core.scoring import InputHessians

    built: list[list[str]] = []
    init = InputHessians.__init__

    def recording(self, model, target_modules):
        built.append([m.split(".")[2] + "." + m.split(".")[-1] for m in target_modules])
        init(self, model, target_modules)

    monkeypatch.setattr(InputHessians, "__init__", recording)
    import hcnr_core.compensation as compensation_module

    inversions = [0]
    inverse = compensation_module.inverse_hessian

    def counted(hessian):
        inversions[0] += 1
        return inverse(hessian)

    monkeypatch.setattr(compensation_module, "inverse_hessian", counted)
    forwards = [0]

    def count(module, _args):
        if isinstance(module, LlamaForCausalLM):
            forwards[0] += 1

    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    runs = {}
    try:
        for name, budget in (("one", 4096), ("four", 2), ("eight", 1)):
            built.clear()
            forwards[0] = inversions[0] = 0
            repair(
                wide_toy, tmp_path / name, compensation=compensation, r_cw=1.0,
                hessian_budget_mb=budget,
            )  # fmt: skip
            runs[name] = ([list(c) for c in built], forwards[0], inversions[0])
    finally:
        handle.remove()
    # R_CW = 1 keeps every matrix the adapter moved: per layer q, v, up (576 KiB each),
    # down (2.25 MiB, alone over any budget below it), in model order.
    kept = [f"{layer}.{m}" for layer in "01" for m in ("q_proj", "v_proj", "up_proj", "down_proj")]
    by_budget = {
        "one": [kept],
        "four": [kept[0:3], kept[3:4], kept[4:7], kept[7:8]],  # 3 x 576 KiB fit in 2 MiB
        "eight": [[m] for m in kept],  # 2 x 576 KiB > 1 MiB: a pass per matrix
    }
    sets = 2 if compensation == "task_aware" else 1  # D_hon, and D_task for H_task
    n_batches = 2  # 16 samples of each set, batch size 8
    for name, expected in by_budget.items():
        chunks, n_forwards, n_inversions = runs[name]
        if compensation == "paper":  # H⁻¹ once per shared input of a chunk: q and v share
            # theirs when they are in one chunk (6 inversions), not when each has its own (8)
            assert n_inversions == (8 if name == "eight" else 6), (name, n_inversions)
        assert chunks[-len(expected) :] == expected, (name, chunks)  # H of D_hon, last
        if sets == 2:  # H_task, first: the kept matrices in the order selection kept them,
            # so the chunks hold other neighbours, but as many passes and each matrix once
            task = chunks[: -len(expected)]
            assert len(task) == len(expected) and sorted(m for c in task for m in c) == sorted(
                kept
            ), task
        assert len(chunks) == len(expected) * sets, (name, chunks)
        # Each extra chunk is one more forward over each set's batches; the rest (Fisher
        # passes) is the same for every budget.
        extra = (len(expected) - 1) * sets * n_batches
        assert n_forwards - runs["one"][1] == extra, (name, n_forwards)
    one = tensors(tmp_path / "one")
    for name in ("four", "eight"):
        other = tensors(tmp_path / name)
        assert set(other) == set(one) and all(torch.equal(one[n], other[n]) for n in one), name
    report = json.loads((tmp_path / "eight" / "hcnr_report.json").read_text())
    assert len(report["selected_matrices"]) == len(kept)


@pytest.mark.parametrize("layerwise", [False, True])
def test_shared_hessian_inverted_once_per_group(toy, tmp_path, monkeypatch, layerwise):
    """Paper mode inverts each shared-input group's H once (q/k/v, gate/up). That this
    gives the same bits as inverting it for every matrix is shown on the wide toy, where
    a 1 MiB Hessian budget puts each matrix in a pass of its own (one inversion each) and
    the output equals the shared one (test_hessian_budget_changes_passes_not_results)."""
    import hcnr_core.compensation as compensation

    calls: list[int] = []
    inverse = compensation.inverse_hessian

    def counted(hessian):
        calls.append(hessian.shape[0])
        return inverse(hessian)

    monkeypatch.setattr(compensation, "inverse_hessian", counted)
    # R_CW = 1: every matrix the adapter moved (q, v, up, down) is kept.
    shared = repair(toy, tmp_path / "shared", layerwise=layerwise, r_cw=1.0)
    names = [m["name"] for m in shared["selected_matrices"]]
    inputs = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "up_proj": "mlp"}
    inputs["gate_proj"] = "mlp"
    groups = {(n.split(".")[2], inputs.get(n.split(".")[-2], n)) for n in names}
    assert len(names) == 8  # 2 layers x {q, v, up, down}
    assert len(calls) == len(groups) == 6  # per group: 2 layers x {q+v, up, down}
    hidden, mlp = 32, 64  # the toy's widths: attention and up read 32, down reads 64
    assert sorted(calls) == sorted([hidden] * 4 + [mlp] * 2)


def test_same_seed_gives_identical_output(toy, tmp_path):
    for run in ("one", "two"):
        repair(toy, tmp_path / run, seed=7, selection="random")
    for shard in (tmp_path / "one").glob("*.safetensors"):
        assert sha256_file(shard) == sha256_file(tmp_path / "two" / shard.name)
    other = repair(toy, tmp_path / "three", seed=8, selection="random")
    first = json.loads((tmp_path / "one" / "hcnr_report.json").read_text())
    assert other["selected_matrices"] != first["selected_matrices"]


@pytest.mark.parametrize("kind", ["adapter", "full"])
def test_rcw_zero_returns_finetuned_bit_for_bit(toy, tmp_path, kind):
    report = repair(toy, tmp_path / "out", kind, r_cw=0.0)
    assert report["n_selected_matrices"] == 0 and report["changed_params"] == 0
    got, ft = tensors(tmp_path / "out"), finetuned_tensors(toy, kind)
    assert set(got) == set(ft)
    assert all(torch.equal(got[n], ft[n]) for n in ft)


def test_full_restoration_without_compensation_gives_base(toy, tmp_path):
    repair(toy, tmp_path / "out", "full", r_iw=1.0, r_cw=1.0, compensation="none")
    got, base, ft = tensors(tmp_path / "out"), tensors(toy["base"]), tensors(toy["full"])
    moved = [n for n in ft if not torch.equal(ft[n], base[n])]
    assert moved  # the toy fine-tune did move weights
    for name in moved:
        assert torch.equal(got[name], base[name]), name


@pytest.mark.parametrize("stage", list(STAGES))
def test_cancellation_in_any_stage_leaves_nothing(toy, tmp_path, stage):
    started: list[str] = []  # stages as the public progress events announce them

    def cancel_in_stage() -> bool:
        return bool(started) and started[-1] == stage  # past the start of the stage

    # the task Hessians exist only for compensation="task_aware"
    cfg = RepairConfig(compensation="task_aware" if stage == "task_hessians" else "paper")
    pipeline = RepairPipeline(
        cfg, progress=lambda e: started.append(e.stage), should_cancel=cancel_in_stage
    )
    prepared = pipeline.prepare(toy["base"], toy["adapter"], toy["honesty"], toy["task"])
    with pytest.raises(RepairCancelled, match=stage):
        pipeline.run(prepared, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # no output, no staging directory


@pytest.mark.parametrize("compensation", ["paper", "task_aware"])
def test_progress_is_monotonic_and_complete(toy, tmp_path, compensation):
    events = []
    pipeline = RepairPipeline(RepairConfig(compensation=compensation), progress=events.append)
    pipeline.run(
        pipeline.prepare(toy["base"], toy["adapter"], toy["honesty"], toy["task"]),
        tmp_path / "out",
    )
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions)
    assert fractions[-1] == pytest.approx(1.0)
    expected = [s for s in STAGES if compensation == "task_aware" or s != "task_hessians"]
    assert [s for s in STAGES if any(e.stage == s for e in events)] == expected


def test_cli_repair(toy, tmp_path):
    out = tmp_path / "cli-out"
    config = tmp_path / "cfg.yaml"
    config.write_text("r_iw: 0.25\ncompensation: exact\n")
    argv = repair_argv(toy, out, "--config", str(config), "--r-cw", "0.5")
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    report = json.loads((out / "hcnr_report.json").read_text())
    assert report["config"]["r_iw"] == 0.25 and report["config"]["r_cw"] == 0.5
    assert report["config"]["compensation"] == "exact"
    assert summary["selected_matrices"] == report["n_selected_matrices"] == 7  # round(.5*14)
    width = {m["name"]: m["n_columns"] for m in report["selected_matrices"]}
    assert all(n in (8, 16) for n in width.values())  # round(.25*32), round(.25*64)


def test_bfloat16_compute_keeps_the_stored_dtype(toy, tmp_path):
    bf16 = repair(toy, tmp_path / "bf16", dtype="bfloat16")
    fp32 = repair(toy, tmp_path / "fp32", dtype="float32")
    got, ft = tensors(tmp_path / "bf16"), finetuned_tensors(toy, "adapter")
    assert all(got[n].dtype == ft[n].dtype == torch.float32 for n in ft)
    selected = {m["name"] for m in bf16["selected_matrices"]}
    assert all(torch.equal(got[n], ft[n]) for n in ft if n not in selected)
    # bf16 scores perturb the ranking a little, not wholesale.
    overlap = selected & {m["name"] for m in fp32["selected_matrices"]}
    assert len(overlap) >= len(selected) // 2


@pytest.mark.gpu
def test_cuda_matches_cpu(toy, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cpu = repair(toy, tmp_path / "cpu", device="cpu", compensation="exact")
    gpu = repair(toy, tmp_path / "gpu", device="cuda", compensation="exact")
    assert [m["name"] for m in cpu["selected_matrices"]] == [
        m["name"] for m in gpu["selected_matrices"]
    ]
    a, b = tensors(tmp_path / "cpu"), tensors(tmp_path / "gpu")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-4)


def test_dry_run_reports_without_writing(toy, tmp_path):
    written = repair(toy, tmp_path / "out")
    pipeline = RepairPipeline(RepairConfig())
    dry = pipeline.run(
        pipeline.prepare(toy["base"], toy["adapter"], toy["honesty"], toy["task"]), None
    )
    assert dry["selected_matrices"] == written["selected_matrices"]
    assert dry["changed_params"] == written["changed_params"] > 0
    assert "files" not in dry and set(dry["stage_seconds"]) == set(TIMED_STAGES) - {"task_hessians"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_task_aware_compensation_is_accepted_layer_by_layer():
    # equality with the whole-model run: tests/test_research_modes.py
    assert RunOptions(layerwise=True).check_for(RepairConfig).layerwise
    assert RepairConfig(compensation="task_aware").task_weight == 1.0


def counted(monkeypatch, method: str, record) -> list:
    """`RepairPipeline.<method>` still runs, each call noted as `record(*its arguments)`."""
    calls: list = []
    original = getattr(RepairPipeline, method)

    def counting(self, *args):
        calls.append(record(*args))
        return original(self, *args)

    monkeypatch.setattr(RepairPipeline, method, counting)
    return calls


def test_shared_fisher_cache_reuses_scores_and_changes_nothing(toy, tmp_path, monkeypatch):
    """Sweeps share one `fisher_cache`: the second repair runs no Fisher pass and writes
    exactly what an uncached repair writes; other data is scored afresh."""
    calls = counted(monkeypatch, "_fisher", lambda models, prep, data: len(data))
    cache: dict = {}
    for n, compensation in enumerate(("paper", "exact")):
        pipeline = RepairPipeline(RepairConfig(compensation=compensation), fisher_cache=cache)
        prepared = pipeline.prepare(toy["base"], toy["adapter"], toy["honesty"], toy["task"])
        pipeline.run(prepared, tmp_path / f"cached-{n}")
    assert len(calls) == 2 and len(cache) == 2  # task on the fine-tune, honesty on the base
    repair(toy, tmp_path / "fresh", compensation="exact")
    assert len(calls) == 4  # no cache: both passes again
    cached, fresh = tensors(tmp_path / "cached-1"), tensors(tmp_path / "fresh")
    assert all(torch.equal(cached[k], fresh[k]) for k in fresh)
    pipeline = RepairPipeline(RepairConfig(), fisher_cache=cache)
    swapped = pipeline.prepare(toy["base"], toy["adapter"], toy["task"], toy["honesty"])
    pipeline.run(swapped, None)
    assert len(calls) == 6 and len(cache) == 4  # other data: new keys, scored afresh


def test_task_hessian_cache_runs_the_task_pass_once_per_matrix(toy, tmp_path, monkeypatch):
    """Task-aware candidates of a grid (other μ, R_CW) share H_task: a later run passes
    D_task only for matrices no earlier run needed, and writes exactly what an uncached
    run writes."""
    passes = counted(monkeypatch, "_task_hessians", lambda prep, kept, dtype: sorted(kept))
    fisher: dict = {}
    cache: dict = {}
    settings = [{"task_weight": 1.0}, {"task_weight": 7.0}, {"task_weight": 7.0, "r_cw": 1.0}]
    for n, overrides in enumerate(settings):
        config = RepairConfig(compensation="task_aware", **overrides)
        pipeline = RepairPipeline(config, fisher_cache=fisher, task_hessian_cache=cache)
        prepared = pipeline.prepare(toy["base"], toy["adapter"], toy["honesty"], toy["task"])
        report = pipeline.run(prepared, tmp_path / f"cached-{n}")
        kept = sorted(m["name"] for m in report["selected_matrices"])
        if n == 0:
            assert passes == [kept]
        if n == 1:  # the same matrices: no pass
            assert len(passes) == 1 and report["stage_seconds"]["task_hessians"] < 1.0
        if n == 2:  # all matrices: a pass for the ones the first run did not need
            assert passes[1] == sorted(set(kept) - set(passes[0])) and passes[1]
    assert len(cache) == 1  # one fine-tuned model and D_task: one entry
    repair(toy, tmp_path / "fresh", compensation="task_aware", task_weight=7.0, r_cw=1.0)
    assert len(passes) == 3  # no cache: a full pass
    cached, fresh = tensors(tmp_path / "cached-2"), tensors(tmp_path / "fresh")
    assert all(torch.equal(cached[k], fresh[k]) for k in fresh)
