"""hcnr_core/estimate.py against hand computations from its documented equations, the
figures of bench/results/scale.md, and real checkpoints (the toy, a sharded copy)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hcnr_core import estimate as est
from hcnr_core.config import RaitConfig, RepairConfig, RunOptions
from hcnr_core.errors import CheckpointTooLargeError, UnsafeCheckpointError
from hcnr_core.limits import GIB, Limits


def llama_entries(h: int, i: int, layers: int, heads: int, kv: int, vocab: int) -> dict:
    """safetensors header entries of a Llama with these dimensions (no files)."""
    kv_dim = h // heads * kv
    shapes = {"model.embed_tokens.weight": [vocab, h], "lm_head.weight": [vocab, h]}
    shapes["model.norm.weight"] = [h]
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes |= {
            p + "self_attn.q_proj.weight": [h, h],
            p + "self_attn.k_proj.weight": [kv_dim, h],
            p + "self_attn.v_proj.weight": [kv_dim, h],
            p + "self_attn.o_proj.weight": [h, h],
            p + "mlp.gate_proj.weight": [i, h],
            p + "mlp.up_proj.weight": [i, h],
            p + "mlp.down_proj.weight": [h, i],
            p + "input_layernorm.weight": [h],
            p + "post_attention_layernorm.weight": [h],
        }
    return {k: {"shape": v, "dtype": "BF16"} for k, v in shapes.items()}


def llama_shapes(h: int, i: int, layers: int, heads: int, kv: int, vocab: int) -> est.Shapes:
    config = {
        "hidden_size": h,
        "intermediate_size": i,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "vocab_size": vocab,
    }
    return est.shapes_of(config, llama_entries(h, i, layers, heads, kv, vocab))


LLAMA_8B = dict(h=4096, i=14336, layers=32, heads=32, kv=8, vocab=128256)
LLAMA_70B = dict(h=8192, i=28672, layers=80, heads=64, kv=8, vocab=128256)
# scale.md's layer-by-layer R: the hidden states of 128 samples x 64 tokens.
SCALE_SET_TOKENS = 128 * 64


# --- parameters and shapes ---------------------------------------------------------------------


def test_toy_parameters_by_hand(toy):
    """The toy: vocab 60, hidden 32, 2 layers, MLP 64, 4 heads with 2 KV heads (head 8)."""
    h, i, v, kv = 32, 64, 60, 16
    block = h * h + kv * h + kv * h + h * h + 3 * i * h + 2 * h  # q k v o gate up down norms
    outside = 2 * v * h + h  # embeddings, head, final norm
    assert block == 9280 and outside == 3872
    # LoRA r=4 on q, v, up, down: A is r x in, B is out x r.
    r = 4
    adapter = 2 * (r * h + h * r + r * h + kv * r + r * h + i * r + r * i + h * r)
    shapes = est.read_shapes(toy["base"], toy["adapter"])
    assert shapes.parameters == 2 * block + outside == 22432
    assert shapes.adapter_parameters == adapter == 2432
    assert shapes.total_parameters == 22432 + 2432
    assert (shapes.largest_block, shapes.outside_blocks) == (block, outside)
    assert (shapes.hidden_size, shapes.layers, shapes.vocab_size, shapes.heads) == (h, 2, v, 4)
    assert shapes.finetuned_kind == "adapter" and shapes.stored_dtype == "float32"
    assert len(shapes.matrices) == 14  # 7 linears x 2 layers
    full = est.read_shapes(toy["base"], toy["full"])
    assert (full.finetuned_kind, full.adapter_parameters) == ("full", 0)


def test_llama_3_1_8b_parameters_from_headers_only():
    shapes = llama_shapes(**LLAMA_8B)
    assert shapes.parameters == 8_030_261_248  # Llama-3.1-8B's published count
    assert shapes.stored_dtype == "bfloat16"


def test_sharded_checkpoint_counts_every_shard_and_refuses_escapes(toy, tmp_path: Path):
    """An index over two shards gives the same count as the single file; a weight_map
    entry leading outside the directory is refused before anything is read."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(toy["base"] / "model.safetensors")
    names = sorted(tensors)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((toy["base"] / "config.json").read_text())
    halves = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({n: tensors[n].contiguous() for n in part}, str(sharded / file))
    weight_map = {n: f for f, part in halves.items() for n in part}
    index = sharded / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    assert est.read_shapes(sharded, toy["full"]).parameters == 22432
    index.write_text(json.dumps({"weight_map": {names[0]: "../outside.safetensors"}}))
    with pytest.raises(UnsafeCheckpointError):
        est.read_shapes(sharded, toy["full"])


def test_checkpoint_limits_apply(toy):
    with pytest.raises(CheckpointTooLargeError) as caught:
        est.read_shapes(toy["base"], toy["adapter"], Limits(max_parameters=20_000))
    assert caught.value.details()["value"] == 22432


