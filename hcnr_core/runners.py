"""How a repair runs its forward passes: the data flow, apart from the algorithm.

The pipeline (`hcnr_core.pipeline`) knows *what* to compute — column Fisher scores of two
checkpoints, input Hessians of the kept matrices, the repaired weights — and asks a
`Runner` for the passes. A runner owns one checkpoint's copies (one replica per device,
each scoring its share of the batches) and the hooks that observe them:

    runner.fisher(batches, targets, pad_id)        -> combined column Fisher scores
    runner.hessians(batches, modules, pad_id)      -> (chunk, InputHessians) pairs
    runner.blockwise()                             -> the first replica block by block
    runner.set_weight(module, W)                   -> a repaired matrix into every replica

Two implementations, chosen by `RepairConfig.layerwise`:
- `WholeModelRunner`: each replica resident on its device; Hessians in chunks sized by
  `hessian_budget_mb` (one early-stopped pass per chunk).
- `LayerwiseRunner`: decoder blocks materialised one at a time from a `TensorSource`
  (peak memory one block plus the hidden states), Hessians of every kept matrix in one
  pass.

Both are opened through the same two constructors, `finetuned(...)` and `base(...)`
(`RunnerKind`), which also hand back the `TensorSource` the writer reads W_s from.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, Protocol

import torch

from hcnr_core.checkpoint import (
    CheckpointInfo,
    DictSource,
    TensorSource,
    load_merged_adapter,
    load_model,
)
from hcnr_core.data import EncodedSample
from hcnr_core.devices import run_parallel, shard
from hcnr_core.layerwise import (
    LayerwiseLM,
    LoraMergedSource,
    ResidentLM,
    layerwise_fisher,
    layerwise_hessians,
)
from hcnr_core.scoring import ColumnFisher, FisherShare, InputHessians, combine_fisher, pad_batch

Batches = list[list[EncodedSample]]
Tick = Callable[..., None]  # tick(done, total[, message]); may raise RepairCancelled


class Runner(Protocol):
    """The forward passes over one checkpoint that a repair needs."""

    def fisher(self, batches: Batches, targets: Sequence[str], pad_id: int, tick: Tick) -> dict:
        """Column Fisher scores of `targets` over `batches` (`combine_fisher`'s dict)."""
        ...

    def hessians(
        self, batches: Batches, modules: list[str], pad_id: int, tick: Tick
    ) -> Iterator[tuple[list[str], InputHessians]]:
        """H = Σ XᵀX of the inputs of `modules` (model order), chunk by chunk."""
        ...

    def blockwise(self) -> LayerwiseLM | ResidentLM:
        """The first replica, seen block by block (the sequential calibrations)."""
        ...

    def set_weight(self, module: str, weight: torch.Tensor) -> None:
        """Put a repaired matrix into every replica (a new tensor: storage shared with a
        tensor source is never written)."""
        ...


class RunnerKind(Protocol):
    """Opens runners over the two checkpoints of a repair."""

    def finetuned(
        self,
        finetuned: CheckpointInfo,
        base: CheckpointInfo,
        dtype: torch.dtype,
        devices: list[torch.device],
        check: Callable[[], None],
    ) -> tuple[Runner, TensorSource]:
        """The fine-tuned model (an adapter merged onto `base`) and W_s at its stored dtype."""
        ...

    def base(
        self,
        base: CheckpointInfo,
        source: TensorSource,
        dtype: torch.dtype,
        devices: list[torch.device],
        check: Callable[[], None],
    ) -> Runner:
        """The base model; `source` is the base's tensor source the repair already holds."""
        ...


class WholeModelRunner:
    """Replicas resident on their devices; hooks on the target linears."""

    def __init__(self, models: list[Any], devices: list[torch.device], hessian_budget_mb: int):
        self.models, self.devices, self.budget_mb = models, devices, hessian_budget_mb

    @classmethod
    def kind(cls, hessian_budget_mb: int) -> RunnerKind:
        return _WholeModelKind(hessian_budget_mb)

    def fisher(self, batches: Batches, targets: Sequence[str], pad_id: int, tick: Tick) -> dict:
        def whole(model: Any, share: Batches) -> Callable[[Callable[[], None]], FisherShare]:
            def run(step: Callable[[], None]) -> FisherShare:
                fisher = ColumnFisher(model, list(targets), pad_id)
                for batch in share:
                    fisher.add_batch(batch)
                    step()
                return fisher.share()

            return run

        # Fewer batches than devices: the replicas without a share sit the pass out.
        shares = shard(batches, len(self.models))
        work = [whole(m, s) for m, s in zip(self.models, shares, strict=False)]
        total = sum(len(share) for share in shares)
        return combine_fisher(run_parallel(self.devices, work, tick, total))

    def hessians(
        self, batches: Batches, modules: list[str], pad_id: int, tick: Tick
    ) -> Iterator[tuple[list[str], InputHessians]]:
        for chunk in self.chunks(modules):
            yield chunk, self._chunk_hessians(batches, chunk, pad_id, tick)

    def chunks(self, modules: list[str]) -> list[list[str]]:
        """Modules in model order, split so each chunk's Hessians fit the memory budget.

        Each chunk costs one (early-stopped) forward pass over the data; the budget trades
        passes for peak memory. Shared-input groups are counted once per member, which
        over-estimates and so stays within the budget.
        """
        budget = self.budget_mb * 2**20
        named = dict(self.models[0].named_modules())
        chunks: list[list[str]] = [[]]
        used = 0
        for name in modules:
            cost = named[name].weight.shape[1] ** 2 * 4
            if chunks[-1] and used + cost > budget:
                chunks.append([])
                used = 0
            chunks[-1].append(name)
            used += cost
        return chunks

    def _chunk_hessians(
        self, batches: Batches, modules: list[str], pad_id: int, tick: Tick
    ) -> InputHessians:
        """Each replica observes its share; the parts are added up."""

        def observe(model: Any, share: Batches) -> Callable[[Callable[[], None]], InputHessians]:
            def run(step: Callable[[], None]) -> InputHessians:
                hessians = InputHessians(model, modules)
                device = next(model.parameters()).device
                for batch in share:
                    hessians.add_batch(*pad_batch(batch, pad_id, device))
                    step()
                return hessians

            return run

        # Fewer batches than devices: the replicas without a share sit the pass out.
        shares = shard(batches, len(self.models))
        work = [observe(m, s) for m, s in zip(self.models, shares, strict=False)]
        total = sum(len(share) for share in shares)
        parts = run_parallel(self.devices, work, tick, total)
        for part in parts[1:]:
            parts[0].absorb(part)
        return parts[0]

    def blockwise(self) -> ResidentLM:
        return ResidentLM(self.models[0])

    def set_weight(self, module: str, weight: torch.Tensor) -> None:
        _set_weight(self.models, module, weight)


class _WholeModelKind:
    def __init__(self, hessian_budget_mb: int):
        self.budget_mb = hessian_budget_mb

    def finetuned(
        self,
        finetuned: CheckpointInfo,
        base: CheckpointInfo,
        dtype: torch.dtype,
        devices: list[torch.device],
        check: Callable[[], None],
    ) -> tuple[WholeModelRunner, TensorSource]:
        if finetuned.kind == "full":
            models = _load_replicas(finetuned, dtype, devices, check)
            return WholeModelRunner(models, devices, self.budget_mb), finetuned.source()
        merged = load_merged_adapter(base, finetuned)
        state = merged.state_dict()
        # Only the names the base stores (tied weights appear once), kept on the CPU.
        source = DictSource({k: state[k] for k in base.source().keys()})
        replicas = [copy.deepcopy(merged).to(dtype=dtype, device=d) for d in devices[1:]]
        models = [merged.to(dtype=dtype, device=devices[0]), *replicas]
        return WholeModelRunner(models, devices, self.budget_mb), source

    def base(
        self,
        base: CheckpointInfo,
        source: TensorSource,
        dtype: torch.dtype,
        devices: list[torch.device],
        check: Callable[[], None],
    ) -> WholeModelRunner:
        models = _load_replicas(base, dtype, devices, check)
        return WholeModelRunner(models, devices, self.budget_mb)


def _load_replicas(
    info: CheckpointInfo, dtype: torch.dtype, devices: list[torch.device], check: Callable
) -> list[Any]:
    """The checkpoint on every device, one after the other: transformers' loading patches
    torch.nn.init process-wide, so two loads in threads can leave it patched."""
    replicas = []
    for device in devices:
        check()
        replicas.append(load_model(info, dtype, str(device)))
    return replicas


class LayerwiseRunner:
    """Blocks materialised one at a time from a tensor source, on every device."""

    def __init__(self, lms: list[LayerwiseLM], devices: list[torch.device]):
        self.lms, self.devices = lms, devices

    @classmethod
    def kind(cls) -> RunnerKind:
        return _LayerwiseKind()

    def fisher(self, batches: Batches, targets: Sequence[str], pad_id: int, tick: Tick) -> dict:
        shares = shard(batches, len(self.lms))
        work = [
            partial(layerwise_fisher, lm, share, list(targets), pad_id)
            for lm, share in zip(self.lms, shares, strict=False)
        ]
        total = len(shares) * (2 * self.lms[0].n_blocks + 1)
        return combine_fisher(run_parallel(self.devices, work, tick, total))

    def hessians(
        self, batches: Batches, modules: list[str], pad_id: int, tick: Tick
    ) -> Iterator[tuple[list[str], InputHessians]]:
        shares = shard(batches, len(self.lms))
        yield from layerwise_hessians(self.lms[: len(shares)], shares, modules, pad_id, tick)

    def blockwise(self) -> LayerwiseLM:
        return self.lms[0]

    def set_weight(self, module: str, weight: torch.Tensor) -> None:
        _set_weight(self.lms, module, weight)


class _LayerwiseKind:
    def finetuned(
        self,
        finetuned: CheckpointInfo,
        base: CheckpointInfo,
        dtype: torch.dtype,
        devices: list[torch.device],
        check: Callable[[], None],
    ) -> tuple[LayerwiseRunner, TensorSource]:
        sources: list[TensorSource]
        if finetuned.kind == "full":
            path, sources = finetuned.path, [finetuned.source() for _ in devices]
        else:
            path = base.path
            sources = [LoraMergedSource(base.source(), finetuned) for _ in devices]
        lms = [LayerwiseLM(path, s, dtype, d) for s, d in zip(sources, devices, strict=True)]
        return LayerwiseRunner(lms, devices), sources[0]

    def base(
        self,
        base: CheckpointInfo,
        source: TensorSource,
        dtype: torch.dtype,
        devices: list[torch.device],
        check: Callable[[], None],
    ) -> LayerwiseRunner:
        sources = [source] + [base.source() for _ in devices[1:]]
        lms = [LayerwiseLM(base.path, s, dtype, d) for s, d in zip(sources, devices, strict=True)]
        return LayerwiseRunner(lms, devices)


def runner_kind(layerwise: bool, hessian_budget_mb: int) -> RunnerKind:
    """The runners a repair with these run options uses."""
    return LayerwiseRunner.kind() if layerwise else WholeModelRunner.kind(hessian_budget_mb)


def _set_weight(models: Sequence[Any], module: str, weight: torch.Tensor) -> None:
    for model in models:
        param = model.get_submodule(module).weight
        param.data = weight.to(device=param.device, dtype=param.dtype)
