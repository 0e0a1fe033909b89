"""Statistics gathered by running a model: per-sample column Fisher and input Hessians.

`ColumnFisher` (GPTQ-style `add_batch` then `scores`) computes, for every target linear,
the per-sample column sums of squared weight gradients without ever forming a weight
gradient. For one sample with module inputs X (T × in) and output gradients G (T × out),
∂ℓ/∂W = Gᵀ X, and its column sums of squares are

    s[k] = Σ_r (Σ_t G[t,r] X[t,k])² = Σ_{t,t'} X[t,k] (G Gᵀ)[t,t'] X[t',k],

which costs T²·(in+out) instead of T·in·out (the "ghost norm" trick of DP-SGD), is exact,
and batches: the rows of a padded batch are independent samples. Weights stay frozen, so
backward computes activation gradients only. Long sequences (T ≥ in·out/(in+out)) use
the explicit per-sample gradient instead, which is then the cheaper of the two.

`InputHessians` captures the inputs of target linears on forward passes and accumulates
H = (2/N_tok) Σ x xᵀ over non-padding tokens, one H per group of matrices that read the
same input tensor (q/k/v, gate/up).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hcnr_core.batching import pad_rows
from hcnr_core.data import EncodedSample


def response_nll(
    logits: torch.Tensor, samples: Sequence[EncodedSample], width: int
) -> torch.Tensor:
    """Per-sample mean NLL of the response tokens (prompt and padding masked).

    `logits` holds the last `keep` positions of a right-padded batch `width` tokens wide,
    where `keep` reaches back to the earliest last-prompt token.
    """
    keep = logits.shape[1]
    targets = torch.full((len(samples), width), -100, dtype=torch.long)
    for row, sample in enumerate(samples):
        response = sample.input_ids[sample.prompt_len :]
        targets[row, sample.prompt_len : len(sample.input_ids)] = torch.tensor(response)
    targets = targets[:, width - keep + 1 :].to(logits.device)
    compute = torch.promote_types(logits.dtype, torch.float32)
    nll = nn.functional.cross_entropy(
        logits[:, :-1].to(compute).transpose(1, 2), targets, ignore_index=-100, reduction="none"
    )
    return nll.sum(dim=1) / (targets != -100).sum(dim=1)


def response_losses(
    model: nn.Module, samples: Sequence[EncodedSample], pad_id: int, device: torch.device
) -> torch.Tensor:
    """Per-sample response losses of a whole model on a padded batch."""
    ids, mask = pad_batch(samples, pad_id, device)
    keep = ids.shape[1] - min(s.prompt_len for s in samples) + 1
    try:
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
    except TypeError:  # architectures without logits_to_keep
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -keep:]
    return response_nll(logits, samples, ids.shape[1])


def column_grad_sq(inputs: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Σ_n Σ_r (∂ℓ_n/∂W[r,k])² from inputs (B, T, in) and output grads (B, T, out)."""
    compute = torch.promote_types(inputs.dtype, torch.float32)
    x, g = inputs.to(compute), grads.to(compute)
    t, n_in, n_out = x.shape[1], x.shape[2], g.shape[2]
    if t * (n_in + n_out) < n_in * n_out:
        gram = g @ g.transpose(1, 2)  # (B, T, T)
        return ((gram @ x) * x).sum(dim=(0, 1))
    return (g.transpose(1, 2) @ x).pow(2).sum(dim=(0, 1))  # explicit (B, out, in)


@dataclass
class FisherShare:
    """Un-normalised column sums of the samples one device scored, and their losses."""

    sums: dict[str, torch.Tensor]
    n_samples: int
    losses: list[float]


def combine_fisher(shares: Sequence[FisherShare]) -> dict[str, Any]:
    """Scores (CPU) and mean loss of one Fisher pass from its shares, added in order on
    the first share's device (one share: exactly `ColumnFisher.scores`)."""
    n_samples = sum(share.n_samples for share in shares)
    if n_samples == 0:
        raise ValueError("no samples added")
    scores = {}
    for name, total in shares[0].sums.items():
        for share in shares[1:]:
            total = total + share.sums[name].to(total.device)
        scores[name] = (total / n_samples).cpu()
    losses = [loss for share in shares for loss in share.losses]
    return {"scores": scores, "mean_loss": sum(losses) / len(losses)}