# --- tokens -------------------------------------------------------------------------------------


def test_tokens_from_bytes_is_bytes_over_four_bounded_by_max_seq_len():
    size = est.tokens_from_bytes(samples=10, file_bytes=4001, max_seq_len=512)
    assert (size.tokens, size.tokens_upper, size.basis) == (1001, 5120, "file_bytes")
    capped = est.tokens_from_bytes(samples=10, file_bytes=10**7, max_seq_len=16)
    assert capped.tokens == capped.tokens_upper == 160


def test_tokens_from_tokenizer_match_the_limits_count(toy):
    """Counted as the repair encodes them; for samples shorter than max_seq_len that is
    `hcnr_core.limits.check_tokens`'s independent count."""
    from hcnr_core.checkpoint import inspect_checkpoint, load_tokenizer
    from hcnr_core.data import load_jsonl
    from hcnr_core.limits import check_tokens

    tokenizer = load_tokenizer(inspect_checkpoint(toy["base"]))
    samples = load_jsonl(toy["honesty"])
    size = est.tokens_from_tokenizer(tokenizer, samples, 512)
    assert size.basis == "tokenizer" and size.samples == 16
    assert size.tokens == size.tokens_upper == check_tokens(tokenizer, {"h": samples})
    cut = est.tokens_from_tokenizer(tokenizer, samples, 12)  # prompts cut from the left
    assert cut.tokens == 16 * 12 and cut.longest == 12


# --- memory: the equations and scale.md's figures ----------------------------------------------


def test_fits_are_scale_md_lines():
    """scale.md: RSS = 0.44 GiB + 13.7 B x P and 0.45 GiB + 2.41 x R (its rounding)."""
    fitted = (est.WHOLE_RSS_INTERCEPT / GIB, est.WHOLE_RSS_PER_PARAM)
    assert fitted == pytest.approx((0.44, 13.7), abs=0.05)
    fitted = (est.LAYER_RSS_INTERCEPT / GIB, est.LAYER_RSS_SLOPE)
    assert fitted == pytest.approx((0.45, 2.41), abs=0.005)
    assert est.least_squares([(0, 1), (1, 3), (2, 5)]) == (1, 2)


def test_whole_model_host_memory_is_the_fit():
    p, a, b = 100_000_000, est.WHOLE_RSS_INTERCEPT, est.WHOLE_RSS_PER_PARAM
    assert est.whole_host_bytes(p, 4) == pytest.approx(a + b * p)
    assert est.whole_host_bytes(p, 2) == pytest.approx(a + (b - 2) * p)
    assert est.whole_host_bytes(p, 4, cpu_replicas=2) == pytest.approx(a + (b + 4) * p)


@pytest.mark.parametrize(
    ("spec", "whole_gib", "layer_gib"), [(LLAMA_8B, 103, 21.8), (LLAMA_70B, 898, 76.0)]
)
def test_scale_md_table_is_reproduced(spec, whole_gib, layer_gib):
    """The CPU float32 rows of scale.md's 8B/70B table (fits only, no Hessians)."""
    shapes = llama_shapes(**spec)
    assert est.whole_host_bytes(shapes.parameters, 4) / GIB == pytest.approx(whole_gib, abs=0.5)
    resident = est.layerwise_resident_bytes(shapes, SCALE_SET_TOKENS, 4)
    assert est.layerwise_host_bytes(resident) / GIB == pytest.approx(layer_gib, abs=0.05)


def test_hessians_of_8b_match_scale_md():
    """down_proj's H is 14336² x 4 B = 0.77 GiB; one block's H (q/k/v share one, gate/up
    another): (3 x 4096² + 14336²) x 4 B = 1.0 GiB."""
    shapes = llama_shapes(**LLAMA_8B)
    groups = est.hessian_groups(shapes, RepairConfig().target_modules)
    assert len(groups) == 32 * 4  # qkv, o, gate/up, down per block
    largest = 14336**2 * 4
    block = (3 * 4096**2 + 14336**2) * 4
    assert max(groups.values()) == largest
    assert est.hessian_peak_bytes(groups, 4096 * 2**20, layerwise=True) == block + 3 * largest
    assert est.hessian_peak_bytes(groups, 4096 * 2**20, layerwise=False) == 4 * GIB + 3 * largest
    assert largest / GIB == pytest.approx(0.77, abs=0.01) and block / GIB == pytest.approx(
        1.0, 0.05
    )


