"""Layer-by-layer mode gives the whole-model results, block by block."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from hcnr_core import RepairConfig
from hcnr_core.checkpoint import inspect_checkpoint
from hcnr_core.config import RunOptions
from hcnr_core.data import encode_samples, load_jsonl
from hcnr_core.layerwise import LayerwiseLM, LoraMergedSource, layerwise_fisher, layerwise_hessians
from hcnr_core.pipeline import RepairPipeline, target_linears
from hcnr_core.scoring import ColumnFisher, InputHessians, combine_fisher, pad_batch

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup(toy):
    tokenizer = AutoTokenizer.from_pretrained(toy["base"])
    samples = encode_samples(tokenizer, load_jsonl(toy["honesty"]), 64)
    batches = [samples[i : i + 5] for i in range(0, len(samples), 5)]  # uneven last batch
    base = inspect_checkpoint(toy["base"])
    targets = target_linears(base, r"(^|\.)layers\.\d+\..+")
    return tokenizer, batches, base, targets


def test_lora_merged_source_equals_peft_merge(toy):
    base, adapter = inspect_checkpoint(toy["base"]), inspect_checkpoint(toy["adapter"])
    merged = LoraMergedSource(base.source(), adapter)
    peft_merged = load_file(toy["full"] / "model.safetensors")
    assert set(merged.keys()) == set(peft_merged)
    assert len(merged.pairs) == 2 * 4  # 2 layers x q, v, up, down
    for name, tensor in peft_merged.items():
        torch.testing.assert_close(merged.get(name), tensor, rtol=1e-6, atol=1e-7)


def test_layerwise_fisher_equals_whole_model(setup):
    tokenizer, batches, base, targets = setup
    model = AutoModelForCausalLM.from_pretrained(base.path).eval()
    whole = ColumnFisher(model, targets, tokenizer.pad_token_id)
    losses = [loss for batch in batches for loss in whole.add_batch(batch)]
    expected = whole.scores()

    steps = []
    lm = LayerwiseLM(base.path, base.source(), torch.float32, CPU)
    share = layerwise_fisher(lm, batches, targets, tokenizer.pad_token_id, lambda: steps.append(1))
    assert len(steps) == 2 * lm.n_blocks + 1
    assert share.n_samples == len(losses)
    got = combine_fisher([share])
    assert got["mean_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    for name in targets:
        torch.testing.assert_close(got["scores"][name], expected[name], rtol=1e-4, atol=1e-9)
    # Blocks go back to meta when released: nothing of the model stays resident.
    assert all(p.device.type == "meta" for p in lm.core.layers.parameters())


def test_layerwise_hessians_equal_whole_model(setup):
    tokenizer, batches, base, targets = setup
    model = AutoModelForCausalLM.from_pretrained(base.path).eval()
    whole = InputHessians(model, targets)
    for batch in batches:
        whole.add_batch(*pad_batch(batch, tokenizer.pad_token_id, CPU))
    wanted = [t for t in targets if "layers.1." in t or t.endswith("layers.0.mlp.down_proj")]
    lm = LayerwiseLM(base.path, base.source(), torch.float32, CPU)
    seen = []
    for names, hessians in layerwise_hessians([lm], [batches], wanted, tokenizer.pad_token_id):
        seen += names
        for name in names:
            torch.testing.assert_close(hessians.hessian(name), whole.hessian(name))
    assert seen == wanted


@pytest.mark.parametrize("kind", ["adapter", "full"])
@pytest.mark.parametrize("compensation", ["paper", "exact"])
def test_layerwise_repair_matches_whole_model_repair(toy, tmp_path, kind, compensation):
    reports = {}
    for mode in (False, True):
        pipeline = RepairPipeline(
            RepairConfig(compensation=compensation), RunOptions(layerwise=mode)
        )
        prepared = pipeline.prepare(toy["base"], toy[kind], toy["honesty"], toy["task"])
        reports[mode] = pipeline.run(prepared, tmp_path / str(mode))
    assert reports[True]["selected_matrices"] == reports[False]["selected_matrices"]
    a = load_file(tmp_path / "False" / "model-00001-of-00001.safetensors")
    b = load_file(tmp_path / "True" / "model-00001-of-00001.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
