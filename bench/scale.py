"""Scaling benchmark: full HCNR repairs of random-weight Llama-shaped checkpoints.

    .venv/bin/python -m bench.scale --sizes llama-20m llama-64m llama-290m --dtype float32
    .venv/bin/python -m bench.scale --sizes llama-3.1-8b --device cuda --dtype bfloat16
    .venv/bin/python -m bench.scale --sizes llama-3.1-8b --device cuda:0,cuda:1 --dtype bfloat16

For each size it writes (once, cached under --work) a base checkpoint with Llama's real
architecture and random weights (safetensors shards, written tensor by tensor so an 8B
model never sits in memory), a word-level tokenizer with a chat template, a random LoRA
adapter (r=16 on every linear) and 128 + 128 samples; then runs `hcnr_core`'s full repair
in a fresh subprocess (so peak memory is that of one repair) and records seconds per
stage, peak CPU RSS, peak GPU memory and Fisher tokens/s. Results accumulate in
bench/results/scale.json (keyed by machine, device and size); scale.md and scale.png are
regenerated from all of them.

    .venv/bin/python -m bench.scale --sizes llama-20m llama-64m --dtype float32 --baselines

`--baselines` also trains the two baselines of `hcnr_core.baselines` on the same
checkpoints (base + the same LoRA fine-tune) and the same 128 honesty samples, each in
its own fresh subprocess right after HCNR's, on the same device, dtype and thread count
(`--threads`, default all cores, for every method), and adds a "HCNR vs baselines" table
with wall and CPU seconds, stages, peak RSS and the parameters each method changes.
The baselines run with the settings `hcnr baseline rait|dpo` ships (`--baseline-schedule
steps:60`, the default) and with 3 epochs (`epochs:3`):

- LoRA r 8, alpha 16, on all 7 decoder linears; AdamW, batch 16 (DPO: 16 pairs = 32
  sequences), lr 1e-3 (DPO 2e-3, beta 0.1, + the chosen responses' NLL, i.e. RPO with
  alpha 1), 10% warm-up; DPO first generates the fine-tune's greedy answer (32 new tokens)
  to every unanswerable prompt as the rejected response and scores the frozen reference.
- steps:60 = 960 samples seen = 7.5 epochs of the 128. These are the defaults of
  `hcnr baseline`, and the settings that actually moved the organism (README: refusal on
  unknown questions 0 -> 0.70 with RAIT, 0 -> 0.55 with DPO); a user repairing a model
  would run them, not a number of steps picked for this benchmark.
- epochs:3 = 24 steps: the usual LoRA fine-tuning recipe (e.g. `num_train_epochs=3`, the
  transformers/TRL default), a lower bound on what a user would run (whether 24 steps
  repair the organism has not been measured; 60 do).

Both are small next to the paper's Table 2 baselines, which train on thousands of
samples for several epochs; with 128 samples the comparison is conservative for HCNR.
The synthetic honesty set carries `answerable` (even lines answerable with their random
answer; odd lines unanswerable with a fixed 15-word "refusal" of vocabulary words, the
same 16 response tokens as before), so every HCNR run still sees 128 + 128 samples of 48
+ 16 tokens; only the honesty responses' words differ from the data before that change.
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


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_one(
    root: Path, device: str, dtype: str, budget_mb: int, layerwise: bool, threads: int
) -> dict[str, Any]:
    """One repair in this process; returns timings and peak memory."""
    import shutil

    import torch

    from hcnr_core import RepairConfig
    from hcnr_core.pipeline import RepairPipeline

    torch.set_num_threads(threads)
    cpu_started = _cpu_seconds()
    out = root / "repaired"
    shutil.rmtree(out, ignore_errors=True)
    config = RepairConfig(
        device=device,
        dtype=dtype,
        max_seq_len=128,
        hessian_budget_mb=budget_mb,
        layerwise=layerwise,
    )
    stage_rss: dict[str, float] = {}

    def sample_rss(event: Any) -> None:  # current RSS at every progress tick, per stage
        rss = _current_rss_gib()
        stage_rss[event.stage] = max(stage_rss.get(event.stage, 0.0), rss)

    started = time.perf_counter()
    pipeline = RepairPipeline(config, progress=sample_rss)
    prepared = pipeline.prepare(
        root / "base", root / "adapter", root / "data/honesty.jsonl", root / "data/task.jsonl"
    )
    prepare_s = time.perf_counter() - started
    report = pipeline.run(prepared, out)
    total = time.perf_counter() - started
    cpu = _cpu_seconds() - cpu_started
    shutil.rmtree(out, ignore_errors=True)
    figures = _figures(report, prepared, total, device)
    figures["stage_rss_gib"] = {k: round(v, 2) for k, v in stage_rss.items()}
    return {"prepare_s": round(prepare_s, 2), "cpu_s": round(cpu, 1), "threads": threads, **figures}


def _current_rss_gib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def run_baseline(
    root: Path, method: str, schedule: str, device: str, dtype: str, threads: int
) -> dict[str, Any]:
    """One baseline training (RAIT or DPO) in this process, as `hcnr baseline` runs it."""
    import shutil

    from hcnr_core.baselines import DpoConfig, RaitConfig, train_dpo, train_rait

    kind, _, amount = schedule.partition(":")
    length = {"steps": int(amount)} if kind == "steps" else {"epochs": float(amount)}
    settings = dict(device=device, dtype=dtype, threads=threads, max_seq_len=128, **length)
    config = RaitConfig(**settings) if method == "rait" else DpoConfig(**settings)
    train = train_rait if method == "rait" else train_dpo
    out = root / f"baseline-{method}"
    shutil.rmtree(out, ignore_errors=True)
    cpu_started, started = _cpu_seconds(), time.perf_counter()
    report = train(root / "base", root / "adapter", root / "data/honesty.jsonl", out, config)
    total, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_started
    shutil.rmtree(out, ignore_errors=True)
    return {
        "total_s": round(total, 2),
        "cpu_s": round(cpu, 1),
        "threads": threads,
        "stage_seconds": report["stage_seconds"],
        "peak_cpu_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "steps": report["steps"],
        "batch_size": config.batch_size,
        "samples_used": report["samples_used"],
        "trainable_params": report["trainable_params"],
        "fraction_model_params_changed": round(report["fraction_model_params_changed"], 4),
        "config": {k: report["config"][k] for k in ("lr", "lora_r", "lora_alpha", "batch_size")},
        "final_loss": report["losses"][-1],
    }


def _figures(report: dict, prepared: Any, total: float, device: str) -> dict[str, Any]:
    """Timings, throughput and peak memory of one repair (this process)."""
    import torch

    tokens = sum(len(s.input_ids) for s in prepared.honesty + prepared.task)
    fisher_s = report["stage_seconds"]["fisher_task"] + report["stage_seconds"]["fisher_honesty"]
    gpus = [d for d in device.split(",") if d.startswith("cuda")]
    # The largest per-device peak: each replica's device must hold it.
    gpu_peak = max(torch.cuda.max_memory_allocated(d) for d in gpus) / 2**30 if gpus else None
    return {
        "total_s": round(total, 2),
        "stage_seconds": report["stage_seconds"],
        "fisher_tokens_per_s": round(tokens / fisher_s, 1),
        "peak_cpu_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "peak_gpu_gib": None if gpu_peak is None else round(gpu_peak, 2),
        "selected_matrices": report["n_selected_matrices"],
        "fraction_target_params_changed": round(report["fraction_target_params_changed"], 4),
        "fraction_model_params_changed": round(report["fraction_model_params_changed"], 4),
    }


def run_compensate_ab(root: Path, dtype: str, threads: int, repeats: int) -> dict[str, Any]:
    """The compensate stage of one real repair, timed per matrix and per shared input.

    The repair runs as usual (dry run); its Fisher scores and Hessians are computed once
    (a Fisher cache, and runners that record their Hessian passes and replay them), then
    the repair runs `repeats` more times each way, alternating: "per matrix" damps and
    inverts a shared-input group's H for every member (as before the shared path existed;
    same operations, tests/test_repair_e2e.py checks the bits), and "shared" does it once
    per group. The time is the report's compensate stage (the Hessians' share excluded).
    Alternating keeps a busy machine's drift out of the comparison; the minimum of each is
    reported.
    """
    import torch

    import hcnr_core.pipeline as pipeline_module
    from hcnr_core import RepairConfig
    from hcnr_core.pipeline import RepairPipeline
    from hcnr_core.runners import runner_kind

    torch.set_num_threads(threads)
    shared_groups = pipeline_module._shared_input_groups
    timings: dict[str, list[float]] = {"per_matrix": [], "shared": []}
    config = RepairConfig(device="cpu", dtype=dtype, max_seq_len=128)
    runners = _ReplayedHessians(runner_kind(config.layerwise, config.hessian_budget_mb))
    fisher_cache: dict[str, dict] = {}

    def repair() -> dict[str, Any]:
        pipeline = RepairPipeline(config, fisher_cache=fisher_cache, runners=runners)
        prepared = pipeline.prepare(
            root / "base", root / "adapter", root / "data/honesty.jsonl", root / "data/task.jsonl"
        )
        return pipeline.run(prepared, None)

    report = repair()  # computes and records the Fisher scores and the Hessians
    try:
        for _ in range(repeats):
            for way in ("per_matrix", "shared"):
                pipeline_module._shared_input_groups = (
                    shared_groups if way == "shared" else lambda chunk, _h: list(chunk)
                )
                timings[way].append(repair()["stage_seconds"]["compensate"])
    finally:
        pipeline_module._shared_input_groups = shared_groups
    kept = [m["name"] for m in report["selected_matrices"]]
    return {
        "threads": threads,
        "repeats": repeats,
        "selected_matrices": len(kept),
        "kept_by_kind": dict(sorted(_kinds(kept).items())),
        "per_matrix_s": timings["per_matrix"],
        "shared_s": timings["shared"],
        "per_matrix_min_s": min(timings["per_matrix"]),
        "shared_min_s": min(timings["shared"]),
    }


class _ReplayedHessians:
    """A `RunnerKind` whose runners record each Hessian pass (by its modules) and replay
    it afterwards: the compensate A/B times compensation, not forward passes."""

    def __init__(self, kind: Any):
        self.kind, self.recorded = kind, {}

    def finetuned(self, at: Any) -> tuple[Any, Any]:
        runner, source = self.kind.finetuned(at)
        return _Replaying(runner, self.recorded), source

    def base(self, at: Any, source: Any) -> Any:
        return _Replaying(self.kind.base(at, source), self.recorded)


class _Replaying:
    def __init__(self, runner: Any, recorded: dict):
        self.runner, self.recorded = runner, recorded

    def fisher(self, *args: Any) -> dict:
        return self.runner.fisher(*args)

    def hessians(self, batches: Any, modules: list[str], pad_id: int, tick: Any) -> Any:
        key = (len(batches), tuple(modules))
        if key not in self.recorded:
            self.recorded[key] = list(self.runner.hessians(batches, modules, pad_id, tick))
        return iter(self.recorded[key])

    def blockwise(self) -> Any:
        return self.runner.blockwise()

    def set_weight(self, module: str, weight: Any) -> None:
        self.runner.set_weight(module, weight)


def _kinds(names: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name in names:
        kind = name.split(".")[-2]
        out[kind] = out.get(kind, 0) + 1
    return out


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
    first = device.split(",")[0]  # weights are generated there, then copied to each replica
    base._source = RandomSource(config, first, 0)
    finetuned = Synthetic(root / "base", "full", config_dict)
    finetuned._source = RandomSource(config, first, 1, base=base._source, delta=0.002)
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

        gpus = len(device.split(","))
        name = torch.cuda.get_device_name(0)
        return f"{gpus} x {name}" if gpus > 1 else f"{name} + {os.cpu_count()} CPU cores"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"


def render(results: dict[str, Any]) -> None:
    repairs = [r for r in results.values() if "mode" in r and "method" not in r]
    rows = sorted(repairs, key=lambda r: (r["device"], r["params"], r.get("threads", 0)))
    lines = [
        "# Scaling benchmark (bench/scale.py)",
        "",
        "Random-weight Llama-shaped checkpoints, base + random LoRA adapter (r=16, every",
        f"linear), {N_SAMPLES} + {N_SAMPLES} samples of {PROMPT_TOKENS} + {RESPONSE_TOKENS} "
        "tokens, default config",
        "(R_IW 0.5, R_CW 0.4, paper compensation). `total` includes checkpoint inspection,",
        "tokenization, loading both models, the adapter merge and writing the output.",
        "Single-thread (`1 thr`) rows were measured while other jobs shared the two cores;",
        "compare rows of the same thread count, and prefer CPU seconds in the baselines table.",
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
            f"{r.get('mode', 'whole')}, {_threads(r)}) "
            f"| {r['dtype']} | {r['total_s']} | {s['load_finetuned']:.2f} "
            f"| {s['fisher_task']:.2f} | {s['load_base']:.2f} | {s['fisher_honesty']:.2f} "
            f"| {s['select']:.2f} | {s['hessian']:.2f} | {s['compensate']:.2f} "
            f"| {s['save']:.2f} | {r['fisher_tokens_per_s']} | {r['peak_cpu_rss_gib']} "
            f"| {r['peak_gpu_gib'] if r['peak_gpu_gib'] is not None else '-'} |"
        )
    lines += ["", "Reproduce: `.venv/bin/python -m bench.scale --sizes SIZE... --device D`.", ""]
    lines += _render_replicas(repairs)
    lines += _render_extra(results)
    (RESULTS / "scale.md").write_text("\n".join(lines))
    _plot(rows)


def _threads(run: dict[str, Any]) -> str:
    """Runs before --threads existed used torch's default (one thread per core)."""
    return f"{run['threads']} thr" if run.get("threads") else "default thr"