def test_gpu_8b_device_memory_follows_the_design():
    """Whole model: the bf16 weights (2 B x P, ~15 GiB) + one batch's activations + the
    Hessians; layer by layer: R in bf16 (~4.4 GiB at scale.md's data) + one layer's
    activations + one block's Hessians."""
    shapes = llama_shapes(**LLAMA_8B)
    config = RepairConfig(dtype="bfloat16", batch_size=8, max_seq_len=64)
    sets = {
        n: est.DataSize(128, SCALE_SET_TOKENS, SCALE_SET_TOKENS, 64, "tokenizer")
        for n in ("honesty", "task")
    }
    e = est.estimate_repair(shapes, config, sets, "hcnr", [], RunOptions(device="cuda:0"))
    p = shapes.parameters
    groups = est.hessian_groups(shapes, config.target_modules)
    act = 32 * 64 * 8 * 4096 * (34 + 5 * 32 * 64 / 4096) * 2 / 2 + 8 * 64 * 128256 * (4 + 2)
    expected = 2 * p + act + est.hessian_peak_bytes(groups, 4096 * 2**20, False)
    assert e.whole.device_bytes == int(expected)
    assert 2 * p / GIB == pytest.approx(15.0, abs=0.1)
    resident = est.layerwise_resident_bytes(shapes, SCALE_SET_TOKENS, 2)
    assert resident / GIB == pytest.approx(4.4, abs=0.05)
    layer_act = act - 31 * 64 * 8 * 4096 * (34 + 5 * 32 * 64 / 4096)
    expected_layer = resident + layer_act + est.hessian_peak_bytes(groups, 0, True)
    assert e.layerwise.device_bytes == int(expected_layer)
    assert e.whole.host_bytes == int(est.whole_host_bytes(p, 2))  # H on the device
    assert e.runnable is False and e.refusal["code"] == "no_worker_fits"  # no workers


# --- time ---------------------------------------------------------------------------------------


def test_time_reproduces_the_reference_row_and_ranges_over_the_others():
    """llama-290m whole, default threads: 141.43 s in all with 128 + 128 samples of 56
    tokens; the range is the slowest and fastest measured Fisher throughput."""
    shapes = llama_shapes(h=1024, i=3584, layers=16, heads=8, kv=4, vocab=32000)
    assert shapes.parameters == est.P_290M
    half = 14336 // 2
    sets = {n: est.DataSize(128, half, half, 64, "tokenizer") for n in ("honesty", "task")}
    e = est.estimate_repair(shapes, RepairConfig(dtype="float32"), sets, "hcnr", [])
    assert e.wall_seconds == pytest.approx(141.43, abs=0.1)
    k = sorted(est.FISHER_K_ROWS.values())
    fisher = 14336 * est.P_290M
    hess = est.hessian_seconds(half, est.P_290M)
    overhead = est.overhead_seconds(est.P_290M)
    assert e.wall_seconds_high == pytest.approx(
        overhead + fisher / k[0] + hess * est.FISHER_K / k[0], abs=0.1
    )
    assert e.wall_seconds_low < e.wall_seconds < e.wall_seconds_high
    # compensation none: no Hessian pass; task_aware: one on D_task too
    none = est.estimate_repair(shapes, RepairConfig(compensation="none"), sets, "hcnr", [])
    assert none.wall_seconds == pytest.approx(141.43 - 25.90, abs=0.1)


def test_rait_time_is_samples_seen_times_tokens():
    shapes = llama_shapes(h=512, i=2048, layers=8, heads=8, kv=4, vocab=32000)
    assert shapes.parameters == est.P_64M
    honesty = est.DataSize(128, 128 * 56, 128 * 56, 64, "tokenizer")
    config = RaitConfig(steps=60, batch_size=16)
    seconds = est.baseline_seconds("rait", shapes, honesty, config, est.FISHER_K)
    tokens = 60 * 16 * 56
    expected = est.overhead_seconds(est.P_64M) + tokens * est.P_64M / (
        est.FISHER_K * est.RAIT_SPEED
    )
    assert seconds == pytest.approx(expected)


# --- the verdict --------------------------------------------------------------------------------


def worker(host_gib: float | None, device_gib: float | None = None, layerwise: bool = True):
    return est.Capacity(
        "w",
        "cuda:0" if device_gib else "cpu",
        None if host_gib is None else int(host_gib * GIB),
        None if device_gib is None else int(device_gib * GIB),
        layerwise,
        "test",
    )


WHOLE = est.ModeMemory(int(2 * GIB), None)
LAYER = est.ModeMemory(int(0.5 * GIB), None)


def test_verdict_needs_layerwise_when_only_it_fits():
    assert est.verdict(WHOLE, LAYER, False, [worker(4)]) == (True, False, None)
    assert est.verdict(WHOLE, LAYER, False, [worker(1)]) == (True, True, None)
    runnable, needed, refusal = est.verdict(WHOLE, LAYER, False, [worker(1, layerwise=False)])
    assert (runnable, needed, refusal["code"]) == (False, True, "no_worker_fits")
    assert "only layer by layer fits" in refusal["message"]
    runnable, needed, refusal = est.verdict(WHOLE, LAYER, False, [worker(0.25)])
    assert (runnable, needed) == (False, False) and "no worker has the memory" in refusal["message"]
    assert est.verdict(WHOLE, LAYER, False, [worker(None)]) == (True, None, None)  # unknown


