"""Checkpoints and data as users have them (issue #15, "paths no test runs"): weights
stored in bf16 and fp16, valid multi-shard inputs, sharded outputs (the shard planner),
tied embeddings whole-model and layer by layer, byte-level BPE and SentencePiece (byte
fallback, BOS post-processor) tokenizers with non-ASCII content and system messages, and
prompts truncated at generation time. Tiny random Llamas, built here like the toy
(hcnr_core.toy)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from hcnr_core import RepairConfig
from hcnr_core.checkpoint import inspect_checkpoint
from hcnr_core.config import RunOptions, split_run_options
from hcnr_core.data import encode_samples, load_jsonl, render_prompt
from hcnr_core.evaluation import GenerationSettings, generate, load_for_eval
from hcnr_core.pipeline import RepairPipeline
from hcnr_core.toy import (
    CHAT_TEMPLATE,
    SPECIAL,
    WORDS,
    build_word_tokenizer,
    tiny_llama_config,
    toy_samples,
)
from hcnr_core.writer import INDEX_NAME, StagedOutput, plan_shards, sha256_file


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """As users write JSONL: raw UTF-8, not \\u escapes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def build(
    root: Path,
    *,
    dtype: torch.dtype = torch.float32,
    tied: bool = False,
    max_shard_size: str | None = None,
    tokenizer: Any = None,
    rows: dict[str, list[dict]] | None = None,
    seed: int = 0,
) -> dict[str, Path]:
    """base/, finetuned/ (every tensor moved, embeddings included), finetuned-adapter/
    (LoRA on base, random B) and data/, stored in `dtype`, optionally sharded."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    tokenizer = tokenizer or build_word_tokenizer(WORDS)
    config = tiny_llama_config(len(tokenizer))
    config.tie_word_embeddings = tied
    paths = {"base": root / "base", "full": root / "finetuned", "adapter": root / "adapter"}
    save = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    base = LlamaForCausalLM(config).to(dtype).eval()
    base.save_pretrained(paths["base"], **save)
    tokenizer.save_pretrained(paths["base"])
    full = LlamaForCausalLM.from_pretrained(paths["base"], dtype=dtype)
    with torch.no_grad():
        for param in full.parameters():  # tied: embeddings and head move together, once
            param.add_(0.02 * torch.randn_like(param))
    full.save_pretrained(paths["full"], **save)
    tokenizer.save_pretrained(paths["full"])
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
        base_model_name_or_path=str(paths["base"]),
    )
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(paths["base"], dtype=dtype), lora)
    peft_model.save_pretrained(paths["adapter"])
    rows = rows or {kind: toy_samples(seed, 16, kind) for kind in ("honesty", "task")}
    for kind, data in rows.items():
        paths[kind] = write_jsonl(root / "data" / f"{kind}.jsonl", data)
    return paths


def repair(paths: dict[str, Path], kind: str, out: Path, **values: Any) -> dict:
    cfg, options = split_run_options(values)
    pipeline = RepairPipeline(RepairConfig(**cfg), RunOptions(**options))
    prepared = pipeline.prepare(paths["base"], paths[kind], paths["honesty"], paths["task"])
    return pipeline.run(prepared, out)


def assert_repair_shape(report: dict, got: dict, ft: dict) -> None:
    """Unselected tensors byte-equal to the fine-tune; selected ones changed only in
    their reported columns."""
    assert set(got) == set(ft)
    selected = {m["name"]: m["columns"] for m in report["selected_matrices"]}
    assert selected
    for name, tensor in got.items():
        if name not in selected:
            assert torch.equal(tensor, ft[name]), name
            continue
        others = torch.ones(tensor.shape[1], dtype=torch.bool)
        others[torch.tensor(selected[name])] = False
        assert torch.equal(tensor[:, others], ft[name][:, others]), name
        assert not torch.equal(tensor, ft[name]), name


# --- bf16 and fp16 checkpoints ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["full", "adapter"])
def test_half_precision_checkpoints_are_repaired_in_their_dtype(tmp_path, dtype, kind):
    paths = build(tmp_path / "in", dtype=dtype)
    code = {torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]
    for key in ("base", "full"):  # the inputs really are stored in half precision
        with safe_open(paths[key] / "model.safetensors", "pt") as handle:
            assert {handle.get_slice(n).get_dtype() for n in handle.keys()} == {code}
    out = tmp_path / "out"
    report = repair(paths, kind, out, compensation="exact")
    got = tensors(out)
    assert {t.dtype for t in got.values()} == {dtype}  # written back as stored, not fp32
    if kind == "full":
        ft = tensors(paths["full"])
    else:  # the adapter merged by peft in the stored dtype: W_s of this kind
        merged = load_for_eval(paths["adapter"], paths["base"], "cpu")[0]
        ft = {k: v.to(dtype) for k, v in merged.state_dict().items()}
    assert_repair_shape(report, got, ft)
    assert all(torch.isfinite(t).all() for t in got.values())
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == str(dtype).removeprefix("torch.")
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == dtype
    ids = torch.tensor([[2, 10, 11, 12]])
    assert torch.isfinite(model(input_ids=ids).logits.float()).all()


# --- sharded inputs and outputs ---------------------------------------------------------------


def test_valid_multi_shard_inputs_give_the_same_repair(tmp_path):
    one = build(tmp_path / "one")
    many = build(tmp_path / "many", max_shard_size="40KB")  # same seed: same weights
    for key in ("base", "full"):
        shards = sorted(many[key].glob("model-*.safetensors"))
        assert len(shards) >= 3 and (many[key] / INDEX_NAME).is_file(), shards
        assert not (many[key] / "model.safetensors").exists()
        assert inspect_checkpoint(many[key]).kind == "full"
    for kind in ("full", "adapter"):
        a = repair(one, kind, tmp_path / f"from-one-{kind}")
        b = repair(many, kind, tmp_path / f"from-many-{kind}")
        assert a["selected_matrices"] == b["selected_matrices"]
        ta, tb = tensors(tmp_path / f"from-one-{kind}"), tensors(tmp_path / f"from-many-{kind}")
        assert set(ta) == set(tb) and all(torch.equal(ta[n], tb[n]) for n in ta), kind


def test_shard_planner_by_hand():
    sizes = {"a": 40, "b": 30, "c": 31, "d": 100, "e": 1, "f": 99}
    # 40+30 = 70 fits in 100; +31 does not; 31 then 100 does not; 100 alone (exactly the
    # limit); 1+99 = 100 fits.
    assert plan_shards(sizes, 100) == [["a", "b"], ["c"], ["d"], ["e", "f"]]
    assert plan_shards({"big": 500, "x": 1}, 100) == [["big"], ["x"]]  # one tensor over
    assert plan_shards({}, 100) == [[]]
    assert plan_shards(sizes) == [list(sizes)]  # the default 2 GiB: one shard


def test_sharded_output_loads_and_equals_the_single_file_output(tmp_path, monkeypatch):
    paths = build(tmp_path / "in")
    single = tmp_path / "single"
    repair(paths, "adapter", single)
    limit = 40_000
    write = StagedOutput.write_tensors

    def small_shards(self, sizes, get_tensor, max_shard_bytes=None):
        return write(self, sizes, get_tensor, limit)

    monkeypatch.setattr(StagedOutput, "write_tensors", small_shards)
    out = tmp_path / "sharded"
    report = repair(paths, "adapter", out)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3, shards
    assert all(p.name.endswith(f"-of-{len(shards):05d}.safetensors") for p in shards)
    index = json.loads((out / INDEX_NAME).read_text())
    got = {}
    for shard in shards:
        part = load_file(shard)
        sizes = [t.numel() * t.element_size() for t in part.values()]
        assert len(part) == 1 or sum(sizes) <= limit, shard.name  # only a lone tensor over
        assert all(index["weight_map"][n] == shard.name for n in part)
        got.update(part)
    assert set(index["weight_map"]) == set(got)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in got.values()
    )
    expected = tensors(single)
    assert set(got) == set(expected) and all(torch.equal(got[n], expected[n]) for n in got)
    for shard in shards:  # every shard listed in the report with its digest
        assert report["files"][shard.name]["sha256"] == sha256_file(shard)
    model = AutoModelForCausalLM.from_pretrained(out)  # transformers follows the index
    state = model.state_dict()
    assert all(torch.equal(state[n], got[n]) for n in got)
    # Our own sharded output is valid input to another repair.
    assert inspect_checkpoint(out).kind == "full"
    again = RepairPipeline(RepairConfig()).prepare(
        paths["base"], out, paths["honesty"], paths["task"]
    )
    assert again.finetuned.kind == "full"


# --- tied embeddings ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["full", "adapter"])
def test_tied_embeddings_whole_model_and_layerwise(tmp_path, kind):
    paths = build(tmp_path / "in", tied=True)
    assert "lm_head.weight" not in tensors(paths["base"])
    ft = tensors(paths["full"])
    results = {}
    for layerwise in (False, True):
        out = tmp_path / f"out-{layerwise}"
        results[layerwise] = (repair(paths, kind, out, layerwise=layerwise, r_cw=1.0), out)
    (whole, whole_out), (blocks, blocks_out) = results[False], results[True]
    assert blocks["selected_matrices"] == whole["selected_matrices"]
    a, b = tensors(whole_out), tensors(blocks_out)
    assert set(a) == set(b) and "lm_head.weight" not in a  # the tie is not untied on disk
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7)
    if kind == "full":  # embeddings are no target: the fine-tune's, moved, kept as they are
        assert torch.equal(a["model.embed_tokens.weight"], ft["model.embed_tokens.weight"])
    for out in (whole_out, blocks_out):
        model = AutoModelForCausalLM.from_pretrained(out)
        assert model.config.tie_word_embeddings is True
        head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
        assert head.data_ptr() == embed.data_ptr()
        assert torch.equal(embed, tensors(out)["model.embed_tokens.weight"])


# --- real tokenizer kinds, non-ASCII content, system messages ----------------------------------

NON_ASCII = {
    "system": "Tu es un assistant prudent. 答えが分からないときは「分かりません」と言う。",
    "user": "Où est née Zoë Ångström ? 🙂",
    "response": "Je ne sais pas — 分かりません.",
}
# Characters no tokenizer here was trained on: byte-level BPE and SentencePiece's byte
# fallback must both carry them through without <unk>.
UNSEEN = "Größe: 5 € — Ω ≠ ∞ 🚀"


def _wrap(core: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL[4:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def byte_bpe_tokenizer() -> Any:
    """A real byte-level BPE (GPT-2, SmolLM2, Qwen style), trained here on a few lines:
    every Unicode string encodes without <unk> and decodes back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator([" ".join(WORDS), *NON_ASCII.values()] * 4, trainer)
    return _wrap(core)