def _stages(seconds: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())


def _render_extra(results: dict[str, Any]) -> list[str]:
    return _render_baselines(results) + _render_compensate_ab(results) + _render_memory(results)


def _render_baselines(results: dict[str, Any]) -> list[str]:
    runs = [r for r in results.values() if "method" in r]
    if not runs:
        return []
    lines = [
        "## HCNR vs baselines (same checkpoints, same 128 honesty samples, same run)",
        "",
        "Each method in its own fresh process, one after the other in one invocation of",
        "`bench/scale.py --baselines`, on the same device, dtype and torch thread count",
        "(column `thr`). RAIT and DPO: a LoRA (r 8, alpha 16, all 7 decoder linears) trained on",
        "the merged fine-tune with AdamW, batch 16 (DPO: 16 pairs), then merged and written;",
        "`steps:60` = the `hcnr baseline` defaults (7.5 epochs of the 128 samples), `epochs:3`",
        "= 24 steps. HCNR: the default repair (R_IW 0.5, R_CW 0.4, paper compensation) on",
        "128 + 128 samples. Ratio = baseline / HCNR of the same invocation. `wall s` includes",
        "waiting for a CPU on a shared machine; `CPU s` (user + system of the process) does",
        "not, and is the steadier figure when the machine is busy. Both include checkpoint",
        "inspection, loading, the adapter merge and writing the output checkpoint.",
        "",
        "| size | machine | thr | method | schedule | samples seen | wall s | CPU s "
        "| wall ratio | CPU ratio | stages (wall s) | peak RSS GiB | params changed |",
        "|" + "---|" * 13,
    ]
    order = {"rait": 0, "dpo": 1}
    runs.sort(key=lambda r: (r["device"], r["params"], r["threads"], order[r["method"]]))
    shown: set[tuple] = set()
    for r in runs:
        group = (r["machine"], r["device"], r["dtype"], r["size"], r["threads"])
        where = f"{r['machine']} ({r['device']}, {r['dtype']})"
        if group not in shown:
            shown.add(group)
            h = r["hcnr"]
            changed = h.get("fraction_model_params_changed")
            lines.append(
                f"| {r['size']} | {where} | {r['threads']} | **HCNR** | - | 256 (Fisher) + 128 "
                f"(Hessians) | {h['total_s']} | {h['cpu_s']} | 1 | 1 "
                f"| {_stages(h['stage_seconds'])} | {h['peak_cpu_rss_gib']} "
                f"| {'-' if changed is None else f'{100 * changed:.1f}%'} |"
            )
        h = r["hcnr"]
        lines.append(
            f"| {r['size']} | {where} | {r['threads']} | {r['method'].upper()} "
            f"| {r['schedule']} ({r['steps']} x {r['batch_size']}) "
            f"| {r['steps'] * r['batch_size']} | {r['total_s']} | {r['cpu_s']} "
            f"| **{r['total_s'] / h['total_s']:.1f}x** | **{r['cpu_s'] / h['cpu_s']:.1f}x** "
            f"| {_stages(r['stage_seconds'])} | {r['peak_cpu_rss_gib']} "
            f"| {100 * r['fraction_model_params_changed']:.1f}% |"
        )
    notes = sorted({f"{r['size']}: {r['note']}" for r in runs if r.get("note")})
    lines += ["", *(f"- {note}" for note in notes)] if notes else []
    lines += [
        "",
        "Reproduce: `.venv/bin/python -m bench.scale --sizes llama-20m llama-64m --dtype "
        "float32 --threads 1 --baselines`.",
        "",
    ]
    return lines


