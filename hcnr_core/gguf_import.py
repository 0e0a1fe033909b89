"""GGUF → Hugging Face checkpoint (DESIGN.md §9: the real models arrive as GGUF).

`import_gguf` turns a (quantized) GGUF file into a directory that
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load with no
GGUF involved: config.json without a quantization config, safetensors weights, the
tokenizer with the GGUF's chat template, and generation_config.json.

Order of work, so that a bad file costs nothing:
1. the header is parsed here, bounded (counts, string and array lengths, dimensions,
   tensor extents against the file size) before anything is allocated: a truncated,
   corrupt or absurd file is `invalid_gguf`;
2. `general.architecture` is checked against what transformers' GGUF loader can build
   (`unsupported_architecture`, with the supported list) before any tensor is read;
3. transformers' loader (`from_pretrained(dir, gguf_file=...)`, the `gguf` package)
   dequantizes; the weights are copied into a plain model built from the config without
   the quantization config, saved with `save_pretrained` into a staging directory beside
   `out_dir` and renamed into place at the end (nothing half-written is ever visible).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hcnr_core.errors import InvalidGGUFError, UnsupportedGGUFArchitectureError

# Bump when the importer's output changes: cached imports (hcnr_core.realmodels) are rebuilt.
IMPORTER_VERSION = 1
MANIFEST_NAME = "gguf_import.json"
DTYPES = ("float32", "bfloat16")

# Bounds on what a header may declare, checked before anything is allocated or read.
MAX_TENSORS = 1 << 16
MAX_KV = 1 << 16
MAX_STRING_BYTES = 16 << 20  # one metadata string (chat templates are kilobytes)
MAX_NAME_BYTES = 1024  # a tensor name (ggml's own limit is 64)
MAX_ARRAY_LEN = 1 << 24  # vocabularies and merge tables are ~10^5-10^6
MAX_ARRAY_DEPTH = 2
MAX_TENSOR_DIMS = 4  # GGML_MAX_DIMS
MAX_TENSOR_ELEMENTS = 1 << 36
MAX_PARAMETERS = 16 * 10**9
MAX_ALIGNMENT = 1 << 16
GGUF_VERSIONS = (2, 3)

# GGUF metadata value types: fixed-size ones by struct format, then string (8), array (9).
_FIXED = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# transformers' names for GGUF architectures that differ from the GGUF's own.
_GGUF_ARCH_OF = {
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "gpt_oss": "gpt-oss",
    "minimax_m2": "minimax-m2",
}
_MODEL_TYPE_OF = {"gemma3": "gemma3_text", "gemma4": "gemma4_text"}


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: fastest-moving dimension first
    type_id: int
    offset: int  # from the start of the data section
    nbytes: int

    @property
    def elements(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n


@dataclass
class GGUFHeader:
    """What a GGUF file declares, validated against its size. Arrays are not loaded: they
    keep (element type, length, file offset of the first element)."""

    path: Path
    version: int
    file_size: int
    metadata: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    tensors: list[GGUFTensorInfo] = field(default_factory=list)
    data_offset: int = 0

    @property
    def architecture(self) -> str:
        return str(self.metadata["general.architecture"])

    @property
    def parameters(self) -> int:
        return sum(t.elements for t in self.tensors)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def array_item(self, key: str, index: int) -> Any:
        """Element `index` of a numeric metadata array (None when absent or out of range)."""
        element, length, offset = self.arrays.get(key, (None, 0, 0))
        if element not in _FIXED or not 0 <= index < length:
            return None
        fmt = "<" + _FIXED[element]
        with self.path.open("rb") as handle:
            handle.seek(offset + index * struct.calcsize(fmt))
            return struct.unpack(fmt, handle.read(struct.calcsize(fmt)))[0]


@dataclass(frozen=True)
class ImportProgress:
    """Fed to `progress`; `stage` and `fraction` (0-1) are what the CLI's bar reads."""

    stage: str
    fraction: float
    message: str = ""


