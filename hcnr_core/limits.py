"""How much work one repair's inputs may demand: the limits, and the checks that apply them.

The library, the CLI and the service read the same `Limits` (environment variables
prefixed `HCNR_`, e.g. `HCNR_MAX_PARAMETERS`); the service's `Settings` inherits these
fields, so they are documented once. No torch here: the API imports it cheaply.

    with use_limits(Limits(max_tokens_per_job=100_000)):
        pipeline.prepare(...)            # checks against these limits

The checks run before any model is built: `check_checkpoint` (called by
`inspect_checkpoint`) compares `config.json` and the safetensors headers with the limits
and with each other; `check_data` (called by `RepairPipeline.prepare` before encoding,
and by `hcnr_core.bounded.validate_inputs` for every method) counts samples, bytes and
tokens. What can still run away (chat template, tokenizer, the meta model) runs under
`validation_timeout_seconds` in a child process (`hcnr_core.bounded`).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import re
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from hcnr_core.errors import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointTooLargeError,
    DataTooLargeError,
    HCNRError,
    TooManySamplesError,
    TooManyTokensError,
)

GIB = 1024**3
MIB = 1024**2


class Limits(BaseSettings):
    """Bounds on what one repair (one job, one `hcnr repair`) may ask of the machine."""

    model_config = SettingsConfigDict(env_prefix="HCNR_", env_file=None, extra="ignore")

    max_hidden_size: int = Field(
        32_768, ge=1, description="Largest hidden size (config.json) a checkpoint may declare"
    )
    max_intermediate_size: int = Field(
        262_144, ge=1, description="Largest MLP intermediate size a checkpoint may declare"
    )
    max_layers: int = Field(512, ge=1, description="Most decoder layers a checkpoint may declare")
    max_vocab_size: int = Field(
        1_048_576, ge=1, description="Largest vocabulary a checkpoint may declare"
    )
    max_parameters: int = Field(
        20_000_000_000,
        ge=1,
        description="Most parameters a checkpoint may hold (safetensors headers) or its "
        "config.json may describe",
    )
    max_checkpoint_bytes: int = Field(
        80 * GIB, ge=1, description="Most bytes of tensor data a checkpoint's safetensors may hold"
    )
    max_samples: int = Field(
        100_000, ge=1, description="Most samples one data file (honesty/task/eval) may have"
    )
    max_data_bytes: int = Field(
        256 * MIB, ge=1, description="Most bytes the data files of one repair may have in all"
    )
    max_tokens_per_sample: int = Field(
        32_768,
        ge=1,
        description="Most tokens one sample may have (prompt rendered by the chat template "
        "+ response), counted before truncation to max_seq_len",
    )
    max_tokens_per_job: int = Field(
        8_000_000, ge=1, description="Most tokens all samples of one repair may have in all"
    )
    validation_timeout_seconds: float = Field(
        120.0,
        gt=0,
        description="Wall-clock limit of the validation (checkpoint checks, chat template, "
        "tokenization, meta model); exceeding it is error validation_timeout",
    )
    validation_memory_mb: int = Field(
        8192,
        ge=0,
        description="Address-space limit (RLIMIT_AS, MiB) of the validation's child process; "
        "0: none",
    )
    validation_isolation: bool = Field(
        True,
        description="Validate in a child process (killed at the time limit, CPU and memory "
        "rlimits); off: in this process, with no time limit",
    )
    max_concurrent_validations: int = Field(
        2,
        ge=1,
        description="Validations that run at once in one process; the others wait (their "
        "wait counts towards validation_timeout_seconds)",
    )


_current: contextvars.ContextVar[Limits | None] = contextvars.ContextVar(
    "hcnr_limits", default=None
)


def current_limits() -> Limits:
    """The limits set by `use_limits`, else those of the environment (`HCNR_*`)."""
    limits = _current.get()
    return limits if limits is not None else Limits()


@contextlib.contextmanager
def use_limits(limits: Limits) -> Iterator[Limits]:
    token = _current.set(limits)
    try:
        yield limits
    finally:
        _current.reset(token)


# --- checkpoints ---------------------------------------------------------------------------

HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")
INTERMEDIATE_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "d_ff")
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
VOCAB_KEYS = ("vocab_size",)
SUB_CONFIGS = ("text_config", "language_config", "llm_config", "decoder")
MAX_HEADER_BYTES = 100 * MIB  # what safetensors itself accepts
_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")
_SLACK_PARAMETERS = 1_000_000


def _dimension(config: Mapping[str, Any], keys: tuple[str, ...], path: Path) -> int | None:
    for key in keys:
        if key in config and config[key] is not None:
            value = config[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CheckpointError(
                    f"{path}: {key} must be a non-negative integer, got {value!r}"
                )
            return value
    return None


def config_dimensions(config: Mapping[str, Any], path: Path) -> dict[str, int]:
    """hidden/intermediate/layers/vocab of a config.json (the largest over its sub-configs)."""
    configs = [config] + [config[k] for k in SUB_CONFIGS if isinstance(config.get(k), dict)]
    dims: dict[str, int] = {}
    for sub in configs:
        for name, keys in (
            ("hidden_size", HIDDEN_KEYS),
            ("intermediate_size", INTERMEDIATE_KEYS),
            ("layers", LAYER_KEYS),
            ("vocab_size", VOCAB_KEYS),
        ):
            value = _dimension(sub, keys, path)
            if value is not None:
                dims[name] = max(dims.get(name, 0), value)
    return dims


def config_parameter_floor(dims: Mapping[str, int]) -> int:
    """A lower bound of the parameters a model with these dimensions has: the embedding
    and one hidden x hidden matrix per layer (every decoder layer has at least that)."""
    hidden = dims.get("hidden_size", 0)
    return dims.get("vocab_size", 0) * hidden + dims.get("layers", 0) * hidden * hidden


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, read without torch (8-byte length + JSON)."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: not a valid safetensors file (too short)")
            (length,) = struct.unpack("<Q", raw)
            if length > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: safetensors header of {length} bytes is too large")
            header = json.loads(handle.read(length))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file: {exc}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a valid safetensors file (header not an object)")
    return header


def stored_totals(files: Mapping[str, Path]) -> dict[str, int]:
    """Parameters and tensor-data bytes of the tensors `files` maps (tensor -> file), and
    the number of numbered layers their names show."""
    parameters = data_bytes = 0
    layers: set[int] = set()
    wanted: dict[Path, set[str]] = {}
    for tensor, path in files.items():
        wanted.setdefault(path, set()).add(tensor)
    for path, names in wanted.items():
        header = read_safetensors_header(path)
        for name, entry in header.items():
            if name == "__metadata__" or name not in names or not isinstance(entry, dict):
                continue
            shape = entry.get("shape") or []
            parameters += math.prod(int(d) for d in shape)
            offsets = entry.get("data_offsets") or [0, 0]
            data_bytes += int(offsets[1]) - int(offsets[0])
            match = _LAYER_INDEX.search(name)
            if match:
                layers.add(int(match.group(1)))
    return {"parameters": parameters, "bytes": data_bytes, "layers": len(layers)}


def check_checkpoint(
    path: Path, config: Mapping[str, Any], files: Mapping[str, Path], limits: Limits | None = None
) -> dict[str, int]:
    """Refuse a checkpoint whose declared or stored size exceeds the limits
    (`checkpoint_too_large`) or whose config describes a far larger model than its
    weights hold (`checkpoint_config_mismatch`: the meta model would be built from the
    config). `config` is empty for an adapter. Returns the stored totals."""
    limits = limits or current_limits()
    dims = config_dimensions(config, path / "config.json") if config else {}
    for name, limit in (
        ("hidden_size", limits.max_hidden_size),
        ("intermediate_size", limits.max_intermediate_size),
        ("layers", limits.max_layers),
        ("vocab_size", limits.max_vocab_size),
    ):
        if dims.get(name, 0) > limit:
            raise CheckpointTooLargeError(
                f"{path}: config.json declares {name} {dims[name]}; the limit is {limit}",
                limit=f"max_{name}" if name != "layers" else "max_layers",
                value=dims[name],
                allowed=limit,
            )
    floor = config_parameter_floor(dims)
    if floor > limits.max_parameters:
        raise CheckpointTooLargeError(
            f"{path}: config.json describes at least {floor} parameters; "
            f"the limit is {limits.max_parameters}",
            limit="max_parameters",
            value=floor,
            allowed=limits.max_parameters,
        )
    totals = stored_totals(files)
    if totals["parameters"] > limits.max_parameters:
        raise CheckpointTooLargeError(
            f"{path}: the weights hold {totals['parameters']} parameters; "
            f"the limit is {limits.max_parameters}",
            limit="max_parameters",
            value=totals["parameters"],
            allowed=limits.max_parameters,
        )
    if totals["bytes"] > limits.max_checkpoint_bytes:
        raise CheckpointTooLargeError(
            f"{path}: the weights hold {totals['bytes']} bytes; "
            f"the limit is {limits.max_checkpoint_bytes}",
            limit="max_checkpoint_bytes",
            value=totals["bytes"],
            allowed=limits.max_checkpoint_bytes,
        )
    if config and floor > 2 * totals["parameters"] + _SLACK_PARAMETERS:
        raise CheckpointMismatchError(
            f"{path}: config.json describes at least {floor} parameters but the safetensors "
            f"hold {totals['parameters']}: the config does not belong to these weights"
        )
    if config and totals["layers"] and dims.get("layers", 0) > totals["layers"]:
        raise CheckpointMismatchError(
            f"{path}: config.json declares {dims['layers']} layers but the safetensors "
            f"hold weights of {totals['layers']}"
        )
    return totals


# --- data ------------------------------------------------------------------------------------


def check_data_bytes(paths: Mapping[str, str | Path | None], limits: Limits | None = None) -> int:
    """The data files' total size against `max_data_bytes`; returns it."""
    limits = limits or current_limits()
    total = 0
    for path in paths.values():
        if path is not None and Path(path).is_file():
            total += Path(path).stat().st_size
    if total > limits.max_data_bytes:
        raise DataTooLargeError(
            f"the data files hold {total} bytes in all; the limit is {limits.max_data_bytes}",
            limit="max_data_bytes",
            value=total,
            allowed=limits.max_data_bytes,
        )
    return total