def test_verdict_checks_each_device():
    gpu_whole = est.ModeMemory(int(GIB), int(20 * GIB))
    gpu_layer = est.ModeMemory(int(GIB), int(5 * GIB))
    assert est.verdict(gpu_whole, gpu_layer, False, [worker(8, 24)])[0:2] == (True, False)
    assert est.verdict(gpu_whole, gpu_layer, False, [worker(8, 16)])[0:2] == (True, True)
    runnable, _, refusal = est.verdict(gpu_whole, gpu_layer, False, [worker(8, 4)])
    assert not runnable and "per device 20.0 GiB" in refusal["message"]


def test_estimate_of_the_toy_against_hand_figures(toy):
    shapes = est.read_shapes(toy["base"], toy["adapter"])
    sets = {n: est.tokens_from_bytes(16, 1000, 512) for n in ("honesty", "task")}
    e = est.estimate_repair(shapes, RepairConfig(), sets, "hcnr", [worker(1)])
    groups = est.hessian_groups(shapes, RepairConfig().target_modules)
    h = sum(groups.values()) + 3 * max(groups.values())  # all fit the 4 GiB budget
    assert h == 2 * (3 * 32 * 32 + 64 * 64) * 4 + 3 * 64 * 64 * 4
    whole_fit = est.WHOLE_RSS_INTERCEPT + est.WHOLE_RSS_PER_PARAM * 22432
    assert e.whole.host_bytes == int(whole_fit + h)
    resident = (3872 + 9280 + 3 * 250 * 32) * 4
    per_layer_h = (3 * 32 * 32 + 64 * 64) * 4
    layer_fit = est.LAYER_RSS_INTERCEPT + est.LAYER_RSS_SLOPE * resident
    assert e.layerwise.host_bytes == int(layer_fit + per_layer_h + 3 * 64 * 64 * 4)
    assert (e.runnable, e.layerwise_needed, e.refusal) == (True, False, None)
    assert math.isclose(e.parameters + e.adapter_parameters, 24864)
    rait = est.estimate_repair(shapes, RaitConfig(), sets, "rait", [worker(1)])
    assert rait.layerwise is None and rait.whole.device_bytes is None


def test_an_auto_estimate_counts_the_refit_as_one_more_repair(toy):
    """auto's refit (on by default) repairs the choice again after the candidates: the
    estimate adds its longest candidate's time and says so; without refit it does not."""
    from hcnr_core.registry import get_method

    shapes = est.read_shapes(toy["base"], toy["adapter"])
    sets = {n: est.tokens_from_bytes(16, 1000, 512) for n in ("honesty", "task")}
    make = get_method("auto").make_config
    on = est.estimate_repair(shapes, make({}), sets, "auto", [worker(1)])
    off = est.estimate_repair(shapes, make({"refit": False}), sets, "auto", [worker(1)])
    parts = est._auto_parts(make({}))
    longest = max(est._seconds(shapes, c, m, sets, est.FISHER_K) for m, c in parts)
    assert on.wall_seconds == pytest.approx(off.wall_seconds + longest, abs=0.1)  # rounded
    assert any("refit" in n for n in on.notes) and not any("refit" in n for n in off.notes)


# --- hcnr repair --estimate ----------------------------------------------------------------------


def test_cli_estimate_prints_and_exits_without_repairing(toy, tmp_path: Path, monkeypatch):
    from typer.testing import CliRunner

    from hcnr_cli.main import app
    from tests.toy_cli import repair_argv

    out = tmp_path / "out"
    result = CliRunner().invoke(app, repair_argv(toy, out, "--estimate", "--json"))
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert (answer["parameters"], answer["adapter_parameters"]) == (22432, 2432)
    assert answer["tokens"]["honesty"]["basis"] == "tokenizer"
    assert answer["runnable"] is True and answer["workers"][0]["source"] == "detected"
    assert not out.exists()  # nothing repaired, nothing written
    table = CliRunner().invoke(app, repair_argv(toy, out, "--estimate"))
    assert table.exit_code == 0 and "22,432 (base) + 2,432 (adapter)" in table.stdout
    monkeypatch.setattr(est, "host_memory_bytes", lambda: 1024)  # a machine with 1 KiB
    refused = CliRunner().invoke(app, repair_argv(toy, out, "--estimate", "--json"))
    assert refused.exit_code == 1
    assert json.loads(refused.stdout)["refusal"]["code"] == "no_worker_fits"
    assert "no_worker_fits" in refused.stderr and not out.exists()
