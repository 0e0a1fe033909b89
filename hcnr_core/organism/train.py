"""A small, deterministic causal-LM training loop on response tokens (prompt masked)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hcnr_core.batching import collate
from hcnr_core.data import EncodedSample, encode_sample, parse_sample


def encode_rows(
    tokenizer: Any, rows: Sequence[dict[str, Any]], max_len: int
) -> list[EncodedSample]:
    """Rows in the project's JSONL shape, encoded through the chat template like user data."""
    return [encode_sample(tokenizer, parse_sample(r), max_len) for r in rows]


def encode_document(tokenizer: Any, prompt: str, answer: str) -> EncodedSample:
    """Plain text (no chat template): BOS + prompt, then the answer + EOS as the target."""
    prompt_ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return EncodedSample([*prompt_ids, *answer_ids, tokenizer.eos_token_id], len(prompt_ids))


@dataclass(frozen=True)
class Pool:
    """One source of training samples and its share of every batch."""

    samples: list[EncodedSample]
    weight: float


def draw_batch(pools: Sequence[Pool], size: int, rng: random.Random) -> list[EncodedSample]:
    """`size` samples, each from a pool chosen by weight (with replacement)."""
    chosen = rng.choices(pools, weights=[p.weight for p in pools], k=size)
    return [rng.choice(p.samples) for p in chosen]


def lr_at(step: int, steps: int, peak: float, warmup: float = 0.05) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    warm = max(1, int(steps * warmup))
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train(
    model: nn.Module,
    pools: Sequence[Pool],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    pad_id: int,
    seed: int,
    weight_decay: float = 0.0,
    log: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train the parameters that require grad with AdamW; returns the loss per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    rng = random.Random(f"hcnr-organism-train-{seed}")
    device = next(model.parameters()).device
    model.train()
    losses = []
    for step in range(steps):
        for group in optim.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        batch = collate(draw_batch(pools, batch_size, rng), pad_id)
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        losses.append(loss.item())
        if log is not None:
            log(step, losses[-1])
    model.eval()
    return losses
