"""Architecture matrix: tiny random checkpoints of real transformers architectures
(Llama, Mistral, Qwen2, Qwen3, Gemma 3, Phi-3; tied and untied embeddings; LoRA adapter
and full fine-tunes), repaired end to end through `RepairPipeline` (the path `hcnr
repair` takes), whole-model and layer by layer, with invariants checked on the output
files. Architectures the repair cannot treat must be refused in `prepare`."""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import hcnr_core.runners as runners_module
from hcnr_core import RepairConfig
from hcnr_core.config import RunOptions
from hcnr_core.data import encode_samples, load_jsonl
from hcnr_core.errors import UnsupportedArchitectureError
from hcnr_core.pipeline import RepairPipeline
from hcnr_core.scoring import InputHessians
from hcnr_core.toy import WORDS, build_word_tokenizer, toy_samples, write_jsonl

HIDDEN, LAYERS, N_SAMPLES = 32, 2, 8


@dataclass(frozen=True)
class Arch:
    config: str  # transformers config class
    tied: bool  # tie_word_embeddings
    extra: dict[str, Any] = field(default_factory=dict)
    # Leaf names of the target linears that read the same input tensor.
    shared: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


ARCHS = {
    "llama": Arch("LlamaConfig", tied=False),
    # A window shorter than the samples, so the sliding mask differs from the causal one.
    "mistral": Arch("MistralConfig", tied=True, extra={"sliding_window": 4}),
    "qwen2": Arch("Qwen2Config", tied=True),  # q/k/v carry biases
    "qwen3": Arch("Qwen3Config", tied=False, extra={"head_dim": 8}),  # q/k norms
    # q/k norms, pre/post feed-forward norms, scaled embeddings; one sliding and one
    # global layer, so each block needs its own mask and rotary table.
    "gemma3": Arch(
        "Gemma3TextConfig",
        tied=True,
        extra={
            "head_dim": 8,
            "query_pre_attn_scalar": 8,
            "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention"],
            # Gemma 2's logit soft-capping (null in Gemma 3's own configs): a head step
            # the layer-by-layer tail must apply too. Small, so it visibly bends logits.
            "final_logit_softcapping": 2.0,
        },
    ),
    "phi3": Arch("Phi3Config", tied=False, shared=()),  # fused qkv_proj and gate_up_proj
}


def build_arch(root: Path, name: str, seed: int = 0) -> dict[str, Path]:
    """base/, adapter/ (LoRA, non-zero B), adapter-merged/ (its W_s, the reference),
    full/ (every tensor perturbed, norms and biases included) and the toy's data."""
    from peft import LoraConfig, get_peft_model

    spec = ARCHS[name]
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(WORDS)
    config = tiny_config(spec.config, len(tokenizer), tie_word_embeddings=spec.tied, **spec.extra)
    paths = {k: root / k for k in ("base", "adapter", "adapter-merged", "full")}
    base = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in base.parameters():
            if param.dim() == 1:  # norms and biases away from their 1/0 initialisation
                param.add_(0.1 * torch.randn_like(param))
    base.save_pretrained(paths["base"])
    tokenizer.save_pretrained(paths["base"])

    full = AutoModelForCausalLM.from_pretrained(paths["base"])
    with torch.no_grad():
        for param in full.parameters():  # tied embeddings appear (and move) once
            param.add_((0.005 if param.dim() > 1 else 0.05) * torch.randn_like(param))
    full.save_pretrained(paths["full"])
    tokenizer.save_pretrained(paths["full"])

    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",  # peft leaves the output layer out
        init_lora_weights=False,  # random B: the "fine-tune" moves the weights
        base_model_name_or_path=str(paths["base"]),
    )
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(paths["base"]), lora)
    peft_model.save_pretrained(paths["adapter"])
    peft_model.merge_and_unload().save_pretrained(paths["adapter-merged"])

    paths.update(write_data(root / "data", seed))
    return paths


