"""What a repair will cost before it runs: parameters, tokens, peak memory, wall time.

Small functions, one equation each, written to be read next to `bench/results/scale.md`
(the measurements every coefficient below comes from). Torch-free and weight-free: the
shapes come from `config.json` and the safetensors headers (`hcnr_core.limits`), so the
API can answer in a request.

    shapes = read_shapes(base_dir, finetuned_dir)            # headers only
    data = {"honesty": tokens_from_bytes(128, 40_000, 512), ...}
    estimate = estimate_repair(shapes, config, data, "hcnr", workers, RunOptions(device="cuda"))

Notation: P the base's parameters (an adapter is merged into the base, so the model in
memory has P parameters), b the compute dtype's bytes, T a data set's tokens (prompt +
response + EOS after truncation to `max_seq_len`, as `hcnr_core.data.encode_samples`
counts them), h/L/V hidden size, decoder layers, vocabulary.

Every figure is a plan, not a promise. The CPU memory fits and the throughputs were
measured on one x86_64 machine with 2 cores, float32, Llama-shaped models of 20M-290M
parameters; device (GPU) memory is derived from the design, never measured (no GPU was
lent to this project). `Estimate.notes` says which basis each figure has.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hcnr_core.config import RunOptions
from hcnr_core.errors import CheckpointError, HCNRError, UnsafeCheckpointError
from hcnr_core.formats import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DTYPE_BYTES,
    SAFE_INDEX,
    SAFE_SINGLE,
    SAFETENSORS_DTYPES,
)
from hcnr_core.limits import (
    GIB,
    Limits,
    check_checkpoint,
    config_dimensions,
    read_safetensors_header,
)

MAX_JSON_BYTES = 16 * 1024**2  # config.json / index: far above any real one
_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")

# --- the measurements (bench/results/scale.md) ----------------------------------------------
# Parameters of the sizes of bench/scale (`bench/scale/checkpoints.py`'s `param_count`).
P_20M, P_64M, P_290M = 20_318_464, 64_233_984, 292_062_208
# "Memory model for 8B and 70B": peak RSS (GiB) of CPU float32 repairs, whole model by
# parameters and layer by layer by R (GiB, `bench/scale/render.py`'s `_layerwise_resident_bytes`:
# 0.104, 0.277, 0.828 for the three sizes). The lines are fitted here as the document
# fits them (least squares), not copied rounded: 13.7 B/param instead of 13.65 is off by
# 2.6 GiB at 70B.
WHOLE_RSS_POINTS = ((P_20M, 0.69), (P_64M, 1.26), (P_290M, 4.15))
LAYER_RSS_POINTS = (
    (0.10376262664794922, 0.74),
    (0.27734947204589844, 1.06),
    (0.828136444091797, 2.46),
)


def least_squares(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(a, b) of y = a + b x over the points."""
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - b * mx, b


