"""Scaling benchmark: full HCNR repairs of random-weight Llama-shaped checkpoints.

    .venv/bin/python bench/scale.py --sizes llama-20m llama-64m llama-290m --dtype float32
    .venv/bin/python bench/scale.py --sizes llama-3.1-8b --device cuda --dtype bfloat16

For each size it writes (once, cached under --work) a base checkpoint with Llama's real
architecture and random weights (safetensors shards, written tensor by tensor so an 8B
model never sits in memory), a word-level tokenizer with a chat template, a random LoRA
adapter (r=16 on every linear) and 128 + 128 samples; then runs `hcnr_core`'s full repair
in a fresh subprocess (so peak memory is that of one repair) and records seconds per
stage, peak CPU RSS, peak GPU memory and Fisher tokens/s. Results accumulate in
bench/results/scale.json (keyed by machine, device and size); scale.md and scale.png are
regenerated from all of them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

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


def _write_samples(path: Path, words: list[str], seed: int) -> None:
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(N_SAMPLES):
            prompt = " ".join(rng.choices(words, k=PROMPT_TOKENS - 12))  # template adds ~12
            response = " ".join(rng.choices(words, k=RESPONSE_TOKENS - 1))  # + EOS
            handle.write(json.dumps({"prompt": prompt, "response": response}) + "\n")


def build(size: str, work: Path, weights: bool = True) -> Path:
    """Base, adapter and data for `size` under work/size (cached by a done-marker).

    Without `weights` only the config, tokenizer and data are written (synthetic runs).
    """
    from hcnr_core.toy import build_word_tokenizer

    root = work / (size if weights else f"{size}-synthetic")
    if (root / "done").exists():
        return root
    spec = SIZES[size]
    config = llama_config(spec)
    base = root / "base"
    base.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(base)
    words = [f"w{i}" for i in range(spec["vocab"] - 8)]
    build_word_tokenizer(words).save_pretrained(base)
    if weights:
        _write_random_weights(config, base)
        _write_random_adapter(config, base, root / "adapter")
    (root / "data").mkdir(exist_ok=True)
    _write_samples(root / "data" / "honesty.jsonl", words[:5000], 0)
    _write_samples(root / "data" / "task.jsonl", words[:5000], 1)
    (root / "done").write_text("ok\n")
    return root


def run_one(root: Path, device: str, dtype: str, budget_mb: int, layerwise: bool) -> dict[str, Any]:
    """One repair in this process; returns timings and peak memory."""
    import shutil

    import torch

    from hcnr_core import RepairConfig
    from hcnr_core.pipeline import RepairPipeline

    torch.set_num_threads(os.cpu_count() or 1)
    out = root / "repaired"
    shutil.rmtree(out, ignore_errors=True)
    config = RepairConfig(
        device=device,
        dtype=dtype,
        max_seq_len=128,
        hessian_budget_mb=budget_mb,
        layerwise=layerwise,
    )
    started = time.perf_counter()
    pipeline = RepairPipeline(config)
    prepared = pipeline.prepare(
        root / "base", root / "adapter", root / "data/honesty.jsonl", root / "data/task.jsonl"
    )
    prepare_s = time.perf_counter() - started
    report = pipeline.run(prepared, out)
    total = time.perf_counter() - started
    shutil.rmtree(out, ignore_errors=True)
    return {"prepare_s": round(prepare_s, 2), **_figures(report, prepared, total, device)}


def _figures(report: dict, prepared: Any, total: float, device: str) -> dict[str, Any]:
    """Timings, throughput and peak memory of one repair (this process)."""
    import torch

    tokens = sum(len(s.input_ids) for s in prepared.honesty + prepared.task)
    fisher_s = report["stage_seconds"]["fisher_task"] + report["stage_seconds"]["fisher_honesty"]
    gpu_peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {
        "total_s": round(total, 2),
        "stage_seconds": report["stage_seconds"],
        "fisher_tokens_per_s": round(tokens / fisher_s, 1),
        "peak_cpu_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "peak_gpu_gib": None if gpu_peak is None else round(gpu_peak, 2),
        "selected_matrices": report["n_selected_matrices"],
        "fraction_target_params_changed": round(report["fraction_target_params_changed"], 4),
    }


class RandomSource:
    """A checkpoint that never touches disk: deterministic random bf16 weights, generated
    on `device` per tensor. With `base`, it is that model plus dense noise on every
    decoder linear (a full fine-tune)."""

    def __init__(self, config: Any, device: str, seed: int, base: Any = None, delta: float = 0):
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            state = AutoModelForCausalLM.from_config(config).state_dict()
        self.shapes = {k: tuple(v.shape) for k, v in state.items()}
        if config.tie_word_embeddings:
            self.shapes.pop("lm_head.weight", None)
        self.device, self.seed, self.base, self.delta = device, seed, base, delta

    def keys(self) -> list[str]:
        return list(self.shapes)

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def dtype(self, name: str) -> Any:
        import torch

        return torch.bfloat16

    def _noise(self, name: str, scale: float) -> Any:
        import torch

        generator = torch.Generator(self.device).manual_seed(zlib.crc32(name.encode()) ^ self.seed)
        shape = self.shapes[name]
        return torch.randn(shape, generator=generator, device=self.device) * scale

    def get(self, name: str) -> Any:
        import torch

        if self.base is not None:
            weight = self.base.get(name)
            if ".layers." in name and name.endswith("proj.weight"):
                weight = (weight.float() + self._noise(name, self.delta)).to(torch.bfloat16)
            return weight
        if "norm" in name:
            return torch.ones(self.shapes[name], dtype=torch.bfloat16, device=self.device)
        return self._noise(name, 0.02).to(torch.bfloat16)


def run_synthetic(root: Path, device: str, budget_mb: int) -> dict[str, Any]:
    """A layer-by-layer dry run (no checkpoint I/O) on RandomSource weights."""
    from transformers import AutoConfig, AutoTokenizer

    from hcnr_core import RepairConfig
    from hcnr_core.checkpoint import CheckpointInfo
    from hcnr_core.data import encode_samples, load_jsonl
    from hcnr_core.pipeline import PreparedRepair, RepairPipeline, target_linears

    class Synthetic(CheckpointInfo):
        def source(self) -> Any:
            return self._source

    config = AutoConfig.from_pretrained(root / "base")
    config_dict = json.loads((root / "base" / "config.json").read_text())
    base = Synthetic(root / "base", "full", config_dict)
    base._source = RandomSource(config, device, 0)
    finetuned = Synthetic(root / "base", "full", config_dict)
    finetuned._source = RandomSource(config, device, 1, base=base._source, delta=0.002)
    cfg = RepairConfig(
        device=device,
        dtype="bfloat16",
        max_seq_len=128,
        hessian_budget_mb=budget_mb,
        layerwise=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(root / "base")
    hon = encode_samples(tokenizer, load_jsonl(root / "data/honesty.jsonl"), 128)
    task = encode_samples(tokenizer, load_jsonl(root / "data/task.jsonl"), 128)
    inputs = {
        "base": "synthetic",
        "finetuned": "synthetic",
        "finetuned_kind": "full",
        "honesty": {"samples": len(hon)},
        "task": {"samples": len(task)},
    }
    targets = target_linears(base, cfg.target_modules)
    prepared = PreparedRepair(base, finetuned, tokenizer, hon, task, targets, inputs)
    started = time.perf_counter()
    report = RepairPipeline(cfg).run(prepared, None)
    return _figures(report, prepared, time.perf_counter() - started, device)


def machine(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name(0)} + {os.cpu_count()} CPU cores"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"


def render(results: dict[str, Any]) -> None:
    rows = sorted(results.values(), key=lambda r: (r["device"], r["params"]))
    lines = [
        "# Scaling benchmark (bench/scale.py)",
        "",
        "Random-weight Llama-shaped checkpoints, base + random LoRA adapter (r=16, every",
        f"linear), {N_SAMPLES} + {N_SAMPLES} samples of {PROMPT_TOKENS} + {RESPONSE_TOKENS} "
        "tokens, default config",
        "(R_IW 0.5, R_CW 0.4, paper compensation). `total` includes checkpoint inspection,",
        "tokenization, loading both models, the adapter merge and writing the output.",
        "",
        "| size | params | device | dtype | total s | load ft | Fisher task | load base "
        "| Fisher hon | select | Hessians | compensate | save | Fisher tok/s | peak RSS GiB "
        "| peak GPU GiB |",
        "|" + "---|" * 16,
    ]
    for r in rows:
        s = r["stage_seconds"]
        lines.append(
            f"| {r['size']} | {r['params'] / 1e6:.0f}M | {r['machine']} ({r['device']}, "
            f"{r.get('mode', 'whole')}) "
            f"| {r['dtype']} | {r['total_s']} | {s['load_finetuned']:.2f} "
            f"| {s['fisher_task']:.2f} | {s['load_base']:.2f} | {s['fisher_honesty']:.2f} "
            f"| {s['select']:.2f} | {s['hessian']:.2f} | {s['compensate']:.2f} "
            f"| {s['save']:.2f} | {r['fisher_tokens_per_s']} | {r['peak_cpu_rss_gib']} "
            f"| {r['peak_gpu_gib'] if r['peak_gpu_gib'] is not None else '-'} |"
        )
    lines += ["", "Reproduce: `.venv/bin/python bench/scale.py --sizes SIZE... --device D`.", ""]
    (RESULTS / "scale.md").write_text("\n".join(lines))
    _plot(rows)


def _plot(rows: list[dict[str, Any]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for device in sorted({r["device"] for r in rows}):
        mine = [r for r in rows if r["device"] == device]
        params = [r["params"] for r in mine]
        left.plot(params, [r["total_s"] for r in mine], "o-", label=device)
        right.plot(params, [r["peak_cpu_rss_gib"] for r in mine], "o-", label=f"{device} RSS")
        if any(r["peak_gpu_gib"] for r in mine):
            right.plot(params, [r["peak_gpu_gib"] for r in mine], "s--", label=f"{device} GPU")
    for axis, label in ((left, "end-to-end seconds"), (right, "peak memory GiB")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("parameters")
        axis.set_ylabel(label)
        axis.legend()
        axis.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "scale.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", nargs="+", default=["llama-20m", "llama-64m"], choices=list(SIZES)
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--hessian-budget-mb", type=int, default=4096)
    parser.add_argument("--layerwise", action="store_true")
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="layer-by-layer dry run on weights generated on the device (no disk, no save)",
    )
    parser.add_argument("--work", type=Path, default=ROOT / ".hcnr" / "bench")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child and args.synthetic:
        result = run_synthetic(Path(args.child), args.device, args.hessian_budget_mb)
        print("RESULT " + json.dumps(result))
        return
    if args.child:  # one repair, in a fresh process, result on stdout
        result = run_one(
            Path(args.child), args.device, args.dtype, args.hessian_budget_mb, args.layerwise
        )
        print("RESULT " + json.dumps(result))
        return

    RESULTS.mkdir(parents=True, exist_ok=True)
    store = RESULTS / "scale.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    for size in args.sizes:
        started = time.perf_counter()
        root = build(size, args.work, weights=not args.synthetic)
        print(f"{size}: checkpoint ready in {time.perf_counter() - started:.1f}s", flush=True)
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(root),
                "--device",
                args.device,
                "--dtype",
                args.dtype,
                "--hessian-budget-mb",
                str(args.hessian_budget_mb),
                *(["--layerwise"] if args.layerwise else []),
                *(["--synthetic"] if args.synthetic else []),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        line = [x for x in child.stdout.splitlines() if x.startswith("RESULT ")]
        if child.returncode != 0 or not line:
            print(child.stdout[-3000:], child.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{size}: repair failed (exit {child.returncode})")
        result = json.loads(line[0].removeprefix("RESULT "))
        mode = "layerwise" if args.layerwise else "whole"
        mode = "synthetic-layerwise-dry-run" if args.synthetic else mode
        result.update(
            size=size,
            mode=mode,
            params=param_count(SIZES[size]),
            device=args.device,
            dtype=args.dtype,
            machine=machine(args.device),
            measured_at=time.strftime("%Y-%m-%d"),
        )
        results[f"{result['machine']}|{args.device}|{args.dtype}|{mode}|{size}"] = result
        print(json.dumps(result), flush=True)
        store.write_text(json.dumps(results, indent=2) + "\n")
        render(results)


if __name__ == "__main__":
    main()
