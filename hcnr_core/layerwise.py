"""Layer-by-layer mode: models larger than the accelerator, one decoder block at a time.

The model is a weightless (meta) skeleton; embeddings, final norm, head and rotary
tables are materialised on the device, and each decoder block's weights are copied in
from the tensor source (safetensors, mmap) only while that block runs. Samples' hidden
states between blocks live on the CPU.

- Fisher: a forward sweep stores every block's input; the head gives per-sample losses
  and the gradient at the last hidden state; a backward sweep re-runs each block with
  gradients on, captures the ghost-norm column sums (`ColumnFisher.capturing`) and
  passes the input gradient down. Exactly the whole-model result, block by block.
- Hessians: one forward sweep over D_hon; each block's Hessians are handed to the
  caller (who compensates and frees them) before the next block is loaded.
- Several devices: one `LayerwiseLM` per device, each with its share of the batches
  (`hcnr_core.devices`). Fisher sweeps run independently per device; the Hessian sweep
  keeps the devices on the same block so each block's Hessians can be added up.
- `LoraMergedSource` gives W_s = W_o + scaling · B A for a LoRA adapter tensor by tensor,
  so a merged copy of the model never has to fit in memory.

Supported: Llama-family decoders (`model.embed_tokens`, `model.layers`, `model.norm`,
`lm_head`): Llama, Mistral, Qwen2/3, Gemma 3, Phi-3 and the like. Each block gets the
keyword arguments the model itself gives it (Gemma's sliding and global layers differ).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hcnr_core.checkpoint import CheckpointInfo
from hcnr_core.data import EncodedSample
from hcnr_core.devices import run_parallel
from hcnr_core.errors import CheckpointError, UnsupportedArchitectureError
from hcnr_core.scoring import (
    ColumnFisher,
    CrossInputs,
    FisherShare,
    InputHessians,
    capture_inputs,
    pad_batch,
    response_nll,
)

LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


class LoraMergedSource:
    """W_s of a LoRA fine-tune, merged lazily per tensor in float32 (one rounding)."""

    def __init__(self, base_source: Any, adapter: CheckpointInfo):
        cfg = adapter.adapter_config
        for flag in ("use_dora", "lora_bias", "modules_to_save", "fan_in_fan_out"):
            if cfg.get(flag):
                raise CheckpointError(f"{adapter.path}: '{flag}' is not supported layer by layer")
        self.base = base_source
        self.lora = adapter.source()
        self.pairs: dict[str, tuple[str, str, float]] = {}
        for key in self.lora.keys():
            match = LORA_KEY.match(key)
            if match and match["part"] == "A":
                module = match["module"]
                rank = self.lora.shape(key)[0]
                alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
                scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
                b_key = key.replace(".lora_A.", ".lora_B.")
                self.pairs[f"{module}.weight"] = (key, b_key, scale)

    def keys(self) -> list[str]:
        return self.base.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def get(self, name: str) -> torch.Tensor:
        weight = self.base.get(name)
        if name not in self.pairs:
            return weight
        a_key, b_key, scale = self.pairs[name]
        delta = (self.lora.get(b_key).float() @ self.lora.get(a_key).float()) * scale
        return (weight.float() + delta).to(weight.dtype)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.keys():
            yield name, self.get(name)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank/alpha patterns: a key matches the module name or its dotted suffix."""
    for key, value in patterns.items():
        if module == key or re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


BLOCK_NAME = re.compile(r"^model\.layers\.\d+\.")


def check_layerwise_layout(model: nn.Module, targets: Sequence[str]) -> None:
    """What the block walk relies on: `model.embed_tokens`, `model.layers`, `model.norm`
    and every target inside a `model.layers.N`. Checked on the weightless model in
    `prepare`, so an unsupported layout fails before any weights are read."""
    core = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm")
    if core is None or not all(hasattr(core, n) for n in needed):
        raise UnsupportedArchitectureError(
            "layer-by-layer mode supports Llama-family decoders (model.embed_tokens, "
            f"model.layers, model.norm), not {type(model).__name__}"
        )
    outside = [t for t in targets if not BLOCK_NAME.match(t)]
    if outside:
        raise UnsupportedArchitectureError(
            f"layer-by-layer mode repairs matrices inside model.layers.N only, not {outside[:3]}"
        )