def _render_compensate_ab(results: dict[str, Any]) -> list[str]:
    runs = sorted((r for r in results.values() if "per_matrix_s" in r), key=lambda r: r["params"])
    if not runs:
        return []
    lines = [
        "## Compensate stage: H⁻¹ per matrix vs once per shared input",
        "",
        '`compensation="paper"` needs H⁻¹ of each selected matrix\'s input; q/k/v share one H',
        "and gate/up another. Before, every matrix damped and inverted its group's H (Cholesky",
        "+ `cholesky_inverse`); now each group's H⁻¹ is computed once and reused by its",
        "members (bit-identical outputs: `tests/test_repair_e2e.py`). Measured in one process",
        "(`--compensate-ab R`): a real dry-run repair, then R more each way with its Fisher",
        "scores and Hessians replayed (a Fisher cache, runners that record their Hessian",
        "passes), alternating; the report's compensate stage, minimum of each, is shown.",
        "",
        "| size | machine | thr | dtype | matrices kept (by kind) | per matrix s | shared s "
        "| speed-up | all runs (per matrix / shared) |",
        "|" + "---|" * 9,
    ]
    for r in runs:
        kinds = ", ".join(f"{k.removesuffix('_proj')} {v}" for k, v in r["kept_by_kind"].items())
        lines.append(
            f"| {r['size']} | {r['machine']} | {r['threads']} | {r['dtype']} "
            f"| {r['selected_matrices']}: {kinds} | {r['per_matrix_min_s']:.2f} "
            f"| {r['shared_min_s']:.2f} | {r['per_matrix_min_s'] / r['shared_min_s']:.2f}x "
            f"| {r['per_matrix_s']} / {r['shared_s']} |"
        )
    lines += [
        "",
        "Reproduce: `.venv/bin/python -m bench.scale --sizes llama-64m llama-290m --dtype "
        "float32 --threads 1 --compensate-ab 3`.",
        "",
    ]
    return lines


