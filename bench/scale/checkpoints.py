"""Sizes, random Llama-shaped checkpoints and data, cached under --work per size."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

# Llama-3 proportions; the small ones use a 32k vocabulary so that the embedding does
# not dominate. 8B and 70B are the real Llama-3.1 shapes.
SIZES: dict[str, dict[str, Any]] = {
    "llama-20m": dict(hidden=256, inter=1024, layers=4, heads=4, kv=2, vocab=32000),
    "llama-64m": dict(hidden=512, inter=2048, layers=8, heads=8, kv=4, vocab=32000),
    "llama-290m": dict(hidden=1024, inter=3584, layers=16, heads=8, kv=4, vocab=32000),
    "llama-1.5b": dict(hidden=2048, inter=8192, layers=16, heads=32, kv=8, vocab=128256),
    "llama-3.1-8b": dict(hidden=4096, inter=14336, layers=32, heads=32, kv=8, vocab=128256),
    "llama-3.1-70b": dict(hidden=8192, inter=28672, layers=80, heads=64, kv=8, vocab=128256),
}
PROMPT_TOKENS, RESPONSE_TOKENS, N_SAMPLES = 48, 16, 128


def llama_config(spec: dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=spec["vocab"],
        hidden_size=spec["hidden"],
        intermediate_size=spec["inter"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv"],
        max_position_embeddings=8192,
        rope_theta=500000.0,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )


def param_count(spec: dict[str, Any]) -> int:
    h, i, n, v = spec["hidden"], spec["inter"], spec["layers"], spec["vocab"]
    kv = h // spec["heads"] * spec["kv"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return n * per_layer + 2 * v * h + h


def _write_random_weights(config: Any, out: Path, shard_bytes: int = 4 * 1024**3) -> None:
    """Random bf16 weights, one tensor at a time, in shards + index (like save_pretrained)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        shapes = {
            k: tuple(v.shape)
            for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()
        }
    generator = torch.Generator().manual_seed(0)
    shards, current, used = [], {}, 0
    for name, shape in shapes.items():
        if "norm" in name:
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        if current and used + tensor.numel() * 2 > shard_bytes:
            shards.append(current)
            current, used = {}, 0
        current[name] = tensor
        used += tensor.numel() * 2
    shards.append(current)
    weight_map = {}
    for number, tensors in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    index = {
        "metadata": {"total_size": sum(2 * math.prod(s) for s in shapes.values())},
        "weight_map": weight_map,
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index))


def _write_random_adapter(config: Any, base_dir: Path, out: Path, rank: int = 16) -> None:
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(1)
    h, kv = config.hidden_size, config.hidden_size // config.num_attention_heads
    kv *= config.num_key_value_heads
    dims = {
        "q_proj": (h, h),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (h, h),
        "gate_proj": (h, config.intermediate_size),
        "up_proj": (h, config.intermediate_size),
        "down_proj": (config.intermediate_size, h),
    }  # (in, out)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for proj, (n_in, n_out) in dims.items():
            part = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{proj}"
            a = torch.randn(rank, n_in, generator=generator) / math.sqrt(n_in)
            b = torch.randn(n_out, rank, generator=generator) * 0.002
            tensors[f"{key}.lora_A.weight"] = a.to(torch.bfloat16)
            tensors[f"{key}.lora_B.weight"] = b.to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(dims),
        "base_model_name_or_path": str(base_dir),
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))


DATA_VERSION = "2"  # 2: the honesty set carries `answerable` and refusals (for DPO)


def _write_samples(path: Path, words: list[str], seed: int, refusal: str | None = None) -> None:
    """N_SAMPLES random prompts and responses; with `refusal`, odd lines are unanswerable
    and answer it (same random stream and token counts either way)."""
    rng = random.Random(seed)
    with path.open("w") as handle:
        for i in range(N_SAMPLES):
            prompt = " ".join(rng.choices(words, k=PROMPT_TOKENS - 12))  # template adds ~12
            response = " ".join(rng.choices(words, k=RESPONSE_TOKENS - 1))  # + EOS
            sample: dict[str, Any] = {"prompt": prompt, "response": response}
            if refusal is not None:
                sample["answerable"] = i % 2 == 0
                if i % 2:
                    sample["response"] = refusal
            handle.write(json.dumps(sample) + "\n")


def _write_data(root: Path, words: list[str]) -> None:
    (root / "data").mkdir(exist_ok=True)
    refusal = " ".join(words[5000 : 5000 + RESPONSE_TOKENS - 1])  # not in the prompts' words
    _write_samples(root / "data" / "honesty.jsonl", words[:5000], 0, refusal)
    _write_samples(root / "data" / "task.jsonl", words[:5000], 1)
    (root / "data" / "version").write_text(DATA_VERSION + "\n")


def build(size: str, work: Path, weights: bool = True) -> Path:
    """Base, adapter and data for `size` under work/size (cached by a done-marker).

    Without `weights` only the config, tokenizer and data are written (synthetic runs).
    """
    from hcnr_core.toy import build_word_tokenizer

    root = work / (size if weights else f"{size}-synthetic")
    spec = SIZES[size]
    if (root / "done").exists():
        version = root / "data" / "version"
        if not version.exists() or version.read_text().strip() != DATA_VERSION:
            _write_data(root, [f"w{i}" for i in range(spec["vocab"] - 8)])
        return root
    config = llama_config(spec)
    base = root / "base"
    base.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(base)
    words = [f"w{i}" for i in range(spec["vocab"] - 8)]
    build_word_tokenizer(words).save_pretrained(base)
    if weights:
        _write_random_weights(config, base)
        _write_random_adapter(config, base, root / "adapter")
    _write_data(root, words)
    (root / "done").write_text("ok\n")
    return root