class _Caught(Exception):
    def __init__(self, hidden: torch.Tensor, kwargs: list[dict[str, Any]]):
        super().__init__()
        self.hidden, self.kwargs = hidden, kwargs


class _Recorder(nn.Module):
    """Stands in for a block to record the keyword arguments the model gives it.

    Every block gets its own: architectures with sliding and global layers (Gemma 2/3)
    give each block its own attention mask and rotary table. The last one stops the pass.
    """

    def __init__(self, seen: list[dict[str, Any]], first: list[torch.Tensor], last: bool):
        super().__init__()
        self.seen, self.first, self.last = seen, first, last

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if len(args) > 1:  # `_run_block` passes the hidden states alone positionally
            raise CheckpointError("layer-by-layer mode needs blocks called with keyword arguments")
        if not self.first:
            self.first.append(hidden)
        self.seen.append(kwargs)
        if self.last:
            raise _Caught(self.first[0], self.seen)
        return hidden  # the block's input: only the arguments of later blocks matter here


class LayerwiseLM:
    """A causal LM whose decoder blocks are materialised on the device one at a time."""

    def __init__(self, config_dir: Path, source: Any, dtype: torch.dtype, device: torch.device):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(
            str(config_dir), trust_remote_code=False, local_files_only=True
        )
        # Parameters on meta, buffers real (rotary tables, Gemma's embedding scale): they
        # are computed, not stored, and come out as `from_pretrained` makes them.
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.model.requires_grad_(False).eval()
        check_layerwise_layout(self.model, [])
        self.core, self.source, self.dtype, self.device = self.model.model, source, dtype, device
        self.buffer_values = {
            name: (source.get(name) if name in source else buf).to(device)
            for name, buf in self.model.named_buffers()
        }
        # Everything outside the blocks stays resident: embeddings, final norm, rotary
        # tables, the head (stored as the embeddings when tied).
        tied = "lm_head.weight" not in source
        for name, _ in self.model.named_children():
            if name != "model":
                self._materialize(name, "model.embed_tokens" if tied and name == "lm_head" else "")
        for name, _ in self.core.named_children():
            if name != "layers":
                self._materialize(f"model.{name}")
        self.softcap = getattr(config, "final_logit_softcapping", None)

    @property
    def n_blocks(self) -> int:
        return len(self.core.layers)

    def _materialize(self, name: str, stored_as: str = "") -> None:
        """Module `name` on the device: parameters from the source (stored under
        `stored_as` when tied), buffers from the skeleton."""
        module = self.model.get_submodule(name)
        module.to_empty(device=self.device)
        for key, param in module.named_parameters():
            stored = f"{stored_as or name}.{key}"
            if stored not in self.source:
                raise CheckpointError(f"{stored} is not in the checkpoint")
            param.data.copy_(self.source.get(stored).to(self.dtype))
        for key, buf in module.named_buffers():
            buf.copy_(self.buffer_values[f"{name}.{key}"])

    def block(self, index: int) -> nn.Module:
        """Block `index` with its weights on the device; `release` it when done."""
        self._materialize(f"model.layers.{index}")
        return self.core.layers[index]

    def release(self, index: int) -> None:
        self.core.layers[index].to("meta")

    def get_submodule(self, name: str) -> nn.Module:
        """A module of the skeleton (a block's weights are real only while it is out)."""
        return self.model.get_submodule(name)

    def prefix(
        self, ids: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """Block 0's input hidden states and the keyword arguments of every block."""
        return _prefix(self.model, ids, mask)

    def tail_losses(self, hidden: torch.Tensor, samples: Sequence[EncodedSample]) -> torch.Tensor:
        keep = hidden.shape[1] - min(s.prompt_len for s in samples) + 1
        logits = self.model.lm_head(self.core.norm(hidden[:, -keep:]))
        if self.softcap:  # Gemma 2/3's final logit soft-capping, as their forward does it
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return response_nll(logits, samples, hidden.shape[1])


def _prefix(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Block 0's input hidden states and every block's keyword arguments (the blocks are
    swapped for recorders for one pass, the last one stopping it)."""
    core = model.model
    blocks = list(core.layers)
    seen: list[dict[str, Any]] = []
    first: list[torch.Tensor] = []
    for i in range(len(blocks)):
        core.layers[i] = _Recorder(seen, first, last=i == len(blocks) - 1)
    try:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Caught as caught:
        return caught.hidden, caught.kwargs
    finally:
        for i, block in enumerate(blocks):
            core.layers[i] = block
    raise CheckpointError("the model did not call each of its blocks once")


class ResidentLM:
    """A model already on its device, seen block by block like `LayerwiseLM` (nothing is
    materialised or released), so that block-by-block algorithms run on either."""

    def __init__(self, model: nn.Module):
        self.model, self.core = model, model.model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    @property
    def n_blocks(self) -> int:
        return len(self.core.layers)

    def block(self, index: int) -> nn.Module:
        return self.core.layers[index]

    def release(self, index: int) -> None:
        pass

    def get_submodule(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def prefix(
        self, ids: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        return _prefix(self.model, ids, mask)


def _run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class _Batch:
    def __init__(self, lm: LayerwiseLM | ResidentLM, samples: list[EncodedSample], pad_id: int):
        self.samples = samples
        ids, self.mask = pad_batch(samples, pad_id, lm.device)
        with torch.no_grad():
            hidden, self.kwargs = lm.prefix(ids, self.mask)  # per block
        self.hidden = [hidden.to("cpu")]  # input of block i at index i (CPU)


def layerwise_fisher(
    lm: LayerwiseLM,
    batches: list[list[EncodedSample]],
    targets: Sequence[str],
    pad_id: int,
    step: Callable[[], None] = lambda: None,
) -> FisherShare:
    """Column Fisher sums of every target over `batches`, identical to `ColumnFisher` on
    the whole model; `step()` after each of the 2·blocks + 1 sweeps' steps."""
    fisher = ColumnFisher(lm.model, targets, pad_id, device=lm.device)
    states = [_Batch(lm, b, pad_id) for b in batches]
    for index in range(lm.n_blocks):  # forward sweep: keep every block's input
        block = lm.block(index)
        with torch.no_grad():
            for st in states:
                out = _run_block(block, st.hidden[-1].to(lm.device), st.kwargs[index])
                st.hidden.append(out.to("cpu"))
        lm.release(index)
        step()
    grads = []
    for st in states:  # head: per-sample losses and the gradient at the last hidden state
        hidden = st.hidden.pop().to(lm.device).requires_grad_(True)
        batch_losses = lm.tail_losses(hidden, st.samples)
        batch_losses.sum().backward()
        fisher.losses += batch_losses.detach().cpu().tolist()
        grads.append(hidden.grad)
    step()
    for index in reversed(range(lm.n_blocks)):  # backward sweep, block by block
        block = lm.block(index)
        names = [t for t in targets if t.startswith(f"model.layers.{index}.")]
        with fisher.capturing(names):
            for i, st in enumerate(states):
                hidden = st.hidden.pop().to(lm.device).requires_grad_(True)
                _run_block(block, hidden, st.kwargs[index]).backward(grads[i])
                grads[i] = hidden.grad
        lm.release(index)
        step()
    fisher.n_samples = sum(len(b) for b in batches)
    return fisher.share()


def layerwise_hessians(
    lms: Sequence[LayerwiseLM],
    shares: Sequence[list[list[EncodedSample]]],
    modules: Sequence[str],
    pad_id: int,
    tick: Callable[[int, int], None] = lambda done, total: None,
) -> Iterator[tuple[list[str], InputHessians]]:
    """One forward sweep over D_hon; yields each block's (modules, Hessians) in turn.

    `lms[i]` (one per device) runs the batches `shares[i]`, all devices on the same block
    at once; their Hessians are added on the first device. `tick` may raise to stop.
    """
    by_block: dict[int, list[str]] = {}
    for name in modules:
        by_block.setdefault(int(name.split(".")[2]), []).append(name)
    if not by_block:
        return
    states = [[_Batch(lm, b, pad_id) for b in share] for lm, share in zip(lms, shares, strict=True)]
    total = sum(len(s) for s in states) * (max(by_block) + 1)
    done = 0

    def block_work(lm: LayerwiseLM, batches: list[_Batch], index: int, names: list[str]) -> Any:
        def run(step: Callable[[], None]) -> InputHessians:
            block = lm.block(index)
            hessians = InputHessians(lm.model, names)
            with torch.no_grad():
                for st in batches:
                    hidden = st.hidden[-1].to(lm.device)
                    out = hessians.observe(
                        st.mask, partial(_run_block, block, hidden, st.kwargs[index])
                    )
                    st.hidden[-1] = out.to("cpu")
                    step()
            lm.release(index)
            return hessians

        return run

    def progress(n: int, _total: int) -> None:
        tick(done + n, total)

    for index in range(max(by_block) + 1):
        names = by_block.get(index, [])
        work = [block_work(lm, st, index, names) for lm, st in zip(lms, states, strict=True)]
        parts = run_parallel([lm.device for lm in lms], work, progress, total)
        done += sum(len(s) for s in states)
        if names:
            merged = parts[0]
            for part in parts[1:]:
                merged.absorb(part)
            yield names, merged


def layerwise_sequential(
    lm: LayerwiseLM | ResidentLM,
    batches: list[list[EncodedSample]],
    modules: Sequence[str],
    pad_id: int,
    reference: LayerwiseLM | ResidentLM | None = None,
    tick: Callable[[int, int], None] = lambda done, total: None,
) -> Iterator[tuple[list[str], InputHessians | CrossInputs]]:
    """Sequential calibration, one block at a time on one device (layer by layer, or on a
    resident model: one forward pass over the data either way): block b's statistics
    come from `lm` (the model being repaired) on the hidden states that left the blocks
    before it, *after* their repair. For each block with `modules` it yields (names,
    statistics) with the block still on the device; the caller writes the repaired
    matrices into it (`lm.get_submodule(name).weight`) before the next `next()`, which
    then carries the hidden states through the repaired block. With `reference` (the
    base) it yields `CrossInputs` (H and C: asymmetric calibration), the reference's own
    hidden states carried alongside.
    """
    by_block: dict[int, list[str]] = {}
    for name in modules:
        by_block.setdefault(int(name.split(".")[2]), []).append(name)
    if not by_block:
        return
    ours = [_Batch(lm, b, pad_id) for b in batches]
    theirs = [_Batch(reference, b, pad_id) for b in batches] if reference else []
    last = max(by_block)
    for index in range(last + 1):
        names = by_block.get(index, [])
        block = lm.block(index)
        ref_block = reference.block(index) if reference else None
        with torch.no_grad():
            if names:
                stats: InputHessians | CrossInputs
                if reference is None:
                    stats = InputHessians(lm.model, names)
                    for st in ours:
                        hidden = st.hidden[-1].to(lm.device)
                        forward = partial(_run_block, block, hidden, st.kwargs[index])
                        stats.observe(st.mask, forward, stop_early=True)
                else:
                    assert ref_block is not None
                    stats = CrossInputs(names)
                    for st, ref in zip(ours, theirs, strict=True):
                        hidden = st.hidden[-1].to(lm.device)
                        x = capture_inputs(
                            lm.model,
                            names,
                            st.mask,
                            partial(_run_block, block, hidden, st.kwargs[index]),
                        )
                        ref_hidden = ref.hidden[-1].to(reference.device)
                        x_ref = capture_inputs(
                            reference.model,
                            names,
                            ref.mask,
                            partial(_run_block, ref_block, ref_hidden, ref.kwargs[index]),
                        )
                        stats.add(x, x_ref, int(st.mask.sum()))
                yield names, stats  # the caller repairs the block's matrices in place
            if index < last:  # carry the hidden states through the (repaired) block
                for st in ours:
                    out = _run_block(block, st.hidden[-1].to(lm.device), st.kwargs[index])
                    st.hidden[-1] = out.to("cpu")
                if reference is not None:
                    for ref in theirs:
                        hidden = ref.hidden[-1].to(reference.device)
                        ref.hidden[-1] = _run_block(ref_block, hidden, ref.kwargs[index]).to("cpu")
        lm.release(index)
        if reference is not None:
            reference.release(index)
        tick(index + 1, last + 1)