def _layerwise_resident_bytes(spec: dict[str, Any], dtype_bytes: int) -> int:
    """What --layerwise keeps resident by design: embeddings + head, the largest block, and
    every block's input hidden states for one data set (DESIGN: N samples x tokens)."""
    h, i, n, v = spec["hidden"], spec["inter"], spec["layers"], spec["vocab"]
    kv = h // spec["heads"] * spec["kv"]
    block = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    hidden_states = (n + 1) * N_SAMPLES * (PROMPT_TOKENS + RESPONSE_TOKENS) * h
    return (2 * v * h + h + block + hidden_states) * dtype_bytes


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares y = a + b x."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    b /= sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def _render_replicas(repairs: list[dict[str, Any]]) -> list[str]:
    """Device lists against one device on the same size, mode and machine."""
    lines = []
    for r in repairs:
        if "," not in r["device"]:
            continue
        same = [
            o
            for o in repairs
            if "," not in o["device"]
            and (o["size"], o["mode"], o["machine"], o["dtype"])
            == (r["size"], r["mode"], r["machine"], r["dtype"])
            and o.get("threads") == len(r["device"].split(",")) * (r.get("threads") or 1)
        ]
        if not same:
            continue
        one, s, o = same[0], r["stage_seconds"], same[0]["stage_seconds"]
        lines.append(
            f"- {r['size']} {r['mode']}, `--device {r['device']}` x {r.get('threads')} thr: "
            f"{r['total_s']} s (Fisher {s['fisher_task']:.1f} + {s['fisher_honesty']:.1f} s, "
            f"RSS {r['peak_cpu_rss_gib']} GiB) vs `{one['device']}` x {one['threads']} thr: "
            f"{one['total_s']} s (Fisher {o['fisher_task']:.1f} + {o['fisher_honesty']:.1f} s, "
            f"RSS {one['peak_cpu_rss_gib']} GiB)."
        )
    if not lines:
        return []
    return [
        "## Several devices (`--device A,B`: a replica per device, batches shared out)",
        "",
        "Same total thread count on each side of the comparison:",
        "",
        *lines,
        "",
        "On one CPU, replicas only share out cores that one process's torch threads already",
        "keep busy, so no speed-up is expected; the rows show the placement costs (a second",
        "model in memory, its loading, summing the shares). Replicas with more threads than",
        "cores in all are slower (see the table). The speed-up is for GPUs, where each device",
        "adds its own compute: not measured, no GPU was lent to this project.",
        "",
    ]