_a, _b = least_squares(WHOLE_RSS_POINTS)
WHOLE_RSS_INTERCEPT = _a * GIB  # 0.44 GiB: the Python/torch process
WHOLE_RSS_PER_PARAM = _b * GIB  # 13.65 bytes per parameter, float32 compute
FP32_MODEL_BYTES = 4  # of which the fp32 model itself (the design's 4 B of the 8 B)
_a, _b = least_squares(LAYER_RSS_POINTS)
LAYER_RSS_INTERCEPT = _a * GIB  # 0.45 GiB
LAYER_RSS_SLOPE = _b  # 2.41 x R, what layer-by-layer keeps resident by design
# Fisher throughput, tokens/s, CPU default threads (2 cores), float32: the table's rows.
# K = tokens/s x P is the parameter-tokens per second the machine sustains; the time of a
# Fisher pass over T tokens is T x P / K. The llama-290m whole row is the reference (the
# largest model, the least overhead per token); the spread over rows is the range.
FISHER_K_ROWS = {
    "llama-20m whole": 2180.6 * P_20M,
    "llama-20m layerwise": 2479.9 * P_20M,
    "llama-64m layerwise": 545.9 * P_64M,
    "llama-290m whole": 139.7 * P_290M,
}
FISHER_K = FISHER_K_ROWS["llama-290m whole"]
# llama-290m whole row: Hessians 25.90 s over the honesty set's 7168 tokens.
HESSIAN_K = 7168 * P_290M / 25.90
# Same row: loads (4.44 + 1.57 s), select 0.61, compensate 2.18, save 0.86 = 9.66 s per
# 292M parameters; the rest of `total` (141.43 - 138.18 s of stages) is fixed.
SECONDS_PER_PARAM = 9.66 / P_290M
FIXED_SECONDS = 3.25
# Baselines (llama-64m, 1 thread, `steps:60`: 960 samples of 56 tokens, 53 760 tokens):
# RAIT trains at 53760 / 169.0 s = 318 tok/s, DPO (train 470.6 + reference 24.8 +
# generate 6.8 s) at 107 tok/s, against HCNR's Fisher at 420.2 tok/s in the same run.
RAIT_SPEED = (53760 / 169.0) / 420.2
DPO_SPEED = (53760 / (470.6 + 24.8 + 6.8)) / 420.2
# Baselines' peak RSS, CPU float32, 1 thread: two sizes each (the larger if measured twice).
BASELINE_RSS = {"rait": ((P_20M, 1.1), (P_64M, 2.08)), "dpo": ((P_20M, 2.08), (P_64M, 4.24))}
# Activations of one batch on a device (Korthikanti et al. 2022, "Reducing Activation
# Recomputation in Large Transformer Models", eq. 1): s·b·h·(34 + 5·a·s/h) bytes per
# layer in 16-bit; the logits of the batch in fp32 on top. Derived, not measured here.
ACTIVATION_PER_TOKEN_HIDDEN = 34
ACTIVATION_ATTENTION = 5


# --- shapes, from headers only ---------------------------------------------------------------


@dataclass(frozen=True)
class Matrix:
    """A 2-D weight inside a numbered decoder block (a candidate for repair)."""

    module: str  # the nn.Linear's name, e.g. model.layers.0.self_attn.q_proj
    layer: int
    out_features: int
    in_features: int


@dataclass(frozen=True)
class Shapes:
    """What the estimate needs of the checkpoints; read by `read_shapes`."""

    parameters: int  # the base's stored parameters (the repaired model's)
    adapter_parameters: int  # the LoRA adapter's, 0 for a full fine-tune
    finetuned_kind: str  # "adapter" or "full"
    stored_dtype: str
    hidden_size: int
    layers: int
    vocab_size: int
    heads: int
    outside_blocks: int  # parameters outside the numbered blocks (embeddings, head, norm)
    largest_block: int  # parameters of the largest decoder block
    matrices: tuple[Matrix, ...] = ()

    @property
    def total_parameters(self) -> int:
        return self.parameters + self.adapter_parameters


def _inside(root: Path, candidate: Path) -> bool:
    real_root = os.path.realpath(root)
    return os.path.commonpath([real_root, os.path.realpath(candidate)]) == real_root


def _confined(root: Path, name: str) -> Path:
    """`root/name`, refused when a name or link leads outside the checkpoint directory."""
    path = root / name
    if os.path.isabs(name) or not _inside(root, path):
        raise UnsafeCheckpointError(f"{root}: {name!r} points outside the checkpoint directory")
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise CheckpointError(f"{path}: larger than {MAX_JSON_BYTES} bytes")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def weight_files(root: Path) -> dict[str, Path]:
    """tensor name -> safetensors file of a full checkpoint (index or single file), every
    file confined to `root`. Pickle weights are never read: no safetensors, no estimate."""
    index = _confined(root, SAFE_INDEX)
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: missing or empty 'weight_map'")
        files: dict[str, Path] = {}
        for tensor, name in weight_map.items():
            if not isinstance(name, str) or not name.endswith(".safetensors"):
                raise UnsafeCheckpointError(f"{index}: {tensor!r} maps to {name!r}")
            files[tensor] = _confined(root, name)
        missing = sorted({p.name for p in files.values() if not p.is_file()})
        if missing:
            raise CheckpointError(f"{index}: weight file {missing[0]} is missing")
        return files
    single = _confined(root, SAFE_SINGLE)
    if not single.is_file():
        raise CheckpointError(f"{root}: no safetensors weights (model.safetensors or its index)")
    return {name: single for name in read_safetensors_header(single) if name != "__metadata__"}


