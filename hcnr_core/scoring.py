"""Statistics gathered by running a model: per-sample column Fisher and input Hessians.

`ColumnFisher` follows the GPTQ pattern (`add_sample` then `scores`): a post-accumulate-
grad hook reduces each weight gradient to its column sums of squares at once, so no full
gradient outlives its backward step. `InputHessians` captures the inputs of target
linears on forward passes and accumulates H = (2/N_tok) Σ x xᵀ over non-padding tokens,
one H per group of matrices that read the same input tensor (q/k/v, gate/up).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hcnr_core.data import EncodedSample


def response_loss(model: nn.Module, sample: EncodedSample, device: torch.device) -> torch.Tensor:
    """Mean token NLL of the response tokens only (prompt tokens masked)."""
    ids = torch.tensor([sample.input_ids], device=device)
    keep = sample.response_len + 1  # logits of the last prompt token predict the response
    try:
        logits = model(input_ids=ids, logits_to_keep=keep).logits[0, :-1]
    except TypeError:  # architectures without logits_to_keep
        logits = model(input_ids=ids).logits[0, -keep:-1]
    targets = ids[0, sample.prompt_len :]
    return nn.functional.cross_entropy(logits.float(), targets)


class ColumnFisher:
    """s[k] = (1/N) Σ_n Σ_r (∂ℓ_n/∂W[r,k])² for every target weight, in float32."""

    def __init__(self, model: nn.Module, target_modules: Sequence[str]):
        self.model = model
        modules = dict(model.named_modules())
        self.weights = {name: modules[name].weight for name in target_modules}
        self.sums = {
            name: torch.zeros(w.shape[1], dtype=torch.float32, device=w.device)
            for name, w in self.weights.items()
        }
        self.n_samples = 0
        self.device = next(model.parameters()).device
        self._handles: list[Any] = []

    def _attach(self) -> None:
        for param in self.model.parameters():
            param.requires_grad_(False)
        for name, weight in self.weights.items():
            weight.requires_grad_(True)
            self._handles.append(weight.register_post_accumulate_grad_hook(self._reducer(name)))

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for weight in self.weights.values():
            weight.requires_grad_(False)
            weight.grad = None

    def _reducer(self, name: str) -> Any:
        def hook(param: torch.Tensor) -> None:
            self.sums[name] += param.grad.float().pow(2).sum(dim=0)
            param.grad = None

        return hook

    def add_sample(self, sample: EncodedSample) -> float:
        """One forward/backward on one sample; returns its loss."""
        self._attach()
        try:
            loss = response_loss(self.model, sample, self.device)
            loss.backward()
        finally:
            self._detach()
        self.n_samples += 1
        return loss.item()

    def scores(self) -> dict[str, torch.Tensor]:
        if self.n_samples == 0:
            raise ValueError("no samples added")
        return {name: (s / self.n_samples).cpu() for name, s in self.sums.items()}


def pad_batch(
    samples: Sequence[EncodedSample], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and attention mask."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        ids[row, : len(sample.input_ids)] = torch.tensor(sample.input_ids)
        mask[row, : len(sample.input_ids)] = 1
    return ids.to(device), mask.to(device)


class InputHessians:
    """H per input group of the target linears, from forward passes of a model."""

    def __init__(self, model: nn.Module, target_modules: Sequence[str]):
        self.model = model
        modules = dict(model.named_modules())
        self.modules = {name: modules[name] for name in target_modules}
        self.group_of: dict[str, str] = {}  # module -> leader module of its input group
        self.sums: dict[str, torch.Tensor] = {}
        self.n_tokens = 0
        self._mask: torch.Tensor | None = None
        # During the discovery pass, inputs are kept alive so that no later tensor can
        # reuse their memory and be mistaken for a shared input.
        self._seen: dict[tuple[int, tuple[int, ...]], tuple[str, torch.Tensor]] = {}

    def _hook(self, name: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape))
            if name not in self.group_of:  # first pass: discover shared inputs
                self.group_of[name] = self._seen.setdefault(key, (name, x))[0]
            if self.group_of[name] != name:
                return
            tokens = x[self._mask].float()  # (n_tok, in), padding excluded
            if name not in self.sums:
                self.sums[name] = torch.zeros(
                    x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device
                )
            self.sums[name].addmm_(tokens.T, tokens, alpha=2.0)

        return hook

    @torch.no_grad()
    def add_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self._mask = attention_mask.bool()
        self._seen = {}
        handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.modules.items()]
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1)
        finally:
            for handle in handles:
                handle.remove()
            self._seen = {}
        self.n_tokens += int(self._mask.sum())

    def hessian(self, name: str) -> torch.Tensor:
        """H of a module's input group (float32, on the model's device)."""
        if self.n_tokens == 0:
            raise ValueError("no batches added")
        return self.sums[self.group_of[name]] / self.n_tokens

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, leader in self.group_of.items():
            out.setdefault(leader, []).append(name)
        return out
