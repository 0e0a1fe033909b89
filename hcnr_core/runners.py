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
from dataclasses import dataclass
from functools import partial
from pathlib import Path
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
from hcnr_core.writer import plan_shards

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


@dataclass(frozen=True)
class Placement:
    """What runners are opened with: the repair's two checkpoints, the compute dtype, the
    devices (one replica each) and the cancellation check run between loads."""

    base: CheckpointInfo
    finetuned: CheckpointInfo
    dtype: torch.dtype
    devices: list[torch.device]
    check: Callable[[], None]


class RunnerKind(Protocol):
    """Opens runners over the two checkpoints of a repair."""

    def finetuned(self, at: Placement) -> tuple[Runner, TensorSource]:
        """The fine-tuned model (an adapter merged onto the base) and W_s at its stored
        dtype."""
        ...

    def base(self, at: Placement, source: TensorSource) -> Runner:
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
        named = dict(self.models[0].named_modules())
        costs = {name: named[name].weight.shape[1] ** 2 * 4 for name in modules}
        return plan_shards(costs, self.budget_mb * 2**20)  # greedy, order kept

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

    def finetuned(self, at: Placement) -> tuple[WholeModelRunner, TensorSource]:
        if at.finetuned.kind == "full":
            models = _load_replicas(at.finetuned, at)
            return WholeModelRunner(models, at.devices, self.budget_mb), at.finetuned.source()
        merged = load_merged_adapter(at.base, at.finetuned)
        state = merged.state_dict()
        # Only the names the base stores (tied weights appear once), kept on the CPU.
        source = DictSource({k: state[k] for k in at.base.source().keys()})
        replicas = [copy.deepcopy(merged).to(dtype=at.dtype, device=d) for d in at.devices[1:]]
        models = [merged.to(dtype=at.dtype, device=at.devices[0]), *replicas]
        return WholeModelRunner(models, at.devices, self.budget_mb), source

    def base(self, at: Placement, source: TensorSource) -> WholeModelRunner:
        return WholeModelRunner(_load_replicas(at.base, at), at.devices, self.budget_mb)


def _load_replicas(info: CheckpointInfo, at: Placement) -> list[Any]:
    """The checkpoint on every device, one after the other: transformers' loading patches
    torch.nn.init process-wide, so two loads in threads can leave it patched."""
    replicas = []
    for device in at.devices:
        at.check()
        replicas.append(load_model(info, at.dtype, str(device)))
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
    def finetuned(self, at: Placement) -> tuple[LayerwiseRunner, TensorSource]:
        sources: list[TensorSource]
        if at.finetuned.kind == "full":
            path, sources = at.finetuned.path, [at.finetuned.source() for _ in at.devices]
        else:
            path = at.base.path
            sources = [LoraMergedSource(at.base.source(), at.finetuned) for _ in at.devices]
        return self._open(path, sources, at), sources[0]

    def base(self, at: Placement, source: TensorSource) -> LayerwiseRunner:
        sources = [source] + [at.base.source() for _ in at.devices[1:]]
        return self._open(at.base.path, sources, at)

    @staticmethod
    def _open(path: Path, sources: list[TensorSource], at: Placement) -> LayerwiseRunner:
        pairs = zip(sources, at.devices, strict=True)
        return LayerwiseRunner([LayerwiseLM(path, s, at.dtype, d) for s, d in pairs], at.devices)


def runner_kind(layerwise: bool, hessian_budget_mb: int) -> RunnerKind:
    """The runners a repair with these run options uses."""
    return LayerwiseRunner.kind() if layerwise else WholeModelRunner.kind(hessian_budget_mb)


def _set_weight(models: Sequence[Any], module: str, weight: torch.Tensor) -> None:
    for model in models:
        param = model.get_submodule(module).weight
        param.data = weight.to(device=param.device, dtype=param.dtype)