def _entries(files: Mapping[str, Path]) -> dict[str, dict[str, Any]]:
    """name -> {shape, dtype} of every tensor `files` maps, one header read per file."""
    by_file: dict[Path, set[str]] = {}
    for tensor, path in files.items():
        by_file.setdefault(path, set()).add(tensor)
    entries: dict[str, dict[str, Any]] = {}
    for path, names in by_file.items():
        for name, entry in read_safetensors_header(path).items():
            if name in names and isinstance(entry, dict):
                entries[name] = entry
    return entries


def _numel(entry: Mapping[str, Any]) -> int:
    return math.prod(int(d) for d in entry.get("shape") or [])


def read_shapes(base: str | Path, finetuned: str | Path, limits: Limits | None = None) -> Shapes:
    """The base's shapes and parameter count from config.json and the safetensors
    headers, plus the adapter's parameters when `finetuned` is a LoRA directory. Applies
    the checkpoint limits (`hcnr_core.limits.check_checkpoint`); reads no weight."""
    base, finetuned = Path(base), Path(finetuned)
    config_path = _confined(base, "config.json")
    if not config_path.is_file():
        raise CheckpointError(f"{base}: no config.json (the base must be a full checkpoint)")
    config = _read_json(config_path)
    files = weight_files(base)
    check_checkpoint(base, config, files, limits)
    entries = _entries(files)
    adapter, kind = 0, "full"
    if _confined(finetuned, ADAPTER_CONFIG).is_file():
        adapter_files = {
            n: _confined(finetuned, ADAPTER_WEIGHTS)
            for n in read_safetensors_header(_confined(finetuned, ADAPTER_WEIGHTS))
            if n != "__metadata__"
        }
        adapter = check_checkpoint(finetuned, {}, adapter_files, limits)["parameters"]
        kind = "adapter"
    elif _confined(finetuned, "config.json").is_file():
        check_checkpoint(finetuned, _read_json(finetuned / "config.json"), weight_files(finetuned))
    else:
        raise CheckpointError(f"{finetuned}: neither a checkpoint nor a LoRA adapter directory")
    return shapes_of(config, entries, adapter, kind, base)


