"""Checkpoints (DESIGN.md §4): inspection, safety and compatibility checks, loading.

Only safetensors are ever read; pickle files are refused, `trust_remote_code` is never
enabled and every file a checkpoint names must resolve inside its directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors import safe_open

from hcnr_core.errors import (
    CheckpointError,
    IncompatibleCheckpointsError,
    UnsafeCheckpointError,
)
from hcnr_core.formats import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PICKLE_SUFFIXES,
    SAFE_INDEX,
    SAFE_SINGLE,
    SAFETENSORS_DTYPES,
)
from hcnr_core.formats import COMPUTE_DTYPES as COMPUTE_DTYPE_NAMES
from hcnr_core.limits import check_checkpoint

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
SUPPORTED_ADAPTERS = frozenset({"LORA"})
_DTYPES = {code: getattr(torch, name) for code, name in SAFETENSORS_DTYPES.items()}


def _inside(root: Path, candidate: Path) -> bool:
    """True when `candidate` (after resolving links) is `root` or below it."""
    real_root, real = os.path.realpath(root), os.path.realpath(candidate)
    return real == real_root or real.startswith(real_root + os.sep)


def _confined_file(root: Path, name: str, what: str) -> Path:
    if not name or os.path.isabs(name) or ".." in Path(name).parts or "\\" in name:
        raise UnsafeCheckpointError(f"{root}: {what} {name!r} is not a plain file name")
    path = root / name
    if not _inside(root, path):
        raise UnsafeCheckpointError(f"{root}: {what} {name!r} resolves outside the checkpoint")
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _refuse_remote_code(path: Path, data: dict[str, Any]) -> None:
    for key in ("auto_map", "trust_remote_code"):
        if data.get(key):
            raise UnsafeCheckpointError(
                f"{path}: '{key}' asks for custom Python code; remote code is never executed"
            )
    # peft records the base class it was saved from; only transformers' own classes pass.
    mapping = data.get("auto_mapping")
    if mapping:
        library = str(mapping.get("parent_library", "")) if isinstance(mapping, dict) else ""
        if not library.startswith("transformers."):
            raise UnsafeCheckpointError(
                f"{path}: 'auto_mapping' names {library or mapping!r}, not a transformers "
                "class; remote code is never executed"
            )


@runtime_checkable
class TensorSource(Protocol):
    """Read access to a checkpoint's tensors by name, one at a time (nothing else is
    loaded): safetensors files (`SafetensorsSource`), an in-memory state dict
    (`DictSource`), a LoRA adapter merged onto its base per tensor
    (`layerwise.LoraMergedSource`), generated weights (`bench/scale/synthetic.py`)."""

    def keys(self) -> list[str]: ...
    def __contains__(self, name: str) -> bool: ...
    def get(self, name: str) -> torch.Tensor: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def items(self) -> Iterator[tuple[str, torch.Tensor]]: ...


class SafetensorsSource:
    """Lazy, mmap-backed access to the tensors of a safetensors checkpoint."""

    def __init__(self, files: dict[str, Path]):
        self._file_of = files  # tensor name -> file
        self._handles: dict[Path, Any] = {}

    def _handle(self, path: Path) -> Any:
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
        return self._handles[path]

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise KeyError(name)
        return self._handle(self._file_of[name]).get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self._file_of[name]).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        code = self._handle(self._file_of[name]).get_slice(name).get_dtype()
        return _DTYPES.get(code, torch.float32)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._file_of:
            yield name, self.get(name)


class DictSource:
    """The same interface over an in-memory state dict (a merged LoRA model)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._tensors = tensors

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[name].dtype

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self._tensors.items()


def _index_weight_files(root: Path) -> dict[str, Path]:
    index_path = _confined_file(root, SAFE_INDEX, "index")
    index = _read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: missing or empty 'weight_map'")
    files: dict[str, Path] = {}
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or not name.endswith(".safetensors"):
            raise UnsafeCheckpointError(
                f"{index_path}: tensor {tensor!r} maps to {name!r}, not a .safetensors file"
            )
        files[tensor] = _confined_file(root, name, "weight file")
    for path in sorted(set(files.values())):
        if not path.is_file():
            raise CheckpointError(f"{index_path}: weight file {path.name} is missing")
        # Every shard's header is validated now (offsets, sizes, dtypes) and must hold the
        # tensors the index sends to it: a lying shard is a checkpoint error, not a crash
        # in the middle of the compatibility checks.
        stored = set(_single_weight_files(root, path.name))
        missing = sorted(t for t, p in files.items() if p == path and t not in stored)
        if missing:
            raise CheckpointError(
                f"{index_path}: {path.name} does not hold {missing[:3]} "
                f"({len(missing)} tensor(s) the index maps to it)"
            )
    return files