def write_data(root: Path, seed: int = 0) -> dict[str, Path]:
    """The toy's rows; each of its kinds has one length, so a quarter of each file is the
    other kind: batches then carry padding, which masks and Hessians must skip."""
    rows = {kind: toy_samples(seed, N_SAMPLES, kind) for kind in ("honesty", "task")}
    mixed = {
        "honesty": rows["honesty"][: -N_SAMPLES // 4] + rows["task"][-N_SAMPLES // 4 :],
        "task": rows["task"][: -N_SAMPLES // 4] + rows["honesty"][-N_SAMPLES // 4 :],
    }
    return {kind: write_jsonl(root / f"{kind}.jsonl", mixed[kind]) for kind in mixed}


def tiny_config(config_class: str, vocab_size: int, **extra: Any) -> Any:
    import transformers

    return getattr(transformers, config_class)(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        **extra,
    )


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


@dataclass
class Repaired:
    out: Path
    report: dict[str, Any]
    targets: list[str]
    # module -> (leader of its shared-input group, shape of the H it was compensated with)
    groups: dict[str, tuple[str, tuple[int, ...]]]


# "exact" keeps every moved matrix, so the closed form and the shared-input groups are
# checked on all of them; the others keep the default R_CW, so some matrices are not
# selected and must come out byte-equal.
R_CW = {"exact": 1.0, "paper": 0.4, "none": 0.4}


@pytest.fixture(scope="module", autouse=True)
def _fast_tiny_repairs() -> Any:
    """Speed only, results are the same. Every repair calls gc.collect() between stages;
    with the session's imports on the heap each takes ~0.3 s, half a tiny repair: frozen
    objects are not scanned (nor freed) until the module ends, collected first so nothing
    leaks. One intra-op thread: 32-wide matrices gain nothing from two, and on a shared
    2-core machine the second one's spin-waits made this file 2x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """name -> paths of its tiny checkpoints, each built once per session."""
    built: dict[str, dict[str, Path]] = {}

    def get(name: str) -> dict[str, Path]:
        if name not in built:
            built[name] = build_arch(tmp_path_factory.mktemp(name), name)
        return built[name]

    return get


@pytest.fixture(scope="session")
def repairs(checkpoints: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(arch, kind, compensation, layerwise) -> Repaired, each run once per session."""
    done: dict[tuple[str, str, str, bool], Repaired] = {}

    def run(name: str, kind: str, compensation: str, layerwise: bool = False) -> Repaired:
        key = (name, kind, compensation, layerwise)
        if key in done:
            return done[key]
        paths = checkpoints(name)
        # Every InputHessians the repair builds (public class): after the run, each one's
        # groups() and hessian() say which H each module was compensated with.
        built: list[InputHessians] = []
        init = InputHessians.__init__

        def recording(self, *args: Any, **kwargs: Any) -> None:
            init(self, *args, **kwargs)
            built.append(self)

        cfg = RepairConfig(compensation=compensation, r_cw=R_CW[compensation])
        pipeline = RepairPipeline(cfg, RunOptions(layerwise=layerwise))
        prepared = pipeline.prepare(paths["base"], paths[kind], paths["honesty"], paths["task"])
        out = tmp_path_factory.mktemp("-".join(map(str, key))) / "out"
        with mock.patch.object(InputHessians, "__init__", recording):
            report = pipeline.run(prepared, out)
        groups: dict[str, tuple[str, tuple[int, ...]]] = {}
        for hessians in built:
            for leader, members in hessians.groups().items():
                for module in members:
                    groups[module] = (leader, tuple(hessians.hessian(module).shape))
        done[key] = Repaired(out, report, prepared.targets, groups)
        return done[key]

    return run


@pytest.fixture(scope="session")
def input_hessians(checkpoints: Any) -> Any:
    """arch -> {target module: H} in float64, computed here without hcnr_core.scoring:
    the base model runs each honesty sample alone (no padding) and a pre-hook on every
    nn.Linear of the blocks sums 2·x xᵀ over its input tokens."""
    done: dict[str, dict[str, torch.Tensor]] = {}

    def get(name: str) -> dict[str, torch.Tensor]:
        if name in done:
            return done[name]
        paths = checkpoints(name)
        model = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(paths["base"])
        samples = encode_samples(tokenizer, load_jsonl(paths["honesty"]), 512)
        sums: dict[str, torch.Tensor] = {}

        def hook(module_name: str) -> Any:
            def pre(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[module_name] = sums.get(module_name, 0) + 2 * x.T @ x

            return pre

        handles = [
            module.register_forward_pre_hook(hook(module_name))
            for module_name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and ".layers." in module_name
        ]
        with torch.no_grad():
            for sample in samples:
                model(input_ids=torch.tensor([sample.input_ids]))
        for handle in handles:
            handle.remove()
        n_tokens = sum(len(s.input_ids) for s in samples)
        done[name] = {k: v / n_tokens for k, v in sums.items()}
        return done[name]

    return get


def closed_form(
    mode: str, w_o: torch.Tensor, w_s: torch.Tensor, cols: torch.Tensor, h: torch.Tensor
) -> torch.Tensor:
    """DESIGN.md §2 in float64: damping (dead inputs get 1, then += 0.01·mean diag) and the
    "exact" and "paper" (Eq. 9-10) formulas, written out for one matrix."""
    h = h.clone()
    diag = h.diagonal()
    diag[diag == 0] = 1.0
    diag += 0.01 * diag.mean()
    w_o, w_s = w_o.double(), w_s.double()
    others = torch.ones(w_s.shape[1], dtype=torch.bool)
    others[cols] = False
    delta_t = (w_s - w_o)[:, others]
    out = w_s.clone()
    if mode == "exact":
        h_ff_inv = torch.linalg.inv(h[cols][:, cols])
        out[:, cols] = w_o[:, cols] - delta_t @ h[others][:, cols] @ h_ff_inv
    else:
        h_inv = torch.linalg.inv(h)
        scaled = delta_t / h_inv.diagonal()[others]
        out[:, cols] = w_o[:, cols] + scaled @ h_inv[others][:, cols]
    return out


def expected_groups(name: str, modules: list[str]) -> set[frozenset[str]]:
    """Partition of `modules` into the sets that read one input tensor."""
    leaf_group = {leaf: group for group in ARCHS[name].shared for leaf in group}
    parts: dict[tuple[str, Any], set[str]] = {}
    for module in modules:
        block, leaf = module.rsplit(".", 2)[0], module.rsplit(".", 1)[1]
        parts.setdefault((block, leaf_group.get(leaf, leaf)), set()).add(module)
    return {frozenset(p) for p in parts.values()}


MATRIX = [
    (name, kind, compensation)
    for name in ARCHS
    for kind in ("full", "adapter")
    for compensation in ("paper", "exact", "none")
    if not (kind == "adapter" and compensation == "none")  # restoring needs no H: one kind
]


@pytest.mark.parametrize("name, kind, compensation", MATRIX)
def test_repair_invariants(name, kind, compensation, checkpoints, repairs, input_hessians):
    spec, paths = ARCHS[name], checkpoints(name)
    result = repairs(name, kind, compensation)
    report = result.report
    got, base = tensors(result.out), tensors(paths["base"])
    ft = tensors(paths["full" if kind == "full" else "adapter-merged"])  # W_s
    assert set(got) == set(ft) == set(base)  # every tensor, nothing extra

    # Targets: every linear of the blocks, never the embeddings or the head.
    per_block = 4 if name == "phi3" else 7
    assert report["n_target_matrices"] == len(result.targets) == LAYERS * per_block
    assert all(".layers." in t for t in result.targets)
    assert not [t for t in result.targets if "embed" in t or "lm_head" in t]

    selected = {m["name"]: torch.tensor(m["columns"]) for m in report["selected_matrices"]}
    assert selected
    if compensation == "exact":  # R_CW = 1: every matrix moved, so every one is kept
        assert len(selected) == len(result.targets)
    for tensor_name, tensor in got.items():
        if tensor_name not in selected:
            assert torch.equal(tensor, ft[tensor_name]), f"{tensor_name} changed, not reported"
            continue
        assert tensor_name.removesuffix(".weight") in result.targets
        cols = selected[tensor_name]
        others = torch.ones(tensor.shape[1], dtype=torch.bool)
        others[cols] = False
        assert torch.equal(tensor[:, others], ft[tensor_name][:, others]), tensor_name
        if compensation == "none":
            assert torch.equal(tensor[:, cols], base[tensor_name][:, cols]), tensor_name
        else:
            assert not torch.equal(tensor[:, cols], ft[tensor_name][:, cols]), tensor_name

    # Biases and norm weights are never touched (the full fine-tune moved them all).
    vectors = [n for n in ft if ft[n].dim() == 1]
    assert all(torch.equal(got[n], ft[n]) for n in vectors)
    if kind == "full":
        assert not [n for n in vectors if torch.equal(ft[n], base[n])]
    leaves = {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in vectors}
    if name == "qwen2":
        assert {"q_proj.bias", "k_proj.bias", "v_proj.bias"} <= leaves
    if name in ("qwen3", "gemma3"):
        assert {"q_norm.weight", "k_norm.weight"} <= leaves
    if name == "gemma3":
        assert {"pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"} <= leaves

    # The output loads with transformers, weights as written, ties intact, finite logits.
    model = AutoModelForCausalLM.from_pretrained(result.out, dtype=torch.float32).eval()
    state = model.state_dict()
    assert all(torch.equal(state[n], got[n]) for n in got)
    assert model.config.tie_word_embeddings is spec.tied
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert ("lm_head.weight" not in got) is spec.tied
    assert torch.equal(head, embed) is spec.tied
    tokenizer = AutoTokenizer.from_pretrained(result.out)
    sample = encode_samples(tokenizer, load_jsonl(paths["honesty"]), 512)[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([sample.input_ids])).logits
    assert logits.shape[-1] == len(tokenizer) and torch.isfinite(logits).all()

    if compensation == "none":
        return
    # Compensation: the closed form with an H computed independently over each matrix's
    # input, for every repaired matrix. A fused matrix (Phi-3 qkv_proj, gate_up_proj) gets
    # the one H of the input its parts share, over its whole input dimension.
    hessians = input_hessians(name)
    for tensor_name, cols in selected.items():
        module = tensor_name.removesuffix(".weight")
        want = closed_form(compensation, base[tensor_name], ft[tensor_name], cols, hessians[module])
        # float32 sums and solves against float64: o_proj's input spans 16 of 32 dims (2
        # kv heads), so its H is near-singular under the damping and fp32 ends up ~1.2e-4
        # of the matrix's scale off; 1e-3 leaves margin. A wrong H (e.g. padding counted)
        # is off by ~0.1 of the scale, the size of the compensation itself.
        scale = float(want.abs().max())
        torch.testing.assert_close(got[tensor_name].double(), want, rtol=0, atol=1e-3 * scale)
        n_in = ft[tensor_name].shape[1]
        assert result.groups[module][1] == (n_in, n_in), module
    # Members of a shared-input group (q/k/v, gate/up) were compensated with one H.
    modules = [n.removesuffix(".weight") for n in selected]
    found: dict[str, set[str]] = {}
    for module in modules:
        found.setdefault(result.groups[module][0], set()).add(module)
    assert {frozenset(g) for g in found.values()} == expected_groups(name, modules)


# Layer by layer walks the blocks by hand: rotary tables, Gemma's sliding/global layers,
# scaled embeddings and soft-capped logits, Phi-3's fused projections, Qwen2's biases.
LAYERWISE = ["phi3", "gemma3", "qwen2", "mistral"]


@pytest.mark.parametrize("name", LAYERWISE)
@pytest.mark.parametrize("kind, compensation", [("full", "exact"), ("adapter", "paper")])
def test_layerwise_equals_whole_model(name, kind, compensation, repairs):
    whole = repairs(name, kind, compensation)
    blocks = repairs(name, kind, compensation, layerwise=True)
    assert blocks.report["selected_matrices"] == whole.report["selected_matrices"]
    for what, loss in whole.report["fisher_mean_loss"].items():
        assert blocks.report["fisher_mean_loss"][what] == pytest.approx(loss, rel=1e-5), what
    a, b = tensors(whole.out), tensors(blocks.out)
    assert set(a) == set(b)
    for tensor_name in a:
        torch.testing.assert_close(b[tensor_name], a[tensor_name], rtol=1e-5, atol=1e-7)


def save_tiny(root: Path, config: Any) -> dict[str, Path]:
    """A random model of `config` with the toy's tokenizer and data."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(root / "base")
    build_word_tokenizer(WORDS).save_pretrained(root / "base")
    return {"base": root / "base", **write_data(root)}


def unsupported_config(name: str, vocab_size: int) -> Any:
    import transformers

    if name == "gpt2":  # the blocks' matrices are Conv1D, not nn.Linear
        return transformers.GPT2Config(
            vocab_size=vocab_size,
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=4,
            n_positions=128,
            bos_token_id=2,
            eos_token_id=3,
        )
    if name == "mixtral":  # experts stored as 3-D tensors, the router as a bare matrix
        return tiny_config("MixtralConfig", vocab_size, num_local_experts=2, num_experts_per_tok=1)
    # OPT: plain nn.Linear, but its blocks live in model.decoder.layers
    return transformers.OPTConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        ffn_dim=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        word_embed_proj_dim=HIDDEN,
        max_position_embeddings=128,
    )


@pytest.mark.parametrize(
    "name, layerwise, says",
    [
        ("gpt2", False, r"transformer\.h\.0\.attn\.c_attn\.weight \(Conv1D\)"),
        ("mixtral", False, r"mlp\.experts\.gate_up_proj \(MixtralExperts\)"),
        ("opt", True, r"layer-by-layer mode supports Llama-family decoders"),
    ],
)
def test_unsupported_architecture_is_refused_in_prepare(name, layerwise, says, tmp_path):
    paths = save_tiny(tmp_path, unsupported_config(name, len(build_word_tokenizer(WORDS))))
    pipeline = RepairPipeline(RepairConfig(), RunOptions(layerwise=layerwise))
    # prepare reads no weights; these would show it did (it must fail before any compute)
    with (
        mock.patch.object(runners_module, "load_model", side_effect=AssertionError),
        mock.patch.object(runners_module, "ColumnFisher", side_effect=AssertionError),
        pytest.raises(UnsupportedArchitectureError, match=says) as caught,
    ):
        pipeline.prepare(paths["base"], paths["base"], paths["honesty"], paths["task"])
    assert caught.value.code == "unsupported_architecture"
    if layerwise:  # the same model is fine whole: only the block walk cannot take it
        prepared = RepairPipeline(RepairConfig()).prepare(
            paths["base"], paths["base"], paths["honesty"], paths["task"]
        )
        assert all(".decoder.layers." in t for t in prepared.targets)