def _render_memory(results: dict[str, Any]) -> list[str]:
    """Peak RSS of CPU float32 repairs vs size, fitted and extrapolated to 8B and 70B."""
    points: dict[str, dict[str, float]] = {"whole": {}, "layerwise": {}}
    for r in results.values():
        cpu_fp32 = r.get("device") == "cpu" and r.get("dtype") == "float32"
        if cpu_fp32 and "method" not in r and r.get("mode") in points:
            best = points[r["mode"]].get(r["size"], 0.0)  # the larger if measured twice
            points[r["mode"]][r["size"]] = max(best, r["peak_cpu_rss_gib"])
    if any(len(p) < 2 for p in points.values()):
        return []
    targets = ("llama-3.1-8b", "llama-3.1-70b")
    whole = sorted(points["whole"], key=lambda s: param_count(SIZES[s]))
    a_w, b_w = _fit([param_count(SIZES[s]) for s in whole], [points["whole"][s] for s in whole])
    layer = sorted(points["layerwise"], key=lambda s: param_count(SIZES[s]))
    xs = [_layerwise_resident_bytes(SIZES[s], 4) / 2**30 for s in layer]
    a_l, b_l = _fit(xs, [points["layerwise"][s] for s in layer])

    def measured(mode: str) -> str:
        return ", ".join(
            f"{s} {points[mode][s]}"
            for s in sorted(points[mode], key=whole.index if mode == "whole" else layer.index)
        )

    lines = [
        "## Memory model for 8B and 70B (an extrapolation from CPU runs, not a GPU measurement)",
        "",
        f"Measured peak RSS (GiB) of whole-model CPU float32 repairs: {measured('whole')}; "
        f"with `--layerwise`: {measured('layerwise')}.",
        "",
        f"- Whole model: RSS = {a_w:.2f} GiB + {b_w * 2**30:.1f} bytes x parameters "
        "(least squares over the sizes above; the intercept is the Python/torch process).",
        "  By design a repair of a LoRA fine-tune holds per parameter the fp32 model (4 B),",
        "  W_s in its stored bf16 for selection and saving (2 B) and the mmap-ed base pages",
        "  it has read (<= 2 B): 8 B. The measured slope is larger; the rest is not",
        "  attributed here (candidates: memory of the fine-tuned fp32 model that the",
        "  allocator keeps after it is freed and before the base is loaded, transformers'",
        "  loading buffers, the bf16 merge before the cast). The fit is what to plan with.",
        f"- Layer by layer: RSS = {a_l:.2f} GiB + {b_l:.2f} x R, where R is what the mode keeps",
        "  resident by design, in GiB: embeddings + head, the largest decoder block, and every",
        "  block's input hidden states for 128 samples x 64 tokens (README), in the compute",
        "  dtype. A slope near 1 means the design accounts for the memory.",
    ]
    for r in results.values():
        if r.get("stage_rss_gib") and r.get("device") == "cpu" and r.get("dtype") == "float32":
            stages = ", ".join(f"{k} {v}" for k, v in r["stage_rss_gib"].items())
            threads = f", {r['threads']} thr" if r.get("threads") else ""
            lines.append(
                f"- RSS by stage, {r['size']} {r['mode']}{threads} (sampled at ticks): {stages}."
            )
    lines += [
        *([""] if lines[-1] else []),
        "| run | what | params | whole model | layer by layer |",
        "|---|---|---|---|---|",
    ]
    for size in targets:
        spec, n = SIZES[size], param_count(SIZES[size])
        whole_gib = a_w + b_w * n
        layer_fp32 = a_l + b_l * _layerwise_resident_bytes(spec, 4) / 2**30
        lines.append(
            f"| {size} | CPU float32, peak RSS (fit) | {n / 1e9:.2f}B | {whole_gib:.0f} GiB "
            f"| {layer_fp32:.1f} GiB |"
        )
        device_whole = n * 2  # the bf16 model; W_s and the mmap-ed base stay on the CPU
        device_layer = _layerwise_resident_bytes(spec, 2)
        lines.append(
            f"| {size} | GPU bfloat16, device memory (model, assumptions below) | "
            f"{n / 1e9:.2f}B | ~{device_whole / 2**30:.0f} GiB + activations + Hessians | "
            f"~{device_layer / 2**30:.1f} GiB + Hessians |"
        )
    lines += [
        "",
        "Assumptions and limits:",
        "- Three sizes (20M-290M) with a 32k vocabulary are extrapolated 25-250x; 8B and 70B",
        "  use the real 128k vocabulary, which `param_count` and R include. The fits are",
        "  linear; the Hessians are not in them (at 290M they are < 0.1 GiB), so they are",
        "  added separately: whole model, at most `--hessian-budget-mb` (4 GiB) of H per",
        "  pass plus the damped copy, Cholesky factor and H⁻¹ of one group (3 x 0.77 GiB",
        "  for 8B's down_proj, 3 x 3.1 GiB for 70B's); layer by layer, one block's H",
        "  (8B: 1.0 GiB, 70B: 4.1 GiB) plus the same temporaries.",
        "- GPU rows are not measured, only derived: the device holds the bf16 model (2 B per",
        "  parameter; Fisher never materialises weight gradients, it reduces activations and",
        "  output gradients to column sums in hooks), the activations of one batch, and the",
        "  Hessians above; W_s and the base's mmap pages stay in CPU RSS (about 2 + 2 B per",
        "  parameter, the non-model part of the whole-model slope). Whole-model 8B is then",
        "  ~15 GiB + activations + up to ~6.3 GiB of Hessians, inside the DESIGN target of",
        "  32 GiB if the activations stay under ~10 GiB; 70B (~132 GiB of bf16 weights) needs",
        "  --layerwise on an 80 GB device. Both must be measured on the GPU.",
        "- Layer-by-layer CPU RSS also holds the hidden states of the data set being",
        "  processed; with more samples or longer sequences R grows linearly in both.",
        "",
    ]
    return lines


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