def _single_weight_files(root: Path, name: str) -> dict[str, Path]:
    path = _confined_file(root, name, "weight file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return dict.fromkeys(handle.keys(), path)
    except Exception as exc:  # safetensors raises several types for corrupt headers
        raise CheckpointError(f"{path}: not a valid safetensors file: {exc}") from exc


@dataclass
class CheckpointInfo:
    """What a checkpoint directory holds, validated for safety."""

    path: Path
    kind: str  # "full" or "adapter"
    config: dict[str, Any] = field(default_factory=dict)
    adapter_config: dict[str, Any] = field(default_factory=dict)
    weight_files: dict[str, Path] = field(default_factory=dict)

    def source(self) -> SafetensorsSource:
        return SafetensorsSource(self.weight_files)

    @property
    def has_tokenizer(self) -> bool:
        return (self.path / "tokenizer_config.json").is_file() or (
            self.path / "tokenizer.json"
        ).is_file()


def _refuse_pickle_only(root: Path, what: str) -> None:
    pickles = sorted(p.name for p in root.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise UnsafeCheckpointError(
            f"{root}: only pickle weights found ({', '.join(pickles)}); pickle can execute "
            f"code and is never loaded. Convert the {what} to safetensors first."
        )
    raise CheckpointError(f"{root}: no safetensors weights found")


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Validate a model or PEFT adapter directory without loading its weights."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    for name in ("config.json", ADAPTER_CONFIG, "tokenizer_config.json", "generation_config.json"):
        candidate = root / name
        if candidate.exists():
            _confined_file(root, name, "file")
            _refuse_remote_code(candidate, _read_json(candidate))
    for name in TOKENIZER_FILES:  # refused here even when the tokenizer is never loaded
        if os.path.lexists(root / name):
            _confined_file(root, name, "tokenizer file")

    if (root / ADAPTER_CONFIG).is_file():
        adapter_config = _read_json(root / ADAPTER_CONFIG)
        peft_type = str(adapter_config.get("peft_type", "")).upper()
        if peft_type not in SUPPORTED_ADAPTERS:
            raise CheckpointError(
                f"{root}: adapter type {peft_type or '?'} is not supported (only LoRA)"
            )
        if not (root / ADAPTER_WEIGHTS).exists():
            _refuse_pickle_only(root, "adapter")
        files = _single_weight_files(root, ADAPTER_WEIGHTS)
        check_checkpoint(root, {}, files)
        return CheckpointInfo(root, "adapter", {}, adapter_config, files)

    if not (root / "config.json").is_file():
        raise CheckpointError(f"{root}: no config.json (not a Hugging Face model directory)")
    config = _read_json(root / "config.json")
    if (root / SAFE_INDEX).exists():
        files = _index_weight_files(root)
    elif (root / SAFE_SINGLE).exists():
        files = _single_weight_files(root, SAFE_SINGLE)
    else:
        _refuse_pickle_only(root, "checkpoint")
    check_checkpoint(root, config, files)  # sizes and config vs weights, before any model
    return CheckpointInfo(root, "full", config, {}, files)


def _adapter_names_base(adapter: CheckpointInfo, base: CheckpointInfo) -> bool:
    """Does the adapter's `base_model_name_or_path` name this base?

    A local directory must be the base itself; a hub id or a path from another machine
    matches on its last component (the usual "org/Model" vs ".../Model" copy). The name
    comes from an uploaded file, so `isdir` is an existence probe; it can only change the
    answer for a path whose last component equals the base's directory name, and paths
    from other machines would fail without it, so it stays.
    """
    name = str(adapter.adapter_config.get("base_model_name_or_path") or "").rstrip("/")
    if not name:
        return True
    base_real = os.path.realpath(base.path)
    if os.path.isdir(name):
        return os.path.realpath(name) == base_real
    return name == str(base.config.get("_name_or_path", "")) or (
        name.split("/")[-1] == os.path.basename(base_real)
    )


def resolve_adapter_base(adapter: CheckpointInfo, base: str | Path | None) -> CheckpointInfo:
    """The full model a LoRA adapter is merged onto: `base` when given, else the local
    directory its `base_model_name_or_path` names. The one rule of every entry point
    (repair, baselines, eval, probe, auto); a hub id or a path from another machine is
    not looked up: pass the base. Its name and shapes are checked by
    `check_adapter_matches`."""
    if base is None:
        named = adapter.adapter_config.get("base_model_name_or_path")
        if not named or not Path(str(named)).is_dir():
            raise CheckpointError(
                f"{adapter.path}: a LoRA adapter needs its base model (--base); its "
                f"adapter_config names {named!r}, not a local directory"
            )
        base = str(named)
    info = inspect_checkpoint(base)
    if info.kind != "full":
        raise CheckpointError(f"{base}: the base must be a full model, not an adapter")
    return info


def check_adapter_matches(
    base: CheckpointInfo, adapter: CheckpointInfo, *, check_name: bool = True
) -> None:
    """The adapter must name this base and its LoRA shapes must fit the base weights."""
    if check_name and not _adapter_names_base(adapter, base):
        raise IncompatibleCheckpointsError(
            f"adapter {adapter.path} was trained on "
            f"{adapter.adapter_config.get('base_model_name_or_path')!r}, not on {base.path}; "
            "pass the right base (or disable check_adapter_base_name if it is a renamed copy)"
        )
    base_src, lora_src = base.source(), adapter.source()
    for key in lora_src.keys():
        for marker, dim in ((".lora_A.", 1), (".lora_B.", 0)):
            if marker not in key:
                continue
            module = key.split(marker)[0].removeprefix("base_model.model.")
            weight = f"{module}.weight"
            if weight not in base_src:
                raise IncompatibleCheckpointsError(
                    f"adapter tensor {key} targets {weight}, which the base does not have"
                )
            want, got = base_src.shape(weight)[dim], lora_src.shape(key)[dim]
            if want != got:
                raise IncompatibleCheckpointsError(
                    f"adapter tensor {key} has size {got} where base {weight} has {want}: "
                    "the adapter belongs to another base model"
                )


def check_full_compatible(base: CheckpointInfo, finetuned: CheckpointInfo) -> list[str]:
    """Same architecture and tensor shapes; returns warnings (e.g. differing dtypes)."""
    for key in ("model_type", "architectures"):
        if base.config.get(key) != finetuned.config.get(key):
            raise IncompatibleCheckpointsError(
                f"{key} differs: base {base.config.get(key)!r}, "
                f"fine-tuned {finetuned.config.get(key)!r}"
            )
    base_src, ft_src = base.source(), finetuned.source()
    missing = sorted(set(base_src.keys()) ^ set(ft_src.keys()))
    if missing:
        raise IncompatibleCheckpointsError(
            f"tensor names differ between base and fine-tuned, e.g. {missing[:5]}"
        )
    warnings = []
    for name in base_src.keys():
        if base_src.shape(name) != ft_src.shape(name):
            raise IncompatibleCheckpointsError(
                f"{name}: shape {base_src.shape(name)} in base, {ft_src.shape(name)} fine-tuned"
            )
        if base_src.dtype(name) != ft_src.dtype(name) and not warnings:
            warnings.append(
                f"dtypes differ (e.g. {name}: {base_src.dtype(name)} vs {ft_src.dtype(name)})"
            )
    return warnings


# The compute dtypes a config may name (`dtype`; "auto" = `stored_dtype`).
COMPUTE_DTYPES = {name: getattr(torch, name) for name in COMPUTE_DTYPE_NAMES}


def compute_dtype(name: str, info: CheckpointInfo) -> torch.dtype:
    """The dtype a config's `dtype` names; "auto" is the checkpoint's stored dtype."""
    return stored_dtype(info) if name == "auto" else COMPUTE_DTYPES[name]


def stored_dtype(info: CheckpointInfo) -> torch.dtype:
    """The dtype of the checkpoint's floating weights (its first matrix)."""
    source = info.source()
    for name in source.keys():
        if len(source.shape(name)) == 2:
            return source.dtype(name)
    return torch.float32


def load_model(info: CheckpointInfo, dtype: torch.dtype, device: str = "cpu") -> Any:
    """Load a full checkpoint with transformers: safetensors only, never remote code."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(info.path),
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=False,
            local_files_only=True,
        )
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{info.path}: transformers cannot load it: {exc}") from exc
    return model.to(device).eval()


def load_merged_adapter(base: CheckpointInfo, adapter: CheckpointInfo) -> Any:
    """Base + LoRA merged by peft, on the CPU, in the base's stored dtype."""
    from peft import PeftModel

    model = load_model(base, stored_dtype(base), "cpu")
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter.path), is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise IncompatibleCheckpointsError(f"{adapter.path}: peft cannot apply it: {exc}") from exc
    return peft_model.merge_and_unload().eval()


def load_tokenizer(*infos: CheckpointInfo) -> Any:
    """The tokenizer of the first checkpoint that has one."""
    from transformers import AutoTokenizer

    for info in infos:
        if info.has_tokenizer:
            for name in TOKENIZER_FILES:
                if os.path.lexists(info.path / name):
                    _confined_file(info.path, name, "tokenizer file")
            try:
                tokenizer = AutoTokenizer.from_pretrained(
                    str(info.path), trust_remote_code=False, local_files_only=True
                )
            except Exception as exc:  # tokenizers/transformers raise many (even bare) types
                raise CheckpointError(
                    f"{info.path}: the tokenizer cannot be loaded: {type(exc).__name__}: {exc}"
                ) from exc
            _check_chat_template(info.path, tokenizer)
            return tokenizer
    raise CheckpointError(f"no tokenizer in {', '.join(str(i.path) for i in infos)}")


def _check_chat_template(path: Path, tokenizer: Any) -> None:
    """Render the chat template once on the simplest conversation. transformers renders it
    in Jinja's sandbox: an escape attempt is a SecurityError (unsafe), any other failure
    means the template cannot encode samples (invalid)."""
    if not getattr(tokenizer, "chat_template", None):
        return
    from jinja2.exceptions import SecurityError

    try:
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False
        )
    except SecurityError as exc:
        raise UnsafeCheckpointError(
            f"{path}: the chat template tries to escape its sandbox: {exc}"
        ) from exc
    except Exception as exc:
        raise CheckpointError(
            f"{path}: the chat template cannot be rendered: {type(exc).__name__}: {exc}"
        ) from exc