def sentencepiece_tokenizer() -> Any:
    """A SentencePiece-style tokenizer as Llama-2/Mistral ship it in `tokenizer.json`:
    "▁" for spaces with a prefix on the first piece (Metaspace), BPE with byte fallback
    (`<0xNN>` pieces for what the vocabulary lacks), a post-processor that adds BOS when
    special tokens are requested (so any `add_special_tokens=True` on a rendered chat
    template would give a second BOS), and a decoder that strips the prefix space. Trained
    on ASCII words only: every non-ASCII character goes through the byte fallback."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    core.train_from_iterator(
        [" ".join(WORDS), "Je ne sais pas Tu es un assistant prudent"] * 4,
        trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL),
    )
    spec = json.loads(core.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):  # SentencePiece's byte pieces are ordinary vocabulary entries
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    core = Tokenizer.from_str(json.dumps(spec))
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", core.token_to_id("<s>"))]
    )
    core.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return _wrap(core)


TOKENIZERS = {"byte_bpe": byte_bpe_tokenizer, "sentencepiece": sentencepiece_tokenizer}


@pytest.fixture(params=sorted(TOKENIZERS))
def real_tokenizer(request) -> Any:
    return TOKENIZERS[request.param]()


def non_ascii_rows() -> dict[str, list[dict]]:
    honesty, task = [], []
    for i in range(12):
        messages = [
            {"role": "system", "content": NON_ASCII["system"]},
            {"role": "user", "content": f"{NON_ASCII['user']} #{i}"},
            {"role": "assistant", "content": NON_ASCII["response"]},
        ]
        honesty.append({"messages": messages, "answerable": False})
        task.append({"prompt": f"Qu'est-ce que « café » n°{i} ?", "response": f"Kaffee ☕ {i}."})
    return {"honesty": honesty, "task": task}


def test_sentencepiece_fixture_is_what_it_claims():
    """The SentencePiece fixture really has the traits the tests below rely on."""
    tokenizer = sentencepiece_tokenizer()
    pieces = tokenizer.convert_ids_to_tokens(
        tokenizer("who is", add_special_tokens=False)["input_ids"]
    )
    assert pieces[0].startswith("▁")  # Metaspace prefix
    assert any(p.startswith("<0x") for p in tokenizer.tokenize(UNSEEN))  # byte fallback
    assert tokenizer("who")["input_ids"][0] == tokenizer.bos_token_id  # BOS post-processor


def test_non_ascii_and_system_messages_encode_exactly(tmp_path, real_tokenizer):
    tokenizer = real_tokenizer
    path = write_jsonl(tmp_path / "h.jsonl", non_ascii_rows()["honesty"])
    assert "Zoë" in path.read_text(encoding="utf-8")  # stored as UTF-8, not \u escapes
    samples = load_jsonl(path)
    assert samples[0].messages[0] == {"role": "system", "content": NON_ASCII["system"]}
    encoded = encode_samples(tokenizer, samples, 512)
    for sample, enc in zip(samples, encoded, strict=True):
        assert tokenizer.unk_token_id not in enc.input_ids
        # One BOS, the template's: the tokenizer's own BOS post-processor is not applied
        # on top of the rendered chat template.
        assert enc.input_ids.count(tokenizer.bos_token_id) == 1
        assert enc.input_ids[0] == tokenizer.bos_token_id
        prompt = tokenizer.decode(enc.input_ids[: enc.prompt_len])
        response = tokenizer.decode(enc.input_ids[enc.prompt_len :])
        # The system message is in the prompt (no loss on it), the response alone is
        # trained on, and both come back character for character.
        assert prompt == render_prompt(tokenizer, sample.messages)
        assert prompt.startswith(f"<s><|system|> {NON_ASCII['system']} <|end|> ")
        assert prompt.endswith("<|assistant|> ")
        assert response == NON_ASCII["response"] + "</s>"
    ids = tokenizer(UNSEEN, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == UNSEEN


def test_generation_sees_the_prompt_tokens_the_repair_trained_on(tmp_path, real_tokenizer):
    """Repair data and evaluation agree on a prompt's tokens, whatever the tokenizer kind:
    the first forward of `generate` gets exactly the prompt part of `encode_sample`."""
    paths = build(tmp_path / "in", tokenizer=real_tokenizer, rows=non_ascii_rows())
    model, tokenizer = load_for_eval(paths["base"], None, "cpu")  # as saved and reloaded
    (sample,) = load_jsonl(paths["honesty"])[:1]
    (enc,) = encode_samples(tokenizer, [sample], 512)
    seen: list[list[int]] = []

    def capture(_module, _args, kwargs):
        if not seen:
            seen.append(kwargs["input_ids"][0].tolist())

    handle = model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        (said,) = generate(
            model, tokenizer, [sample.messages], GenerationSettings(max_new_tokens=4)
        )
    finally:
        handle.remove()
    assert seen[0] == enc.input_ids[: enc.prompt_len]
    assert isinstance(said, str)


def test_repair_with_non_ascii_and_system_messages(tmp_path, real_tokenizer):
    tokenizer = real_tokenizer
    paths = build(tmp_path / "in", tokenizer=tokenizer, rows=non_ascii_rows())
    out = tmp_path / "out"
    report = repair(paths, "adapter", out)
    merged = load_for_eval(paths["adapter"], paths["base"], "cpu")[0]
    assert_repair_shape(report, tensors(out), merged.state_dict())
    saved = AutoTokenizer.from_pretrained(out)  # the tokenizer travels with the output
    for text in (NON_ASCII["user"], UNSEEN):
        assert saved(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert saved.decode(saved(text, add_special_tokens=False)["input_ids"]) == text
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    messages = [{"role": "system", "content": NON_ASCII["system"]}]
    messages.append({"role": "user", "content": NON_ASCII["user"]})
    (said,) = generate(model, saved, [messages], GenerationSettings(max_new_tokens=6))
    assert isinstance(said, str)  # random weights: what it says is not checked


# --- generation-time truncation -----------------------------------------------------------------


def test_generation_truncates_long_prompts_from_the_left(tmp_path):
    """A prompt longer than max_seq_len - max_new_tokens: the model is given its last
    tokens (the question's end and the generation prompt), not its first."""
    paths = build(tmp_path / "in")
    model, tokenizer = load_for_eval(paths["base"], None, "cpu")
    long = " ".join(["who is alice"] * 40) + " where was bob born ?"
    messages = [{"role": "system", "content": "paris rome"}, {"role": "user", "content": long}]
    full_ids = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)
    full_ids = full_ids["input_ids"]
    settings = GenerationSettings(batch_size=1, max_new_tokens=5, max_seq_len=24)
    keep = settings.max_seq_len - settings.max_new_tokens
    assert len(full_ids) > 3 * keep
    seen: list[list[int]] = []

    def capture(_module, _args, kwargs):
        if not seen:  # the first forward of generate: the whole prompt
            seen.append(kwargs["input_ids"][0].tolist())

    handle = model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        (said,) = generate(model, tokenizer, [messages], settings)
    finally:
        handle.remove()
    assert seen[0] == full_ids[-keep:]
    kept = tokenizer.decode(seen[0])
    assert kept.endswith("where was bob born? <|end|> <|assistant|>")  # decoder joins "?"
    assert "<|system|>" not in kept  # what fell off is the start
    assert len(tokenizer(said, add_special_tokens=False)["input_ids"]) <= 5