def check_sample_counts(sets: Mapping[str, list[Any]], limits: Limits | None = None) -> None:
    limits = limits or current_limits()
    for name, samples in sets.items():
        if len(samples) > limits.max_samples:
            raise TooManySamplesError(
                f"{name}: {len(samples)} samples; the limit is {limits.max_samples}",
                limit="max_samples",
                value=len(samples),
                allowed=limits.max_samples,
            )


def check_tokens(
    tokenizer: Any, sets: Mapping[str, list[Any]], limits: Limits | None = None
) -> int:
    """Tokens of every sample (chat-template prompt + response + EOS, before truncation)
    against `max_tokens_per_sample` and, summed, `max_tokens_per_job`; returns the sum.
    Stops at the first sample over a limit: the rest need not be tokenized."""
    from hcnr_core.data import render_prompt

    limits = limits or current_limits()
    total = 0
    for name, samples in sets.items():
        for sample in samples:
            rendered = render_prompt(tokenizer, sample.messages)
            prompt, response = _tokenize(tokenizer, (rendered, sample.response), name, sample)
            count = len(prompt["input_ids"]) + len(response["input_ids"]) + 1
            if count > limits.max_tokens_per_sample:
                raise TooManyTokensError(
                    f"{name}: the sample on line {sample.line} has {count} tokens; the limit "
                    f"is {limits.max_tokens_per_sample} per sample",
                    limit="max_tokens_per_sample",
                    value=count,
                    allowed=limits.max_tokens_per_sample,
                )
            total += count
            if total > limits.max_tokens_per_job:
                raise TooManyTokensError(
                    f"the samples hold more than {limits.max_tokens_per_job} tokens in all "
                    f"(the limit per repair); reached at {name} line {sample.line}",
                    limit="max_tokens_per_job",
                    value=total,
                    allowed=limits.max_tokens_per_job,
                )
    return total


def _tokenize(tokenizer: Any, texts: tuple[str, str], name: str, sample: Any) -> list[Any]:
    """The tokenizer on each text; its failures (a Rust panic is a BaseException: a
    regex over its backtracking limit) become a checkpoint error with the line."""
    try:
        return [tokenizer(text, add_special_tokens=False) for text in texts]
    except (KeyboardInterrupt, SystemExit, GeneratorExit, HCNRError):
        raise
    except BaseException as exc:
        raise CheckpointError(
            f"the tokenizer fails on {name} line {sample.line}: {type(exc).__name__}: "
            f"{str(exc)[:300]}"
        ) from exc


def check_data(
    tokenizer: Any,
    sets: Mapping[str, list[Any]],
    paths: Mapping[str, str | Path | None] | None = None,
    limits: Limits | None = None,
) -> int:
    """Bytes, samples per set, tokens per sample and in all; returns the tokens."""
    limits = limits or current_limits()
    if paths:
        check_data_bytes(paths, limits)
    check_sample_counts(sets, limits)
    return check_tokens(tokenizer, sets, limits)