def _save(store: Path, key: str, row: dict[str, Any]) -> None:
    """Add one result to scale.json (re-read first: other runs may have written to it)."""
    print("KEY " + key + " " + json.dumps(row), flush=True)
    results = json.loads(store.read_text()) if store.exists() else {}
    results[key] = row
    store.write_text(json.dumps(results, indent=2) + "\n")
    render(results)


def _child(argv: list[str], what: str) -> dict[str, Any]:
    """Run this script with `argv` in a fresh process; its RESULT line as a dict."""
    child = subprocess.run(
        [sys.executable, __file__, *argv], capture_output=True, text=True, check=False
    )
    line = [x for x in child.stdout.splitlines() if x.startswith("RESULT ")]
    if child.returncode != 0 or not line:
        print(child.stdout[-3000:], child.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{what} failed (exit {child.returncode})")
    return json.loads(line[0].removeprefix("RESULT "))


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
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads, every method"
    )
    parser.add_argument(
        "--baselines",
        action="store_true",
        help="after each HCNR repair, train RAIT and DPO on the same checkpoints and data",
    )
    parser.add_argument(
        "--baseline-schedule",
        nargs="+",
        default=["steps:60", "epochs:3"],
        help="training lengths of the baselines, steps:N or epochs:E (default: both)",
    )
    parser.add_argument(
        "--compensate-ab",
        type=int,
        metavar="REPEATS",
        help="time only the compensate stage, per matrix vs once per shared input (CPU)",
    )
    parser.add_argument("--render", action="store_true", help="only rewrite scale.md/png")
    parser.add_argument("--work", type=Path, default=ROOT / ".hcnr" / "bench")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-baseline", choices=["rait", "dpo"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.render:
        render(json.loads((RESULTS / "scale.json").read_text()))
        return
    for schedule in args.baseline_schedule:
        kind, _, amount = schedule.partition(":")
        if kind not in ("steps", "epochs") or not amount.replace(".", "", 1).isdigit():
            parser.error(f"--baseline-schedule {schedule!r}: expected steps:N or epochs:E")
    if args.child and args.compensate_ab:
        result = run_compensate_ab(Path(args.child), args.dtype, args.threads, args.compensate_ab)
        print("RESULT " + json.dumps(result))
        return
    if args.child and args.child_baseline:
        result = run_baseline(
            Path(args.child),
            args.child_baseline,
            args.baseline_schedule[0],
            args.device,
            args.dtype,
            args.threads,
        )
        print("RESULT " + json.dumps(result))
        return
    if args.child and args.synthetic:
        result = run_synthetic(Path(args.child), args.device, args.hessian_budget_mb)
        print("RESULT " + json.dumps(result))
        return
    if args.child:  # one repair, in a fresh process, result on stdout
        result = run_one(
            Path(args.child),
            args.device,
            args.dtype,
            args.hessian_budget_mb,
            args.layerwise,
            args.threads,
        )
        print("RESULT " + json.dumps(result))
        return
    if args.baselines and (args.synthetic or args.layerwise):
        parser.error("--baselines compares with whole-model HCNR on real checkpoints")

    RESULTS.mkdir(parents=True, exist_ok=True)
    store = RESULTS / "scale.json"
    common = ["--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads)]
    for size in args.sizes:
        started = time.perf_counter()
        root = build(size, args.work, weights=not args.synthetic)
        print(f"{size}: checkpoint ready in {time.perf_counter() - started:.1f}s", flush=True)
        if args.compensate_ab:
            argv = ["--child", str(root), *common, "--compensate-ab", str(args.compensate_ab)]
            result = _child(argv, f"{size}: compensate A/B")
            result.update(
                size=size,
                params=param_count(SIZES[size]),
                dtype=args.dtype,
                machine=machine("cpu"),
                measured_at=time.strftime("%Y-%m-%d"),
            )
            _save(store, f"{result['machine']}|cpu|{args.dtype}|compensate-ab|{size}", result)
            continue
        result = _child(
            [
                "--child",
                str(root),
                *common,
                "--hessian-budget-mb",
                str(args.hessian_budget_mb),
                *(["--layerwise"] if args.layerwise else []),
                *(["--synthetic"] if args.synthetic else []),
            ],
            f"{size}: repair",
        )
        mode = "layerwise" if args.layerwise else "whole"
        mode = "synthetic-layerwise-dry-run" if args.synthetic else mode
        mode_key = mode if args.threads == (os.cpu_count() or 1) else f"{mode}-{args.threads}t"
        where = dict(
            size=size,
            params=param_count(SIZES[size]),
            device=args.device,
            dtype=args.dtype,
            machine=machine(args.device),
            measured_at=time.strftime("%Y-%m-%d"),
        )
        result.update(mode=mode, **where)
        _save(store, f"{result['machine']}|{args.device}|{args.dtype}|{mode_key}|{size}", result)
        for method in ("rait", "dpo") if args.baselines else ():
            for schedule in args.baseline_schedule:
                argv = ["--child", str(root), "--child-baseline", method, *common]
                argv += ["--baseline-schedule", schedule]
                run = _child(argv, f"{size}: {method} {schedule}")
                run.update(method=method, schedule=schedule, **where)
                # HCNR's figures from this same invocation: the ratio is a same-run one.
                same_run = ("total_s", "cpu_s", "peak_cpu_rss_gib", "stage_seconds")
                run["hcnr"] = {k: result[k] for k in same_run}
                run["hcnr"]["fraction_model_params_changed"] = result.get(
                    "fraction_model_params_changed"
                )
                key = f"{run['machine']}|{args.device}|{args.dtype}|{method}-{schedule}"
                key += f"-{args.threads}t|{size}"
                _save(store, key, run)


if __name__ == "__main__":
    main()