class ColumnFisher:
    """s[k] = (1/N) Σ_n Σ_r (∂ℓ_n/∂W[r,k])² for every target weight, in float32."""

    def __init__(
        self,
        model: nn.Module,
        target_modules: Sequence[str],
        pad_id: int = 0,
        device: torch.device | None = None,
    ):
        self.model = model
        modules = dict(model.named_modules())
        self.modules = {name: modules[name] for name in target_modules}
        self.device = device or next(model.parameters()).device
        self.sums = {
            name: torch.zeros(m.weight.shape[1], dtype=torch.float32, device=self.device)
            for name, m in self.modules.items()
        }
        self.n_samples = 0
        self.losses: list[float] = []
        self.pad_id = pad_id

    def _capture(self, name: str) -> Any:
        def forward_hook(_module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            inputs = args[0].detach()

            def grad_hook(grad: torch.Tensor) -> None:
                self.sums[name] += column_grad_sq(inputs, grad)

            output.register_hook(grad_hook)

        return forward_hook

    @contextmanager
    def capturing(self, names: Sequence[str] | None = None) -> Iterator[None]:
        """Within: forward passes through the named modules, then backward, add to sums."""
        chosen = self.modules if names is None else {n: self.modules[n] for n in names}
        handles = [m.register_forward_hook(self._capture(n)) for n, m in chosen.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def add_batch(self, samples: Sequence[EncodedSample]) -> list[float]:
        """One forward/backward over a padded batch; returns the per-sample losses."""
        for param in self.model.parameters():
            param.requires_grad_(False)
        # Gradients must flow to activations, not weights: start them at the embeddings.
        start = self.model.get_input_embeddings().register_forward_hook(
            lambda _m, _a, out: out.requires_grad_(True)
        )
        try:
            with self.capturing():
                losses = response_losses(self.model, samples, self.pad_id, self.device)
                losses.sum().backward()
        finally:
            start.remove()
        self.n_samples += len(samples)
        batch_losses = losses.detach().cpu().tolist()
        self.losses += batch_losses
        return batch_losses

    def add_sample(self, sample: EncodedSample) -> float:
        return self.add_batch([sample])[0]

    def scores(self) -> dict[str, torch.Tensor]:
        if self.n_samples == 0:
            raise ValueError("no samples added")
        return {name: (s / self.n_samples).cpu() for name, s in self.sums.items()}

    def share(self) -> FisherShare:
        return FisherShare(self.sums, self.n_samples, self.losses)


def pad_batch(
    samples: Sequence[EncodedSample], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and attention mask, on `device`."""
    ids, mask = pad_rows([s.input_ids for s in samples], pad_id)
    return ids.to(device), mask.to(device)


class _StopForward(Exception):
    """Raised once every hooked module has seen its input: the rest of the pass is waste."""


class InputHessians:
    """H per input group of the target linears, from forward passes of a model.

    A pass stops as soon as the last hooked module has seen its input, so Hessians of
    early layers cost a fraction of a forward pass.
    """

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
        self._pending: set[str] = set()

    def _hook(self, name: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape))
            if name not in self.group_of:  # first pass: discover shared inputs
                self.group_of[name] = self._seen.setdefault(key, (name, x))[0]
            if self.group_of[name] == name:
                tokens = x[self._mask].float()  # (n_tok, in), padding excluded
                if name not in self.sums:
                    self.sums[name] = torch.zeros(
                        x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device
                    )
                self.sums[name].addmm_(tokens.T, tokens, alpha=2.0)
            self._pending.discard(name)
            if not self._pending:
                raise _StopForward

        return hook

    @torch.no_grad()
    def add_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.observe(
            attention_mask,
            lambda: self.model(input_ids=input_ids, attention_mask=attention_mask),
            stop_early=True,
        )

    def observe(
        self, attention_mask: torch.Tensor, forward: Callable[[], Any], stop_early: bool = False
    ) -> Any:
        """Run `forward` with the capture hooks on; returns its result (None if stopped)."""
        self._mask = attention_mask.bool()
        self._seen = {}
        self._pending = set(self.modules) if stop_early else {""}  # "" never completes
        handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.modules.items()]
        result = None
        try:
            result = forward()
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
            self._seen = {}
        self.n_tokens += int(self._mask.sum())
        return result

    def absorb(self, other: InputHessians) -> InputHessians:
        """Add the sums of the same modules observed on other samples (another device)."""
        if other.group_of != self.group_of:
            raise ValueError("Hessians of different module groups cannot be combined")
        for leader, total in self.sums.items():
            total += other.sums[leader].to(total.device)
        self.n_tokens += other.n_tokens
        return self

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


def capture_inputs(
    root: nn.Module, names: Sequence[str], mask: torch.Tensor, forward: Callable[[], Any]
) -> dict[str, torch.Tensor]:
    """Inputs (n_tok, in) of modules `names` of `root` while `forward()` runs, padding
    excluded (`mask`); the pass stops once every module has seen its input."""
    keep = mask.bool()
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def capture(_module: nn.Module, args: tuple[Any, ...]) -> None:
            seen[name] = args[0][keep].float()
            if len(seen) == len(names):
                raise _StopForward

        return capture

    handles = [root.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        forward()
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return seen


class CrossInputs:
    """Paired input statistics for asymmetric calibration (GPTAQ-style), per module:

        H = (2/N_tok) Σ_t x_t x_tᵀ      C = (2/N_tok) Σ_t x°_t x_tᵀ

    where x_t is the module's input at token t when the model being repaired runs, and
    x°_t its input at the same token when the reference (the base) runs. Compensation can
    then aim at the base's outputs on the base's own inputs, W_o x°, instead of W_o x.
    `add_batch` runs two whole models; `add` takes inputs captured elsewhere (layer by layer).
    """

    def __init__(
        self,
        target_modules: Sequence[str],
        model: nn.Module | None = None,
        reference: nn.Module | None = None,
    ):
        self.model, self.reference = model, reference
        self.names = list(target_modules)
        self.group_of = {name: name for name in self.names}  # no shared H here
        self.h: dict[str, torch.Tensor] = {}
        self.c: dict[str, torch.Tensor] = {}
        self.n_tokens = 0

    def add(
        self, ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], n_tokens: int
    ) -> None:
        """Accumulate one batch: `ours`/`theirs` = inputs of the same tokens, per module."""
        for name in self.names:
            x, x_ref = ours[name], theirs[name].to(ours[name].device)
            if name not in self.h:
                size = x.shape[-1]
                self.h[name] = torch.zeros(size, size, dtype=torch.float32, device=x.device)
                self.c[name] = torch.zeros(size, size, dtype=torch.float32, device=x.device)
            self.h[name].addmm_(x.T, x, alpha=2.0)
            self.c[name].addmm_(x_ref.T, x, alpha=2.0)
        self.n_tokens += n_tokens

    @torch.no_grad()
    def add_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        assert self.model is not None and self.reference is not None
        model, reference = self.model, self.reference
        ref_ids = input_ids.to(next(reference.parameters()).device)
        ref_mask = attention_mask.to(ref_ids.device)
        ours = capture_inputs(
            model,
            self.names,
            attention_mask,
            lambda: model(input_ids=input_ids, attention_mask=attention_mask),
        )
        theirs = capture_inputs(
            reference,
            self.names,
            ref_mask,
            lambda: reference(input_ids=ref_ids, attention_mask=ref_mask),
        )
        self.add(ours, theirs, int(attention_mask.sum()))

    def hessian(self, name: str) -> torch.Tensor:
        if self.n_tokens == 0:
            raise ValueError("no batches added")
        return self.h[name] / self.n_tokens

    def cross(self, name: str) -> torch.Tensor:
        if self.n_tokens == 0:
            raise ValueError("no batches added")
        return self.c[name] / self.n_tokens