class _Cursor:
    """Bounded reads over a mapped file: every read is checked against the file size."""

    def __init__(self, buf: Any, size: int, path: Path, endian: str):
        self.buf, self.size, self.path, self.endian, self.pos = buf, size, path, endian, 0

    def _need(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > self.size:
            raise InvalidGGUFError(
                f"{self.path}: truncated or corrupt: {what} needs {n} bytes at offset "
                f"{self.pos}, the file has {self.size}"
            )
        start = self.pos
        self.pos += n
        return start

    def unpack(self, fmt: str, what: str) -> Any:
        width = struct.calcsize(self.endian + fmt)
        (value,) = struct.unpack_from(self.endian + fmt, self.buf, self._need(width, what))
        return value

    def skip(self, n: int, what: str) -> None:
        self._need(n, what)

    def string(self, what: str, limit: int = MAX_STRING_BYTES) -> str:
        length = self.unpack("Q", f"length of {what}")
        if length > limit:
            raise InvalidGGUFError(f"{self.path}: {what} declares {length} bytes (limit {limit})")
        start = self._need(length, what)
        try:
            return bytes(self.buf[start : start + length]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidGGUFError(f"{self.path}: {what} is not UTF-8") from exc


def _read_value(cur: _Cursor, type_id: int, key: str, depth: int = 0) -> tuple[Any, Any]:
    """(value, array_info): scalars and strings are returned; arrays are walked and
    skipped, their (element type, length, offset) returned instead (and small numeric
    arrays' values)."""
    if type_id in _FIXED:
        return cur.unpack(_FIXED[type_id], f"value of {key!r}"), None
    if type_id == _STRING:
        return cur.string(f"value of {key!r}"), None
    if type_id != _ARRAY:
        raise InvalidGGUFError(f"{cur.path}: metadata {key!r} has unknown value type {type_id}")
    if depth >= MAX_ARRAY_DEPTH:
        raise InvalidGGUFError(f"{cur.path}: metadata {key!r} nests arrays too deeply")
    element = cur.unpack("I", f"array type of {key!r}")
    length = cur.unpack("Q", f"array length of {key!r}")
    if length > MAX_ARRAY_LEN:
        raise InvalidGGUFError(
            f"{cur.path}: metadata {key!r} declares {length} elements (limit {MAX_ARRAY_LEN})"
        )
    first = cur.pos
    if element in _FIXED:
        width = struct.calcsize(cur.endian + _FIXED[element])
        values = None
        if length <= 64:  # small numeric arrays (e.g. several eos ids) are kept
            start = cur.pos
            cur.skip(width * length, f"array {key!r}")
            values = list(
                struct.unpack_from(f"{cur.endian}{length}{_FIXED[element]}", cur.buf, start)
            )
        else:
            cur.skip(width * length, f"array {key!r}")
        return values, (element, length, first)
    if element == _STRING:
        for _ in range(length):
            n = cur.unpack("Q", f"string length in array {key!r}")
            if n > MAX_STRING_BYTES:
                raise InvalidGGUFError(f"{cur.path}: a string in {key!r} declares {n} bytes")
            cur.skip(n, f"string in array {key!r}")
        return None, (element, length, first)
    if element == _ARRAY:
        for _ in range(length):
            _read_value(cur, _ARRAY, key, depth + 1)
        return None, (element, length, first)
    raise InvalidGGUFError(f"{cur.path}: array {key!r} has unknown element type {element}")


def _quant_sizes() -> dict[int, tuple[int, int]]:
    from gguf.constants import GGML_QUANT_SIZES

    return {int(k): (int(v[0]), int(v[1])) for k, v in GGML_QUANT_SIZES.items()}


def read_gguf_header(path: str | Path, *, max_parameters: int = MAX_PARAMETERS) -> GGUFHeader:
    """Parse and validate a GGUF header without reading tensor data (`invalid_gguf`)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidGGUFError(f"{path}: no such file")
    size = path.stat().st_size
    if size < 24:
        raise InvalidGGUFError(f"{path}: {size} bytes, too short to be a GGUF file")
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if bytes(buf[:4]) != b"GGUF":
            raise InvalidGGUFError(f"{path}: not a GGUF file (no GGUF magic bytes)")
        endian = "<"
        (version,) = struct.unpack_from("<I", buf, 4)
        if version not in GGUF_VERSIONS and struct.unpack_from(">I", buf, 4)[0] in GGUF_VERSIONS:
            raise InvalidGGUFError(f"{path}: big-endian GGUF files are not supported")
        if version not in GGUF_VERSIONS:
            raise InvalidGGUFError(f"{path}: GGUF version {version} is not supported (2, 3)")
        cur = _Cursor(buf, size, path, endian)
        cur.pos = 8
        n_tensors = cur.unpack("Q", "tensor count")
        n_kv = cur.unpack("Q", "metadata count")
        # The smallest metadata entry takes 13 bytes, the smallest tensor entry 32.
        if n_tensors > MAX_TENSORS or n_tensors * 32 > size:
            raise InvalidGGUFError(f"{path}: declares {n_tensors} tensors (absurd for its size)")
        if n_kv > MAX_KV or n_kv * 13 > size:
            raise InvalidGGUFError(f"{path}: declares {n_kv} metadata entries (absurd)")
        header = GGUFHeader(path=path, version=version, file_size=size)
        for _ in range(n_kv):
            key = cur.string("metadata key", MAX_NAME_BYTES)
            type_id = cur.unpack("I", f"type of {key!r}")
            value, array = _read_value(cur, type_id, key)
            if array is not None:
                header.arrays[key] = array
            if value is not None:
                header.metadata[key] = value
        arch = header.metadata.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise InvalidGGUFError(f"{path}: no general.architecture in the metadata")
        sizes = _quant_sizes()
        names: set[str] = set()
        for _ in range(n_tensors):
            name = cur.string("tensor name", MAX_NAME_BYTES)
            if name in names:
                raise InvalidGGUFError(f"{path}: tensor {name!r} appears twice")
            names.add(name)
            n_dims = cur.unpack("I", f"dimension count of {name!r}")
            if not 1 <= n_dims <= MAX_TENSOR_DIMS:
                raise InvalidGGUFError(f"{path}: tensor {name!r} has {n_dims} dimensions")
            shape = tuple(cur.unpack("Q", f"dimensions of {name!r}") for _ in range(n_dims))
            elements = 1
            for dim in shape:
                if not 1 <= dim <= MAX_TENSOR_ELEMENTS:
                    raise InvalidGGUFError(f"{path}: tensor {name!r} has dimension {dim}")
                elements *= dim
            if elements > MAX_TENSOR_ELEMENTS:
                raise InvalidGGUFError(f"{path}: tensor {name!r} declares {elements} elements")
            type_id = cur.unpack("I", f"type of {name!r}")
            if type_id not in sizes:
                raise InvalidGGUFError(f"{path}: tensor {name!r} has unknown ggml type {type_id}")
            block, block_bytes = sizes[type_id]
            if shape[0] % block:
                raise InvalidGGUFError(
                    f"{path}: tensor {name!r} row of {shape[0]} is not a multiple of the "
                    f"type's block of {block}"
                )
            offset = cur.unpack("Q", f"offset of {name!r}")
            info = GGUFTensorInfo(name, shape, type_id, offset, elements // block * block_bytes)
            header.tensors.append(info)
        alignment = header.metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or not 0 < alignment <= MAX_ALIGNMENT:
            raise InvalidGGUFError(f"{path}: general.alignment {alignment!r} is invalid")
        if alignment & (alignment - 1):
            raise InvalidGGUFError(f"{path}: general.alignment {alignment} is not a power of 2")
        header.data_offset = -(-cur.pos // alignment) * alignment
    data_bytes = size - header.data_offset
    end = 0
    for info in sorted(header.tensors, key=lambda t: t.offset):
        if info.offset % alignment:
            raise InvalidGGUFError(f"{path}: tensor {info.name!r} is not aligned")
        if info.offset < end:
            raise InvalidGGUFError(f"{path}: tensor {info.name!r} overlaps the one before it")
        end = info.offset + info.nbytes
        if end > data_bytes:
            raise InvalidGGUFError(
                f"{path}: truncated: tensor {info.name!r} ends at byte "
                f"{header.data_offset + end}, the file has {size}"
            )
    if not header.tensors:
        raise InvalidGGUFError(f"{path}: holds no tensors")
    if header.parameters > max_parameters:
        raise InvalidGGUFError(
            f"{path}: {header.parameters} parameters, over the limit of {max_parameters}"
        )
    return header


def supported_architectures() -> list[str]:
    """GGUF `general.architecture` values the installed transformers can import as a
    causal LM (its legacy GGUF loader and, in newer versions, its native GGUF path)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    found = set()
    for key in GGUF_SUPPORTED_ARCHITECTURES:
        if _MODEL_TYPE_OF.get(key, key) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            found.add(_GGUF_ARCH_OF.get(key, key))
    try:  # transformers >= 5.x: architectures loaded by its own GGUF reader
        from transformers.integrations.gguf import GGUF_ARCHS

        found.update(GGUF_ARCHS)
    except ImportError:
        pass
    return sorted(found)


def check_architecture(header: GGUFHeader) -> None:
    supported = supported_architectures()
    if header.architecture not in supported:
        raise UnsupportedGGUFArchitectureError(
            f"{header.path}: GGUF architecture {header.architecture!r} cannot be imported by "
            f"the installed transformers' GGUF loader; supported: {', '.join(supported)}"
        )


_IMPORT_LOCK = threading.Lock()


@contextlib.contextmanager
def _parse_once(gguf_path: Path) -> Iterator[None]:
    """transformers re-parses the whole GGUF for the config, the weights and the tokenizer
    (a ~260k-token vocabulary takes tens of seconds each time) and rebuilds gguf's tensor
    name map once per module. For the duration of one import this shares a single reader
    and memoizes the metadata-only parses and the name maps (and silences its tqdm bar when
    transformers' progress bars are off). The patches are module attributes looked up at
    call time, restored afterwards; imports are serialized."""
    import gguf
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils.logging import is_progress_bar_enabled

    real = os.path.realpath(gguf_path)
    original_reader, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    original_load = gguf_utils.load_gguf_checkpoint
    original_tqdm = getattr(gguf_utils, "tqdm", None)
    readers: dict[str, Any] = {}
    parsed: dict[str, Any] = {}

    def reader(path: Any, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs or os.path.realpath(path) != real:
            return original_reader(path, *args, **kwargs)
        if real not in readers:
            readers[real] = original_reader(path)
        return readers[real]

    def load(path: Any, return_tensors: bool = False, *args: Any, **kwargs: Any) -> Any:
        if return_tensors or args or kwargs or os.path.realpath(path) != real:
            return original_load(path, return_tensors, *args, **kwargs)
        if real not in parsed:
            parsed[real] = original_load(path, False)
        return copy.deepcopy(parsed[real])

    with _IMPORT_LOCK:
        gguf.GGUFReader = reader
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original_map)
        gguf_utils.load_gguf_checkpoint = load
        if original_tqdm is not None and not is_progress_bar_enabled():
            # its own tqdm bar ignores transformers' switch
            gguf_utils.tqdm = functools.partial(original_tqdm, disable=True)
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_map
            gguf_utils.load_gguf_checkpoint = original_load
            if original_tqdm is not None:
                gguf_utils.tqdm = original_tqdm


def _dequantized_model(gguf_path: Path) -> Any:
    """transformers' GGUF load, every weight dequantized to float32."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    try:  # transformers 5 can keep GGUF blocks packed; older versions always dequantize
        from transformers.utils.quantization_config import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    model, info = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent),
        gguf_file=gguf_path.name,
        dtype=torch.float32,
        local_files_only=True,
        trust_remote_code=False,
        output_loading_info=True,
        **kwargs,
    )
    missing = sorted(set(info.get("missing_keys") or ()))
    if missing:
        raise InvalidGGUFError(
            f"{gguf_path}: the GGUF lacks weights the model needs, e.g. {missing[:5]} "
            f"({len(missing)} missing)"
        )
    return model


def _tokenizer(gguf_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        str(gguf_path.parent),
        gguf_file=gguf_path.name,
        local_files_only=True,
        trust_remote_code=False,
    )


# llama.cpp's token types: 1 normal and 6 byte are content; 2 unknown, 3 control,
# 4 user-defined and 5 unused are not.
_CONTENT_TOKEN_TYPES = (1, 6)


def _is_content_token(header: GGUFHeader, token_id: int) -> bool:
    """Judged by the GGUF's own token types (transformers' tokenizer already calls the
    GGUF's padding token special, whatever it is). Without types, trust the GGUF."""
    return header.array_item("tokenizer.ggml.token_type", token_id) in _CONTENT_TOKEN_TYPES


def _int_ids(value: Any) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _special_ids(header: GGUFHeader, tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """bos, eos (with end-of-turn ids the GGUF names) and pad. Pad comes from the GGUF when
    it names a special token; otherwise it falls back to eos, never silently to a content
    token (`pad_source` records which)."""

    def first(key: str) -> int | None:
        ids = [i for i in _int_ids(header.get(key)) if 0 <= i < vocab_size]
        return ids[0] if ids else None

    bos, eos = first("tokenizer.ggml.bos_token_id"), first("tokenizer.ggml.eos_token_id")
    if eos is None and tokenizer.eos_token_id is not None:
        eos = int(tokenizer.eos_token_id)
    eos_ids = [eos] if eos is not None else []
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        extra = first(key)
        if extra is not None and extra not in eos_ids:
            eos_ids.append(extra)
    pad, pad_source, warnings = first("tokenizer.ggml.padding_token_id"), "gguf", []
    if pad is not None and _is_content_token(header, pad):
        warnings.append(
            f"the GGUF's padding token {pad} ({tokenizer.convert_ids_to_tokens(pad)!r}) is a "
            "content token; padding with eos instead"
        )
        pad = None
    if pad is None:
        pad, pad_source = eos, "eos" if eos is not None else "none"
    return {"bos": bos, "eos": eos_ids, "pad": pad, "pad_source": pad_source, "warnings": warnings}


def _plain_config(config: Any) -> Any:
    config = copy.deepcopy(config)
    config.__dict__.pop("quantization_config", None)
    return config


def _check_ties(header: GGUFHeader, model: Any) -> bool:
    """GGUF files leave out `output.weight` when the head is the embedding."""
    has_output = any(t.name == "output.weight" for t in header.tensors)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.weight.data_ptr()
    if bool(model.config.tie_word_embeddings) != tied or (not has_output and not tied):
        raise InvalidGGUFError(
            f"{header.path}: tied embeddings did not survive the import (GGUF output.weight "
            f"{'present' if has_output else 'absent'}, tie_word_embeddings "
            f"{model.config.tie_word_embeddings}, lm_head tied {tied})"
        )
    return tied


def import_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    progress: Callable[[ImportProgress], None] | None = None,
    max_parameters: int = MAX_PARAMETERS,
) -> Path:
    """Import a GGUF checkpoint as a Hugging Face directory at `out_dir`; returns it.

    Raises `InvalidGGUFError` (invalid_gguf), `UnsupportedGGUFArchitectureError`
    (unsupported_architecture, decided from the header before any tensor is read) and
    `OutputExistsError` (output_exists: `out_dir` exists and is not an empty directory).
    """
    from hcnr_core.writer import StagedOutput, check_output_dir, sha256_file

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    gguf_path, out = Path(gguf_path), Path(out_dir)
    report = progress or (lambda _event: None)
    started = time.monotonic()
    check_output_dir(out)
    report(ImportProgress("header", 0.0, str(gguf_path)))
    header = read_gguf_header(gguf_path, max_parameters=max_parameters)
    check_architecture(header)
    source = {
        "file": gguf_path.name,
        "bytes": header.file_size,
        "mtime_ns": gguf_path.stat().st_mtime_ns,
    }

    import torch
    from transformers import GenerationConfig

    with _parse_once(gguf_path):
        report(ImportProgress("dequantize", 0.05))
        try:
            loaded = _dequantized_model(gguf_path)
            report(ImportProgress("tokenizer", 0.55))
            tokenizer = _tokenizer(gguf_path)
        except InvalidGGUFError:
            raise
        except (ValueError, KeyError, IndexError, OSError, RuntimeError, struct.error) as exc:
            raise InvalidGGUFError(
                f"{gguf_path}: transformers cannot load it: {type(exc).__name__}: {exc}"
            ) from exc

    report(ImportProgress("convert", 0.7))
    config = _plain_config(loaded.config)
    model, info = type(loaded).from_pretrained(
        None,
        config=config,
        state_dict=loaded.state_dict(),
        dtype=getattr(torch, dtype),
        output_loading_info=True,
    )
    del loaded
    bad = sorted(set(info.get("missing_keys") or ()) | set(info.get("unexpected_keys") or ()))
    if bad:
        raise InvalidGGUFError(f"{gguf_path}: weights did not carry over, e.g. {bad[:5]}")
    model.eval()
    tied = _check_ties(header, model)

    ids = _special_ids(header, tokenizer, int(model.config.vocab_size))
    template = header.get("tokenizer.chat_template")
    if isinstance(template, str) and template and tokenizer.chat_template != template:
        tokenizer.chat_template = template
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and max_positions > 0:
        tokenizer.model_max_length = max_positions
    if ids["pad"] is not None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(ids["pad"])
    eos = ids["eos"][0] if len(ids["eos"]) == 1 else (ids["eos"] or None)
    model.config.bos_token_id, model.config.eos_token_id = ids["bos"], eos
    model.config.pad_token_id = ids["pad"]
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos"], eos_token_id=eos, pad_token_id=ids["pad"]
    )

    report(ImportProgress("save", 0.8))
    with StagedOutput(out) as staged:
        model.save_pretrained(staged.dir, safe_serialization=True, max_shard_size="2GB")
        tokenizer.save_pretrained(staged.dir)
        _tidy_tokenizer_config(staged.dir / "tokenizer_config.json")
        _refuse_leftovers(staged.dir)
        files = sorted(p.name for p in staged.dir.iterdir())
        manifest = {
            "importer_version": IMPORTER_VERSION,
            "source": {**source, "sha256": sha256_file(gguf_path)},
            "architecture": header.architecture,
            "model_type": model.config.model_type,
            "name": header.get("general.name"),
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "dtype": dtype,
            "tied": tied,
            "bos_token_id": ids["bos"],
            "eos_token_id": ids["eos"],
            "pad_token_id": ids["pad"],
            "pad_source": ids["pad_source"],
            "chat_template": bool(tokenizer.chat_template),
            "warnings": ids["warnings"],
            "seconds": round(time.monotonic() - started, 3),
            "files": [*files, MANIFEST_NAME],
        }
        staged.write_text(MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
        published = staged.publish()
    report(ImportProgress("done", 1.0))
    return published


def _tidy_tokenizer_config(path: Path) -> None:
    """Loading kwargs that transformers records as init kwargs say nothing about the model."""
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only", "gguf_file", "trust_remote_code"):
        data.pop(key, None)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _refuse_leftovers(directory: Path) -> None:
    """What we publish is plain: no quantization config, no pickle weights."""
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" in config:
        raise InvalidGGUFError("internal: config.json still holds a quantization_config")
    pickles = [p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
    if pickles:
        raise InvalidGGUFError(f"internal: save_pretrained wrote pickle files {pickles}")


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The import manifest of a directory `import_gguf` wrote, or None."""
    try:
        data = json.loads((Path(directory) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
