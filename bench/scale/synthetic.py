"""`--synthetic`: a layer-by-layer dry run on weights generated on the device."""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path
from typing import Any

from bench.scale.measure import repair_figures


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
    from hcnr_core.config import RunOptions
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
    cfg = RepairConfig(dtype="bfloat16", max_seq_len=128)
    options = RunOptions(device=device, hessian_budget_mb=budget_mb, layerwise=True)
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
    report = RepairPipeline(cfg, options).run(prepared, None)
    return repair_figures(report, prepared, time.perf_counter() - started, device)