def shapes_of(
    config: Mapping[str, Any],
    entries: Mapping[str, Mapping[str, Any]],
    adapter_parameters: int = 0,
    finetuned_kind: str = "full",
    where: Path = Path("config.json"),
) -> Shapes:
    """`Shapes` from a config.json mapping and safetensors header entries."""
    dims = config_dimensions(config, where)
    blocks: dict[int, int] = {}
    matrices, stored = [], None
    for name, entry in entries.items():
        numel = _numel(entry)
        match = _LAYER_INDEX.search(name)
        if match:
            layer = int(match.group(1))
            blocks[layer] = blocks.get(layer, 0) + numel
            shape = entry.get("shape") or []
            if len(shape) == 2 and name.endswith(".weight"):
                matrices.append(Matrix(name[: -len(".weight")], layer, *map(int, shape)))
                stored = stored or SAFETENSORS_DTYPES.get(str(entry.get("dtype")))
    parameters = sum(_numel(e) for e in entries.values())
    hidden = dims.get("hidden_size", 0)
    heads = config.get("num_attention_heads") or config.get("n_head") or max(1, hidden // 64)
    return Shapes(
        parameters=parameters,
        adapter_parameters=adapter_parameters,
        finetuned_kind=finetuned_kind,
        stored_dtype=stored or "float32",
        hidden_size=hidden,
        layers=dims.get("layers", len(blocks)),
        vocab_size=dims.get("vocab_size", 0),
        heads=int(heads),
        outside_blocks=parameters - sum(blocks.values()),
        largest_block=max(blocks.values(), default=0),
        matrices=tuple(sorted(matrices, key=lambda m: (m.layer, m.module))),
    )


# --- tokens ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSize:
    """One data set's size as the repair sees it."""

    samples: int
    tokens: int  # the figure the estimate uses
    tokens_upper: int  # a bound the real count cannot exceed
    longest: int  # the longest sample's tokens (or its bound)
    basis: str  # "tokenizer" (counted) or "file_bytes" (estimated from the size)


# A rule of thumb for English text and BPE vocabularies (~4 characters per token, OpenAI's
# tokenizer guide); only used when the tokenizer is not run.
BYTES_PER_TOKEN = 4


def tokens_from_bytes(samples: int, file_bytes: int, max_seq_len: int) -> DataSize:
    """Without the tokenizer: T ≈ bytes / 4, and T <= samples x max_seq_len (every sample
    is cut to max_seq_len tokens), which is the bound."""
    upper = samples * max_seq_len
    return DataSize(
        samples=samples,
        tokens=min(upper, math.ceil(file_bytes / BYTES_PER_TOKEN)),
        tokens_upper=upper,
        longest=max_seq_len,
        basis="file_bytes",
    )


def tokens_from_tokenizer(tokenizer: Any, samples: Sequence[Any], max_seq_len: int) -> DataSize:
    """Counted: prompt (chat template) + response + EOS, truncated as the repair does
    (`hcnr_core.data.encode_samples`; an over-long response is refused the same way)."""
    from hcnr_core.data import encode_samples

    lengths = [len(s.input_ids) for s in encode_samples(tokenizer, samples, max_seq_len)]
    total = sum(lengths)
    return DataSize(len(lengths), total, total, max(lengths, default=0), "tokenizer")


# --- memory ----------------------------------------------------------------------------------


def dtype_bytes(dtype: str, shapes: Shapes) -> int:
    """Bytes per weight of the compute dtype ("auto" = the base's stored dtype)."""
    return DTYPE_BYTES[shapes.stored_dtype if dtype == "auto" else dtype]


def whole_host_bytes(parameters: int, b: int, cpu_replicas: int = 1) -> float:
    """Peak RSS of a whole-model repair: 0.44 GiB + (13.65 - 4 + b) x P.

    The fit is float32 (13.65 B per parameter, 4 B of it the fp32 model); another compute
    dtype swaps those 4 B for b. Every further CPU replica holds another model (b x P;
    measured: llama-64m `cpu,cpu` 1.56 vs 1.26 GiB, +0.30 GiB for 0.24 GiB of weights).
    On a GPU the model is first loaded on the CPU (`checkpoint.load_model`), so the host
    peak is the same."""
    per_param = WHOLE_RSS_PER_PARAM - FP32_MODEL_BYTES + b
    return WHOLE_RSS_INTERCEPT + per_param * parameters + (cpu_replicas - 1) * b * parameters


def layerwise_resident_bytes(shapes: Shapes, set_tokens: int, b: int) -> float:
    """R = (embeddings + head + the largest block + (L + 1) x T x h) x b: what layer by
    layer keeps by design, T the larger data set's tokens (every block's input hidden
    states for one data set, as `bench/scale/render.py`'s `_layerwise_resident_bytes`)."""
    hidden_states = (shapes.layers + 1) * set_tokens * shapes.hidden_size
    return (shapes.outside_blocks + shapes.largest_block + hidden_states) * b


def layerwise_host_bytes(resident: float) -> float:
    """Peak RSS layer by layer: 0.45 GiB + 2.41 x R (fit over the same three sizes)."""
    return LAYER_RSS_INTERCEPT + LAYER_RSS_SLOPE * resident


def _group(module: str) -> str:
    """Matrices that read the same input share one H: q/k/v (attention input) and
    gate/up (MLP input); any other matrix has its own."""
    leaf = module.rsplit(".", 1)[-1]
    shared = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu", "up_proj": "gu"}
    return module.rsplit(".", 1)[0] + "." + shared.get(leaf, leaf)


def hessian_groups(shapes: Shapes, target_modules: str) -> dict[tuple[int, str], int]:
    """(layer, group) -> bytes of its H (in x in, float32) for the target matrices."""
    pattern = re.compile(target_modules)
    groups: dict[tuple[int, str], int] = {}
    for m in shapes.matrices:
        if pattern.search(m.module):
            groups[(m.layer, _group(m.module))] = m.in_features**2 * 4
    return groups


def hessian_peak_bytes(groups: Mapping[tuple[int, str], int], budget: int, layerwise: bool) -> int:
    """Hessians held at once plus the damped copy, Cholesky factor and H⁻¹ of the
    largest group (3 x largest): whole model, at most `hessian_budget_mb` of H per pass;
    layer by layer, one block's H (scale.md, "Assumptions and limits")."""
    if not groups:
        return 0
    largest = max(groups.values())
    if layerwise:
        per_layer: dict[int, int] = {}
        for (layer, _), size in groups.items():
            per_layer[layer] = per_layer.get(layer, 0) + size
        held = max(per_layer.values())
    else:
        held = min(budget, sum(groups.values()))
    return held + 3 * largest


def activation_bytes(batch: int, seq: int, shapes: Shapes, b: int, layers: int) -> float:
    """One batch's activations through `layers` layers (forward + what backward keeps):
    s·b·h·(34 + 5·a·s/h) x (b/2) per layer, plus the batch's logits (b·s·V in the compute
    dtype and in float32 for the loss)."""
    h = max(shapes.hidden_size, 1)
    per_layer = (
        seq
        * batch
        * h
        * (ACTIVATION_PER_TOKEN_HIDDEN + ACTIVATION_ATTENTION * shapes.heads * seq / h)
    )
    logits = batch * seq * shapes.vocab_size * (4 + b)
    return layers * per_layer * b / 2 + logits


def baseline_host_bytes(method: str, parameters: int) -> float:
    """RAIT/DPO peak RSS: the line through their two measured sizes (CPU float32)."""
    (p1, g1), (p2, g2) = BASELINE_RSS[method]
    slope = (g2 - g1) * GIB / (p2 - p1)
    return g1 * GIB + slope * (parameters - p1)


# --- time ------------------------------------------------------------------------------------


def fisher_seconds(tokens: int, parameters: int, k: float = FISHER_K) -> float:
    """One Fisher pass (forward + backward) over T tokens: T x P / K."""
    return tokens * parameters / k


def hessian_seconds(tokens: int, parameters: int) -> float:
    """One Hessian pass (forward, H accumulated) over T tokens: T x P / K_H."""
    return tokens * parameters / HESSIAN_K


def overhead_seconds(parameters: int) -> float:
    """Inspection, loading, selection, compensation and saving: 3.25 s + 33 ns x P."""
    return FIXED_SECONDS + SECONDS_PER_PARAM * parameters


def hcnr_seconds(shapes: Shapes, honesty: int, task: int, config: Any, k: float) -> float:
    """Fisher on both sets + Hessians on D_hon (and D_task for task_aware) + overhead."""
    p = shapes.parameters
    hessian_tokens = 0 if config.compensation == "none" else honesty
    if config.compensation == "task_aware":
        hessian_tokens += task
    return (
        overhead_seconds(p)
        + fisher_seconds(honesty + task, p, k)
        + hessian_seconds(hessian_tokens, p) * FISHER_K / k
    )


def baseline_seconds(
    method: str, shapes: Shapes, honesty: DataSize, config: Any, k: float
) -> float:
    """Samples seen (steps x batch) x mean tokens per sample x P / (K x speed)."""
    seen = config.total_steps(honesty.samples) * config.batch_size
    mean = honesty.tokens / max(honesty.samples, 1)
    speed = RAIT_SPEED if method == "rait" else DPO_SPEED
    return overhead_seconds(shapes.parameters) + seen * mean * shapes.parameters / (k * speed)


# --- workers and the verdict -------------------------------------------------------------------


@dataclass(frozen=True)
class Capacity:
    """What one worker can hold. None: unknown (not checked)."""

    name: str
    device: str  # the devices it runs repairs on: cpu, cuda:0, cuda:0,cuda:1
    host_memory_bytes: int | None
    device_memory_bytes: int | None  # of each accelerator
    layerwise: bool  # may it run a repair layer by layer
    source: str  # where the figures come from (settings, detected)


@dataclass(frozen=True)
class ModeMemory:
    host_bytes: int
    device_bytes: int | None  # per device; None when the devices are CPUs


@dataclass
class Estimate:
    method: str
    parameters: int
    adapter_parameters: int
    finetuned_kind: str
    devices: list[str]
    dtype: str
    tokens: dict[str, DataSize]
    whole: ModeMemory
    layerwise: ModeMemory | None  # None: the method has no layer-by-layer mode
    layerwise_requested: bool
    layerwise_needed: bool | None  # None: no worker's memory is known
    wall_seconds: float
    wall_seconds_low: float
    wall_seconds_high: float
    wall_basis: str
    workers: list[Capacity]
    runnable: bool
    refusal: dict[str, str] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class NoWorkerFitsError(HCNRError):
    """No worker has the memory (or the mode) the repair needs; `estimate` says why."""

    code = "no_worker_fits"

    def __init__(self, message: str, estimate: Estimate):
        super().__init__(message)
        self.estimate = estimate

    def details(self) -> dict[str, Any]:
        return self.estimate.to_dict()


def fits(memory: ModeMemory, worker: Capacity) -> bool:
    """Within the worker's host memory and each device's memory (unknown: not checked)."""
    host_ok = worker.host_memory_bytes is None or memory.host_bytes <= worker.host_memory_bytes
    device_ok = (
        memory.device_bytes is None
        or worker.device_memory_bytes is None
        or memory.device_bytes <= worker.device_memory_bytes
    )
    return host_ok and device_ok


def verdict(
    whole: ModeMemory, layerwise: ModeMemory | None, requested: bool, workers: Sequence[Capacity]
) -> tuple[bool, bool | None, dict[str, str] | None]:
    """(runnable, layer by layer needed, refusal). Layer by layer is needed when the whole
    model fits no worker and layer by layer fits one; a worker that may not run layer by
    layer cannot take it then."""
    if not workers:
        refusal = {"code": "no_worker_fits", "message": "no worker is configured"}
        return False, None, refusal
    known = any(
        w.host_memory_bytes is not None or w.device_memory_bytes is not None for w in workers
    )
    whole_fits = any(fits(whole, w) for w in workers)
    whole_ok = whole_fits and not requested  # asked for layer by layer: that mode only
    layer_fits = layerwise is not None and any(fits(layerwise, w) for w in workers)
    layer_ok = layerwise is not None and any(fits(layerwise, w) and w.layerwise for w in workers)
    needed = (not whole_fits and layer_fits) if known else None
    if whole_ok or layer_ok:
        return True, needed, None

    def gib(x: float | None) -> str:
        return "unknown" if x is None else f"{x / GIB:.1f} GiB"

    def peak(m: ModeMemory) -> str:  # a device figure only where there are devices
        device = "" if m.device_bytes is None else f", per device {gib(m.device_bytes)}"
        return f"host {gib(m.host_bytes)}{device}"

    have = "; ".join(
        f"{w.name}: host {gib(w.host_memory_bytes)}"
        + ("" if w.device.startswith("cpu") else f", per device {gib(w.device_memory_bytes)}")
        for w in workers
    )
    need = f"whole model: {peak(whole)}"
    if layerwise is not None:
        need += f"; layer by layer: {peak(layerwise)}"
    if layer_fits:
        message = (
            f"only layer by layer fits ({need}), and no worker runs repairs layer by layer "
            f"(workers: {have})"
        )
    else:
        message = f"no worker has the memory this repair needs ({need}; workers: {have})"
    return False, needed, {"code": "no_worker_fits", "message": message}


# --- the estimate -----------------------------------------------------------------------------


def _memory(
    shapes: Shapes,
    config: Any,
    options: RunOptions,
    method: str,
    sets: Mapping[str, DataSize],
) -> tuple[ModeMemory, ModeMemory | None]:
    """Whole-model and layer-by-layer peaks of one method's config."""
    b = dtype_bytes(getattr(config, "dtype", "float32"), shapes)
    devices = options.device.split(",")
    p = shapes.parameters
    gpu = any(d.startswith(("cuda", "mps")) for d in devices)
    cpu_replicas = 1 if gpu else len(devices)
    longest = max((s.longest for s in sets.values()), default=8)
    seq = min(config.max_seq_len, longest)
    if method in ("rait", "dpo"):
        host = baseline_host_bytes(method, p)  # float32 fit, whatever the dtype
        pairs = 2 if method == "dpo" else 1  # chosen and rejected through the policy
        act = activation_bytes(config.batch_size * pairs, seq, shapes, b, shapes.layers)
        device = p * b + act if gpu else None
        return ModeMemory(int(host), None if device is None else int(device)), None
    groups = hessian_groups(shapes, config.target_modules)
    budget = options.hessian_budget_mb * 1024**2
    factor = 0 if config.compensation == "none" else 2 if config.compensation == "task_aware" else 1
    h_whole = factor * hessian_peak_bytes(groups, budget, layerwise=False)
    h_layer = factor * hessian_peak_bytes(groups, budget, layerwise=True)
    asymmetric = config.hessian_inputs == "asymmetric"  # the base stays beside the model
    whole_host = whole_host_bytes(p, b, cpu_replicas) + (p * b if asymmetric else 0)
    set_tokens = max((s.tokens for s in sets.values()), default=0)
    resident = layerwise_resident_bytes(shapes, set_tokens, b)
    layer_host = layerwise_host_bytes(resident) + (shapes.largest_block * b if asymmetric else 0)
    if not gpu:  # the Hessians are in host memory, outside the fits
        return ModeMemory(int(whole_host + h_whole), None), ModeMemory(
            int(layer_host + h_layer), None
        )
    batch = config.batch_size
    whole_device = (
        p * b * (2 if asymmetric else 1)
        + activation_bytes(batch, seq, shapes, b, shapes.layers)
        + h_whole
    )
    layer_device = resident + activation_bytes(batch, seq, shapes, b, 1) + h_layer
    return (
        ModeMemory(int(whole_host), int(whole_device)),
        ModeMemory(int(layer_host), int(layer_device)),
    )


def _seconds(
    shapes: Shapes, config: Any, method: str, sets: Mapping[str, DataSize], k: float
) -> float:
    honesty, task = sets["honesty"], sets.get("task")
    if method in ("rait", "dpo"):
        return baseline_seconds(method, shapes, honesty, config, k)
    return hcnr_seconds(shapes, honesty.tokens, task.tokens if task else 0, config, k)


def _auto_parts(config: Any) -> list[tuple[str, Any]]:
    """(method, config) of every candidate auto tries (hcnr_core.auto's own resolution)."""
    from hcnr_core.auto import candidate_config

    return [(c.method, candidate_config(c, config)) for c in config.tried()]


def estimate_repair(
    shapes: Shapes,
    config: Any,
    sets: Mapping[str, DataSize],
    method: str,
    workers: Sequence[Capacity],
    options: RunOptions | None = None,
) -> Estimate:
    """Parameters, tokens, peak memory (both modes), wall time and whether any worker can
    run it. `config` is the method's spec (dtype included), `options` how it would run
    (devices, memory budget, layer by layer; default one CPU); `sets` holds at least
    "honesty" (and "task" for HCNR)."""
    options = options or RunOptions()
    devices = options.device.split(",")
    gpu = any(d.startswith(("cuda", "mps")) for d in devices)
    notes: list[str] = []
    parts = _auto_parts(config) if method == "auto" else [(method, config)]
    memories = [_memory(shapes, c, options, m, sets) for m, c in parts]
    whole = ModeMemory(
        max(w.host_bytes for w, _ in memories),
        None if not gpu else max(w.device_bytes or 0 for w, _ in memories),
    )
    layered = [lw for _, lw in memories if lw is not None]
    layerwise = None
    if layered and len(layered) == len(memories):  # every candidate has the mode
        layerwise = ModeMemory(
            max(m.host_bytes for m in layered),
            None if not gpu else max(m.device_bytes or 0 for m in layered),
        )
    # Time at the reference throughput and at the slowest/fastest measured rows.
    ks = sorted(FISHER_K_ROWS.values())
    times = {k: sum(_seconds(shapes, c, m, sets, k) for m, c in parts) for k in (FISHER_K, *ks)}
    if method == "auto":
        # HCNR candidates share one pair of Fisher passes (hcnr_core.auto): subtract the
        # repeats; no new candidate starts after time_budget_s.
        n_hcnr = sum(m == "hcnr" for m, _ in parts)
        fisher_tokens = sets["honesty"].tokens + sets["task"].tokens
        for k in times:
            times[k] -= max(n_hcnr - 1, 0) * fisher_seconds(fisher_tokens, shapes.parameters, k)
            longest = max(_seconds(shapes, c, m, sets, k) for m, c in parts)
            times[k] = min(times[k], config.time_budget_s + longest)
            # The refit repairs the choice again from every sample, its own Fisher passes
            # included, after the budget's candidates; which one is not known yet.
            times[k] += longest if config.refit else 0.0
        notes.append("auto: the validation split's generation is not in the time estimate")
        if config.refit:
            notes.append(
                "auto: includes the refit of the choice (its longest candidate's time; none "
                "when the job gives a validation file)"
            )
    n_gpus = len(devices) if gpu else 1
    wall = {k: t / n_gpus for k, t in times.items()}
    basis = (
        "cpu-measured: Fisher throughput of bench/results/scale.md (x86_64, 2 cores, "
        "float32, llama-290m whole); the range is the spread over its default-thread rows"
    )
    if gpu:
        basis += (
            "; no GPU was measured: on a GPU expect it much faster, treat it as an upper "
            "bound"
            + (f", divided by {n_gpus} devices (replicas, not measured)" if n_gpus > 1 else "")
        )
        notes.append("device memory is derived from the design (scale.md), not measured")
    if options.layerwise and method == "hcnr":
        notes.append("layer-by-layer time: measured 0.87-1.29x the whole-model time (20M, 64M)")
    notes.append("host memory: CPU float32 fits over 20M-290M parameters, extrapolated")
    notes.append(
        "wall time: a lower bound for small models and short samples (per-batch costs are "
        "not modelled; toy repairs took 2-7x these CPU seconds, bench/results/estimate.md)"
    )
    requested = options.layerwise
    runnable, needed, refusal = verdict(whole, layerwise, requested, workers)
    return Estimate(
        method=method,
        parameters=shapes.parameters,
        adapter_parameters=shapes.adapter_parameters,
        finetuned_kind=shapes.finetuned_kind,
        devices=devices,
        dtype=getattr(config, "dtype", "float32"),
        tokens=dict(sets),
        whole=whole,
        layerwise=layerwise,
        layerwise_requested=requested,
        layerwise_needed=needed,
        wall_seconds=round(wall[FISHER_K], 1),
        wall_seconds_low=round(wall[ks[-1]], 1),
        wall_seconds_high=round(wall[ks[0]], 1),
        wall_basis=basis,
        workers=list(workers),
        runnable=runnable,
        refusal=refusal,
        notes=notes,
    )


def raise_if_refused(estimate: Estimate) -> Estimate:
    if estimate.refusal is not None:
        raise NoWorkerFitsError(estimate.refusal["message"], estimate)
    return estimate


# --- this machine ----------------------------------------------------------------------------


def host_memory_bytes() -> int | None:
    """Physical memory of this machine (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def device_memory_bytes(devices: Sequence[str]) -> int | None:
    """The smallest memory of the CUDA devices named, read by torch; None for CPUs or when
    this process cannot see them."""
    cuda = [d for d in devices if d.startswith("cuda")]
    if not cuda:
        return None
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        indices = [int(d.partition(":")[2] or 0) for d in cuda]
        return min(torch.cuda.get_device_properties(i).total_memory for i in indices)
    except Exception:  # no driver, an index this machine lacks: unknown, not fatal
        return None


def this_machine(device: str, layerwise: bool, name: str = "this machine") -> Capacity:
    devices = device.split(",")
    return Capacity(
        name=name,
        device=device,
        host_memory_bytes=host_memory_bytes(),
        device_memory_bytes=device_memory_bytes(devices),
        layerwise=layerwise,
        source="detected",
    )
