"""Hostile inputs for the security tests and `bench/reliability_security.py`: malicious
checkpoints, reference strings, malformed JSONL, and the instruments that prove what the
service did with them (a Python audit hook; an strace of a real server process).

Everything here is importable without pytest so that the benchmark can run the same cases.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

# --- the world: a models root with the toy and hostile checkpoints, bait outside it ----


@dataclass
class World:
    top: Path  # everything below; the models root's parent
    models: Path  # HCNR_MODELS_ROOT
    outside: Path  # bait outside the models root: a valid checkpoint, a secret, weights
    sentinel: Path  # created by any pickle / remote-code payload that runs
    honesty: Path
    task: Path
    checkpoint_cases: list[CheckpointCase] = field(default_factory=list)


class Payload:
    """Unpickling this creates `sentinel`: proof that pickle was (not) loaded."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (self.sentinel,))


def write_pickle_payload(path: Path, sentinel: Path) -> None:
    with path.open("wb") as handle:
        pickle.dump({"model.embed_tokens.weight": Payload(sentinel)}, handle)


def read_safetensors(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def write_safetensors(
    path: Path, header: dict[str, Any] | bytes, data: bytes, length: int | None = None
) -> None:
    """Raw safetensors bytes; `length` overrides the 8-byte header length (a lie)."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)


def _tensors(header: dict[str, Any]) -> list[str]:
    return [k for k in header if k != "__metadata__"]


def _edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# --- malicious checkpoints (figure 5) ----------------------------------------------------


@dataclass(frozen=True)
class CheckpointCase:
    name: str
    source: str  # what is copied first: "base" (full model) or "adapter"
    mutate: Callable[[Path, World], None]
    code: str | None  # expected error code; None: accepted (harmless), reads stay inside
    roles: tuple[str, ...] = ("base", "finetuned")
    reference: str = ""  # default: path:hostile/<name>

    @property
    def ref(self) -> str:
        return self.reference or f"path:hostile/{self.name}"


def _pickle_only(ckpt: Path, world: World) -> None:
    (ckpt / "model.safetensors").unlink()
    write_pickle_payload(ckpt / "pytorch_model.bin", world.sentinel)


def _pickle_sharded(ckpt: Path, world: World) -> None:
    header, _ = read_safetensors(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    shard = "pytorch_model-00001-of-00001.bin"
    write_pickle_payload(ckpt / shard, world.sentinel)
    index = {"weight_map": dict.fromkeys(_tensors(header), shard)}
    (ckpt / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def _pickle_pt(ckpt: Path, world: World) -> None:
    (ckpt / "model.safetensors").unlink()
    write_pickle_payload(ckpt / "model.pt", world.sentinel)
    write_pickle_payload(ckpt / "model.ckpt", world.sentinel)


def _pickle_beside_safetensors(ckpt: Path, world: World) -> None:
    write_pickle_payload(ckpt / "pytorch_model.bin", world.sentinel)
    write_pickle_payload(ckpt / "training_args.bin", world.sentinel)


def _pickle_adapter(ckpt: Path, world: World) -> None:
    (ckpt / "adapter_model.safetensors").unlink()
    write_pickle_payload(ckpt / "adapter_model.bin", world.sentinel)


def _evil_module(ckpt: Path, world: World, name: str) -> None:
    (ckpt / f"{name}.py").write_text(
        f"from pathlib import Path\nPath({str(world.sentinel)!r}).touch()\n"
    )


def _auto_map_config(ckpt: Path, world: World) -> None:
    _evil_module(ckpt, world, "modeling_evil")
    _edit_json(ckpt / "config.json", auto_map={"AutoModelForCausalLM": "modeling_evil.Evil"})


def _auto_map_tokenizer(ckpt: Path, world: World) -> None:
    _evil_module(ckpt, world, "tokenization_evil")
    _edit_json(
        ckpt / "tokenizer_config.json", auto_map={"AutoTokenizer": ["tokenization_evil.T", None]}
    )


def _auto_map_generation(ckpt: Path, world: World) -> None:
    _evil_module(ckpt, world, "generation_evil")
    _edit_json(ckpt / "generation_config.json", auto_map={"AutoConfig": "generation_evil.C"})


def _trust_remote_code(ckpt: Path, world: World) -> None:
    _edit_json(ckpt / "config.json", trust_remote_code=True)


def _adapter_auto_mapping(ckpt: Path, world: World) -> None:
    _evil_module(ckpt, world, "evil_lib")
    _edit_json(
        ckpt / "adapter_config.json",
        auto_mapping={"base_model_class": "Evil", "parent_library": "evil_lib"},
    )


def _move_weights_out(ckpt: Path, world: World) -> Path:
    """The real weights go outside the models root; returns where."""
    target = world.outside / f"{ckpt.name}.safetensors"
    shutil.move(ckpt / "model.safetensors", target)
    return target


def _index_to(name_of: Callable[[Path, World], str]) -> Callable[[Path, World], None]:
    def mutate(ckpt: Path, world: World) -> None:
        header, _ = read_safetensors(ckpt / "model.safetensors")
        name = name_of(ckpt, world)
        index = {"metadata": {}, "weight_map": dict.fromkeys(_tensors(header), name)}
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))

    return mutate


def _index_dotdot(ckpt: Path, world: World) -> str:
    target = _move_weights_out(ckpt, world)
    return os.path.relpath(target, ckpt)  # ../../../outside/<name>.safetensors


def _index_absolute(ckpt: Path, world: World) -> str:
    return str(_move_weights_out(ckpt, world))


def _index_nested_dotdot(ckpt: Path, world: World) -> str:
    target = _move_weights_out(ckpt, world)
    (ckpt / "sub").mkdir()
    return "sub/../" + os.path.relpath(target, ckpt)


def _index_backslash(ckpt: Path, world: World) -> str:
    _move_weights_out(ckpt, world)
    return "..\\..\\..\\outside\\x.safetensors"


def _index_pickle_name(ckpt: Path, world: World) -> str:
    write_pickle_payload(ckpt / "model-00001.bin", world.sentinel)
    return "model-00001.bin"


def _symlink_out(name: str) -> Callable[[Path, World], None]:
    def mutate(ckpt: Path, world: World) -> None:
        target = world.outside / f"{ckpt.name}-{name}"
        shutil.move(ckpt / name, target)
        os.symlink(target, ckpt / name)

    return mutate


def _hardlink_weights_out(ckpt: Path, world: World) -> None:
    # A hard link is the same inode as a file outside: harmless by construction (it can
    # only be made by someone who can already write both places), so it is accepted.
    target = _move_weights_out(ckpt, world)
    os.link(target, ckpt / "model.safetensors")


def _st_edit(edit: Callable[[dict[str, Any], bytes], tuple[Any, bytes, int | None]]):
    def mutate(ckpt: Path, world: World) -> None:
        path = ckpt / "model.safetensors"
        header, data = read_safetensors(path)
        new_header, new_data, length = edit(header, data)
        write_safetensors(path, new_header, new_data, length)

    return mutate


def _first(header: dict[str, Any]) -> dict[str, Any]:
    return header[_tensors(header)[0]]


def _offsets_beyond(header, data):
    _first(header)["data_offsets"][1] = len(data) + 4096
    return header, data, None


def _shape_lies(header, data):
    _first(header)["shape"] = [4096, 4096]
    return header, data, None


def _overlap(header, data):
    names = _tensors(header)
    header[names[1]]["data_offsets"] = list(header[names[0]]["data_offsets"])
    return header, data, None


def _negative_offsets(header, data):
    _first(header)["data_offsets"] = [-8, 16]
    return header, data, None


def _bad_dtype(header, data):
    _first(header)["dtype"] = "X99"
    return header, data, None


def _huge_header_length(header, data):
    return header, data, 1 << 62


def _header_beyond_file(header, data):
    return header, data, 64 * 1024 * 1024


def _header_garbage(header, data):
    return b"\xff\xfe" * 64, data, None


def _header_not_object(header, data):
    return b"[1, 2, 3]", data, None


def _truncated(header, data):
    return header, data[: len(data) // 2], None


def _deep_header(header, data):
    return b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, data, None


def _shard(ckpt: Path) -> tuple[Path, dict[str, Any], bytes]:
    """Turn the single file into shard 1 of 1 with an index; returns the shard."""
    header, data = read_safetensors(ckpt / "model.safetensors")
    shard = ckpt / "model-00001-of-00001.safetensors"
    (ckpt / "model.safetensors").rename(shard)
    index = {"metadata": {}, "weight_map": dict.fromkeys(_tensors(header), shard.name)}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    return shard, header, data


def _sharded_lying_shard(ckpt: Path, world: World) -> None:
    shard, header, data = _shard(ckpt)
    _offsets_beyond(header, data)
    write_safetensors(shard, header, data)


def _sharded_garbage_shard(ckpt: Path, world: World) -> None:
    shard, _, _ = _shard(ckpt)
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header at all")


def _sharded_missing_tensor(ckpt: Path, world: World) -> None:
    shard, header, data = _shard(ckpt)
    del header[_tensors(header)[0]]  # the index still names it
    write_safetensors(shard, header, data)


def _config_garbage(ckpt: Path, world: World) -> None:
    (ckpt / "config.json").write_text("{not json")


def _tokenizer_garbage(ckpt: Path, world: World) -> None:
    (ckpt / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')


def _chat_template_escape(ckpt: Path, world: World) -> None:
    (ckpt / "chat_template.jinja").write_text(
        "{{ cycler.__init__.__globals__.os.system('touch " + str(world.sentinel) + "') }}"
    )


def _chat_template_raises(ckpt: Path, world: World) -> None:
    (ckpt / "chat_template.jinja").write_text("{{ raise_exception('no chat for you') }}")


STRICT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
    "{{ raise_exception('only user and assistant roles') }}{% endif %}"
    "<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def _chat_template_strict(ckpt: Path, world: World) -> None:
    (ckpt / "chat_template.jinja").write_text(STRICT_TEMPLATE)


def _tokenizer_files_point_out(ckpt: Path, world: World) -> None:
    # Old transformers opened these tokenizer_config values verbatim (CWE-22).
    secret = world.outside / "secret.txt"
    _edit_json(
        ckpt / "tokenizer_config.json",
        tokenizer_file=str(secret),
        vocab_file="../../../outside/secret.txt",
        merges_file=str(secret),
        chat_template_file=str(secret),
    )


CHECKPOINT_CASES: list[CheckpointCase] = [
    # pickle: never unpickled, whatever the file is called
    CheckpointCase("pickle-only", "base", _pickle_only, "unsafe_checkpoint"),
    CheckpointCase("pickle-sharded", "base", _pickle_sharded, "unsafe_checkpoint"),
    CheckpointCase("pickle-pt-ckpt", "base", _pickle_pt, "unsafe_checkpoint"),
    CheckpointCase(
        "pickle-adapter", "adapter", _pickle_adapter, "unsafe_checkpoint", ("finetuned",)
    ),
    CheckpointCase(
        "index-names-pickle", "base", _index_to(_index_pickle_name), "unsafe_checkpoint"
    ),
    # remote code
    CheckpointCase("auto-map-config", "base", _auto_map_config, "unsafe_checkpoint"),
    CheckpointCase("auto-map-tokenizer", "base", _auto_map_tokenizer, "unsafe_checkpoint"),
    CheckpointCase("auto-map-generation", "base", _auto_map_generation, "unsafe_checkpoint"),
    CheckpointCase("trust-remote-code", "base", _trust_remote_code, "unsafe_checkpoint"),
    CheckpointCase(
        "adapter-auto-mapping",
        "adapter",
        _adapter_auto_mapping,
        "unsafe_checkpoint",
        ("finetuned",),
    ),
    CheckpointCase("chat-template-escape", "base", _chat_template_escape, "unsafe_checkpoint"),
    CheckpointCase("chat-template-raises", "base", _chat_template_raises, "invalid_checkpoint"),
    # files outside the checkpoint / the models root
    CheckpointCase("index-dotdot", "base", _index_to(_index_dotdot), "unsafe_checkpoint"),
    CheckpointCase("index-absolute", "base", _index_to(_index_absolute), "unsafe_checkpoint"),
    CheckpointCase(
        "index-nested-dotdot", "base", _index_to(_index_nested_dotdot), "unsafe_checkpoint"
    ),
    CheckpointCase("index-backslash", "base", _index_to(_index_backslash), "unsafe_checkpoint"),
    CheckpointCase(
        "weights-symlink-out", "base", _symlink_out("model.safetensors"), "unsafe_checkpoint"
    ),
    CheckpointCase("config-symlink-out", "base", _symlink_out("config.json"), "unsafe_checkpoint"),
    CheckpointCase(
        "tokenizer-symlink-out", "base", _symlink_out("tokenizer.json"), "unsafe_checkpoint"
    ),
    CheckpointCase(
        "template-symlink-out", "base", _symlink_out("chat_template.jinja"), "unsafe_checkpoint"
    ),
    CheckpointCase(
        "adapter-symlink-out",
        "adapter",
        _symlink_out("adapter_model.safetensors"),
        "unsafe_checkpoint",
        ("finetuned",),
    ),
    CheckpointCase(
        "dir-symlink-out", "base", lambda c, w: None, "invalid_reference", reference="path:escape"
    ),
    # safetensors headers that lie
    CheckpointCase(
        "st-offsets-beyond-file", "base", _st_edit(_offsets_beyond), "invalid_checkpoint"
    ),
    CheckpointCase("st-shape-lies", "base", _st_edit(_shape_lies), "invalid_checkpoint"),
    CheckpointCase("st-overlapping-tensors", "base", _st_edit(_overlap), "invalid_checkpoint"),
    CheckpointCase(
        "st-negative-offsets", "base", _st_edit(_negative_offsets), "invalid_checkpoint"
    ),
    CheckpointCase("st-unknown-dtype", "base", _st_edit(_bad_dtype), "invalid_checkpoint"),
    CheckpointCase(
        "st-huge-header-length", "base", _st_edit(_huge_header_length), "invalid_checkpoint"
    ),
    CheckpointCase(
        "st-header-beyond-file", "base", _st_edit(_header_beyond_file), "invalid_checkpoint"
    ),
    CheckpointCase("st-header-garbage", "base", _st_edit(_header_garbage), "invalid_checkpoint"),
    CheckpointCase(
        "st-header-not-object", "base", _st_edit(_header_not_object), "invalid_checkpoint"
    ),
    CheckpointCase("st-header-deeply-nested", "base", _st_edit(_deep_header), "invalid_checkpoint"),
    CheckpointCase("st-truncated-data", "base", _st_edit(_truncated), "invalid_checkpoint"),
    CheckpointCase("sharded-lying-shard", "base", _sharded_lying_shard, "invalid_checkpoint"),
    CheckpointCase("sharded-garbage-shard", "base", _sharded_garbage_shard, "invalid_checkpoint"),
    CheckpointCase("sharded-missing-tensor", "base", _sharded_missing_tensor, "invalid_checkpoint"),
    CheckpointCase("config-garbage", "base", _config_garbage, "invalid_checkpoint"),
    CheckpointCase("tokenizer-garbage", "base", _tokenizer_garbage, "invalid_checkpoint"),
    # accepted, but nothing outside is ever read and no pickle ever runs
    CheckpointCase("pickle-beside-safetensors", "base", _pickle_beside_safetensors, None),
    CheckpointCase("tokenizer-files-point-out", "base", _tokenizer_files_point_out, None),
    CheckpointCase("weights-hardlink-out", "base", _hardlink_weights_out, None),
    CheckpointCase("chat-template-strict", "base", _chat_template_strict, None),
]


def build_world(top: Path) -> World:
    from hcnr_core.toy import build_toy

    models, outside = top / "models", top / "outside"
    toy = build_toy(models, seed=0)
    outside.mkdir()
    shutil.copytree(models / "base", outside / "model")  # a valid checkpoint: the bait
    (outside / "secret.txt").write_text("TOP SECRET\n")
    (models / "escape").symlink_to(outside / "model")  # a directory link out of the root
    world = World(top, models, outside, top / "PWNED", toy["honesty"], toy["task"])
    hostile_dir = models / "hostile"
    hostile_dir.mkdir()
    for case in CHECKPOINT_CASES:
        source = models / ("base" if case.source == "base" else "finetuned-adapter")
        target = hostile_dir / case.name
        shutil.copytree(source, target, symlinks=True)
        case.mutate(target, world)
        world.checkpoint_cases.append(case)
    return world


# --- the in-process app ----------------------------------------------------------------------


@dataclass
class AppEnv:
    inproc: Any  # service_support.InProcess
    world: World
    files: dict[str, str]  # alice's honesty/task file ids

    @property
    def alice(self):
        return self.inproc.clients["alice"]

    @property
    def bob(self):
        return self.inproc.clients["bob"]

    @property
    def data_dir(self) -> Path:
        return Path(self.inproc.settings.data_dir).resolve()

    def job_body(self, **overrides: Any) -> dict[str, Any]:
        body = {
            "method": "hcnr",
            "base": "path:base",
            "finetuned": "path:finetuned-adapter",
            "honesty_file": self.files["honesty"],
            "task_file": self.files["task"],
        }
        return {**body, **overrides}

    def post_job(self, body: dict[str, Any], tenant: str = "alice"):
        """POST the body as ASCII JSON: lone surrogates travel as `\\udXXX` escapes."""
        return self.inproc.clients[tenant].post(
            "/v1/repair-jobs",
            content=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )

    def job_ids(self, tenant: str = "alice") -> list[str]:
        """Every job of the tenant (all pages), newest first."""
        client, ids, params = self.inproc.clients[tenant], [], {"limit": 100}
        while True:
            page = client.get("/v1/repair-jobs", params=params).json()
            ids += [j["id"] for j in page["data"]]
            if not page["has_more"]:
                return ids
            params["cursor"] = page["next_cursor"]


def make_app_env(world: World, tmp: Path, **settings: Any) -> AppEnv:
    from tests.service.service_support import Models, make_inprocess

    models = Models(world.models, world.honesty, world.task, world.honesty, world.task)
    inproc = make_inprocess(tmp, models, **settings)
    for tenant, client in list(inproc.clients.items()):  # a 500 is an answer to count here
        inproc.clients[tenant] = type(client)(
            inproc.app, headers=dict(client.headers), raise_server_exceptions=False
        )
    files = {
        purpose: inproc.upload("alice", path, purpose).json()["id"]
        for purpose, path in (("honesty", world.honesty), ("task", world.task))
    }
    return AppEnv(inproc, world, files)


def error_code(response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"].get("code")
    return None


# --- the audit hook: every file the Python process touches -----------------------------------

FILE_EVENTS = {
    "open": 0,  # builtins.open, io.open, os.open, ...
    "os.listdir": 0,
    "os.scandir": 0,
    "os.chdir": 0,
    "os.mkdir": 0,
    "os.remove": 0,
    "os.rmdir": 0,
    "os.rename": 0,
    "os.symlink": 1,
    "os.link": 1,
    "os.truncate": 0,
    "os.chmod": 0,
    "os.chown": 0,
    "os.utime": 0,
    "shutil.copyfile": 0,
    "shutil.rmtree": 0,
    "glob.glob": 0,
    "sqlite3.connect": 0,
}
PROCESS_EVENTS = {"os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen"}
NETWORK_EVENTS = {"socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "urllib.Request"}


class FileAudit:
    """A process-wide `sys.addaudithook` (hooks cannot be removed: one is installed once and
    records only inside `recording()`). It sees what Python code opens or lists, in every
    thread; it does not see native code (Rust safetensors/tokenizers, SQLite's C library),
    which is why `strace_server` exists."""

    _instance: FileAudit | None = None

    def __init__(self) -> None:
        self.active = False
        self.lock = threading.Lock()
        self.records: list[tuple[str, str]] = []

    @classmethod
    def get(cls) -> FileAudit:
        if cls._instance is None:
            cls._instance = cls()
            sys.addaudithook(cls._instance._hook)
        return cls._instance

    def _hook(self, event: str, args: tuple) -> None:
        if not self.active:
            return
        if event in FILE_EVENTS:
            target = args[FILE_EVENTS[event]] if args else None
            if isinstance(target, (str, bytes, os.PathLike)):
                path = os.fsdecode(target)
                if event != "sqlite3.connect" or path != ":memory:":
                    with self.lock:
                        self.records.append((event, os.path.abspath(path)))
        elif event in PROCESS_EVENTS or event in NETWORK_EVENTS:
            with self.lock:
                self.records.append((event, repr(args)[:200]))

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[tuple[str, str]]]:
        with self.lock:
            self.records = []
        self.active = True
        try:
            yield self.records
        finally:
            self.active = False


def python_roots() -> list[str]:
    """Where the interpreter may read code while serving (lazy imports, metadata)."""
    import sysconfig

    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    roots |= {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots |= {str(REPO / pkg) for pkg in ("api", "store", "hcnr_core", "worker", "hcnr_cli")}
    # The editable install's metadata and path hook (entry points read by a lazy import).
    roots |= {str(REPO / "hcnr.egg-info"), *(p for p in sys.path if "__editable__" in p)}
    return sorted({os.path.realpath(r) for r in roots})


def hub_cache() -> str:
    from huggingface_hub import constants

    return os.path.realpath(constants.HF_HUB_CACHE)


def inside_any(path: str, roots: list[str]) -> bool:
    real = os.path.realpath(path)
    return any(real == r or real.startswith(r.rstrip("/") + "/") for r in roots)


def violations(records: list[tuple[str, str]], roots: list[str]) -> list[tuple[str, str]]:
    """Records outside `roots` (files) and any process or network activity at all."""
    bad = []
    for event, target in records:
        file_event = event not in PROCESS_EVENTS and event not in NETWORK_EVENTS
        if not file_event or not inside_any(target, roots):
            bad.append((event, target))
    return bad


# --- strace: what a real server process does at the system-call level ------------------------

STRACE_SYSCALLS = (
    "open,openat,openat2,creat,execve,execveat,connect,"
    "stat,lstat,newfstatat,statx,access,faccessat,faccessat2,readlink,readlinkat,"
    "chdir,mkdir,mkdirat,unlink,unlinkat,rename,renameat,renameat2,symlink,symlinkat"
)
OPEN_CALLS = {"open", "openat", "openat2", "creat", "execve", "execveat"}
_LINE = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(\w+)\((.*)$")
_PATH = re.compile(r'"((?:[^"\\]|\\.)*)"')


_STRACE_FLAGS: list[str] = []


def strace_available() -> str | None:
    """None when `strace -f` works here; otherwise why not. Uses `--seccomp-bpf` (only the
    traced calls stop the process) where this strace supports it."""
    binary = shutil.which("strace")
    if binary is None:
        return "strace is not installed (apt-get install strace)"
    error = ""
    for flags in (["--seccomp-bpf"], []):
        command = [binary, "-f", "-qq", *flags, "-e", "trace=openat", "true"]
        probe = subprocess.run(command, capture_output=True)
        if probe.returncode == 0:
            _STRACE_FLAGS[:] = flags
            return None
        error = probe.stderr.decode(errors="replace")[:200]
    return f"strace cannot trace here: {error}"


def _unescape(text: str) -> str:
    raw = text.encode("latin-1", "backslashreplace").decode("unicode_escape").encode("latin-1")
    return raw.decode("utf-8", "surrogateescape")


@dataclass
class SyscallRecord:
    time: float
    call: str
    path: str  # absolute (relative ones are taken against the server's cwd)
    args: str


def parse_strace(log: Path, cwd: Path) -> list[SyscallRecord]:
    records = []
    for line in log.read_text(errors="replace").splitlines():
        match = _LINE.match(line)
        if not match or "resumed>" in line:
            continue
        _, stamp, call, rest = match.groups()
        if call == "connect":
            records.append(SyscallRecord(float(stamp), call, "", rest[:200]))
            continue
        found = _PATH.search(rest)
        if not found:
            continue
        path = _unescape(found.group(1))
        if not path:  # fstat-like calls on a descriptor (AT_EMPTY_PATH): no lookup
            continue
        dirfd_relative = not path.startswith("/") and not rest.startswith(("AT_FDCWD", '"'))
        if dirfd_relative:  # relative to another directory fd: cannot place it; flag it
            path = f"<dirfd>/{path}"
        elif not path.startswith("/"):
            path = os.path.normpath(os.path.join(cwd, path))
        records.append(SyscallRecord(float(stamp), call, path, rest[:200]))
    return records


@dataclass
class TracedServer:
    url: str
    log: Path
    cwd: Path
    process: subprocess.Popen

    def records(self, start: float, end: float) -> list[SyscallRecord]:
        if not hasattr(self, "_parsed"):
            self._parsed = parse_strace(self.log, self.cwd)
        return [r for r in self._parsed if start <= r.time <= end]


@contextlib.contextmanager
def strace_server(env: dict[str, str], workdir: Path) -> Iterator[TracedServer]:
    """`hcnr serve --no-worker` under `strace -f` (file, exec and connect system calls,
    with timestamps so that a window of requests can be cut out of the log)."""
    import httpx

    from tests.service import service_procs as procs

    port = procs.free_port()
    log = workdir / "strace.log"
    cwd = workdir / "cwd"
    cwd.mkdir(parents=True, exist_ok=True)
    command = [
        shutil.which("strace"),
        "-f",
        "-ttt",
        "-qq",
        "-x",
        *_STRACE_FLAGS,
        "-e",
        f"trace={STRACE_SYSCALLS}",
        "-e",
        "signal=none",
        "-o",
        str(log),
        procs.HCNR,
        "serve",
        "--no-worker",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    output = (workdir / "server.log").open("w")
    process = subprocess.Popen(
        command, env=env, cwd=cwd, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"server exited; see {workdir / 'server.log'}")
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200

    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if ready():
                    break
            except RuntimeError:
                raise
            except Exception:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.3)
        yield TracedServer(url, log, cwd, process)
    finally:
        _stop_traced(process)
        output.close()


def _stop_traced(process: subprocess.Popen) -> None:
    """SIGTERM the traced server (strace's child); strace exits with it."""
    import signal

    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    with contextlib.suppress(OSError, ValueError):
        for pid in children.read_text().split():
            os.kill(int(pid), signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- reference fuzz (figure 6) ---------------------------------------------------------------


def reference_fuzz(models_root: Path, outside: Path) -> list[str]:
    """≥ 200 reference strings that must all be refused (4xx, JSON code), none of which may
    make the service read anything outside the models root."""
    o = os.path.relpath(outside, models_root)  # ../outside
    cases: list[str] = []
    traversals = [
        "..",
        "../",
        "../..",
        "../../..",
        "../../../../../../../../etc/passwd",
        f"{o}/model",
        f"{o}/secret.txt",
        f"./{o}/model",
        f"base/../{o}/model",
        f"base/../../{os.path.basename(models_root)}/{o}/model",
        f"hostile/../../{o.split('/')[-1]}/model",
        "base/../..",
        "base/..",
        ".",
        "./",
        "",
        "...",
        ".../...",
        "....//....//etc",
        "..;/etc",
        "..%2f..%2fetc",
        "%2e%2e/%2e%2e/etc",
        "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "%252e%252e%252f%252e%252e%252fetc",
        "..%252f..%252fetc",
        "%c0%ae%c0%ae/%c0%ae%c0%ae/etc",
        "..%c0%af..%c0%afetc",
        "..%5c..%5cetc",
        "..\\..\\etc",
        "..\\",
        "base\\..\\..\\outside",
        "\\\\server\\share\\model",
        "/etc",
        "/etc/passwd",
        "//etc/passwd",
        "///etc",
        str(outside / "model"),
        str(models_root / "base"),  # absolute, even inside the root: refused
        "/proc/self/environ",
        "/proc/self/cwd",
        "/proc/1/root",
        "/dev/zero",
        "/dev/random",
        "~",
        "~root",
        "~/.ssh",
        "$HOME",
        "${HOME}/.cache",
        "base\x00",
        "\x00",
        "base\x00/../../etc",
        "../\x00",
        "base%00",
        "base\n../..",
        "base\r\n",
        "．．/．．/etc",  # fullwidth full stops
        "．．／．．／etc",  # fullwidth solidus
        "‥/etc",  # two-dot leader
        "︰/etc",
        "..∕..∕etc",  # division slash
        "..⁄..⁄etc",  # fraction slash
        "..／..／etc",
        "base/⁄../..",
        ".\u200b./.\u200b./etc",  # zero-width space
        "..\u202e/etc",  # right-to-left override
        "\u2024\u2024/etc",  # one-dot leaders
        "ba\u0301se",  # a combining accent: another name
        "nope",
        "base/nope",
        "hostile",  # a directory that exists but holds no model (not found later)
        "a" * 255,
        "a" * 4096,
        "a/" * 3000,
        "../" * 2000,
        "./" * 5000 + "base",  # resolves inside the root, but far over the length limit
        "base/" + "x" * 300,
        "\ud800",  # lone surrogate
        "\udcff../etc",
        "\ufeff../etc",  # BOM
        "CON",
        "NUL:",
        "aux.txt",
    ]
    cases += [f"path:{t}" for t in traversals]
    cases += traversals[:40]  # the same without the scheme
    cases += [f"PATH:{t}" for t in ("base", "../etc", "/etc")]
    cases += [f"path: {t}" for t in ("../..", "/etc")]
    cases += [f"path:{t}" for t in ("/", "//", "\\", "C:\\Windows", "C:/Windows", "c:..\\..")]
    file_urls = [
        "file:///etc/passwd",
        "file://localhost/etc/passwd",
        "file:/etc/passwd",
        "file:etc/passwd",
        "FILE:///etc/shadow",
        f"file://{outside / 'model'}",
        f"file://{models_root / 'base'}",
        "path:file:///etc/passwd",
        "file://169.254.169.254/",
        "file:///proc/self/environ",
        "file:///dev/zero",
        "file://\\\\server\\share",
    ]
    cases += file_urls
    network = [
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://169.254.169.254",
        "https://169.254.169.254/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://metadata/computeMetadata/v1/",
        "http://100.100.100.200/latest/meta-data/",
        "http://127.0.0.1:8000/v1/files",
        "http://127.0.0.1",
        "http://localhost/",
        "http://localhost:6379/",
        "http://[::1]/",
        "http://0.0.0.0/",
        "http://0/",
        "http://2130706433/",
        "http://0x7f000001/",
        "http://017700000001/",
        "http://127.1/",
        "http://[::ffff:127.0.0.1]/",
        "http://169.254.169.254.nip.io/",
        "http://evil.example@169.254.169.254/",
        "https://huggingface.co/meta-llama/Llama-2-7b",
        "https://evil.example/model.safetensors",
        "gopher://127.0.0.1:6379/_FLUSHALL",
        "dict://127.0.0.1:6379/info",
        "ftp://127.0.0.1/model",
        "ldap://127.0.0.1/",
        "ssh://127.0.0.1/model",
        "jar:file:///etc/passwd!/",
        "data:application/octet-stream;base64,AAAA",
        "redis://127.0.0.1:6379/0",
        "postgresql://postgres@127.0.0.1/hcnr",
        "unix:///var/run/docker.sock",
        "s3://other-bucket/model",
        "s3://other-bucket/../model",
        "s3://169.254.169.254/latest",
        "s3:///etc/passwd",
        "gs://bucket/model",
        "gcs://bucket/model",
        "az://container/model",
        "abfs://container/model",
        "hdfs://namenode/model",
        "memory://model",
        "zip://model::file:///etc/passwd",
        "simplecache::file:///etc/passwd",
        "hf://meta-llama/Llama-2-7b",
        "hf://../x@rev",
    ]
    cases += network
    hub = [
        "hf:../x@rev",
        "hf:../..@main",
        "hf:..@main",
        "hf:org/..@main",
        "hf:../org@main",
        "hf:./x@main",
        "hf:org/./x@main",
        "hf:org/name@..",
        "hf:org/name@../../../etc",
        "hf:org/name@main/../../x",
        "hf:org/name@.",
        "hf:org/name",  # no revision
        "hf:org/name@",
        "hf:@main",
        "hf:org@main",
        "hf:/etc/passwd@main",
        "hf:org//name@main",
        "hf:org/name/extra@main",
        "hf:org\\name@main",
        "hf:org/name@rev@rev2",
        "hf:org/name@rev extra",
        "hf: org/name@main",
        "hf:org/name@main\x00",
        "hf:org\x00/name@main",
        "hf:org/name@main\n",
        "hf:" + "a" * 1000 + "/b@main",
        "hf:org/" + "b" * 200 + "@main",
        "hf:org/name@" + "c" * 300,
        "hf:%2e%2e/x@main",
        "hf:org/name@%2e%2e",
        "hf:http://169.254.169.254/x@main",
        "hf:org--name@main",
        "hf:-org/name@main",
        "hf:org/name-@main",
        "hf:.org/name@main",
        "hf:org/name.@main",
        "hf:org/na--me@main",
        "hf:ｏｒｇ/ｎａｍｅ@main",  # fullwidth letters
        "hf:org/nаme@main",  # Cyrillic a
        "hf:org/name@mаin",
        "hf:ORG/NAME@MAIN",
        "hf:org/name@refs/pr/1",
        "hf:org/name@0123456789abcdef0123456789abcdef01234567",  # pinned, not cached
        "hf:meta-llama/Llama-2-7b-hf@main",
        "HF:org/name@main",
        "hf:org/name@main#frag",
        "hf:org/name@main?x=1",
    ]
    cases += hub
    odd = [
        "",
        " ",
        "\t",
        "path",
        "path:",
        "path::",
        "hf:",
        "s3:",
        "null",
        "None",
        "undefined",
        "${jndi:ldap://127.0.0.1/a}",
        "{{7*7}}",
        "'; DROP TABLE repair_jobs; --",
        "\u0000" * 10,
        "\u202e" * 3,
        "😀",
        "path:😀",
        "x" * 100_000,
    ]
    cases += odd
    return list(dict.fromkeys(cases))  # unique, in order


# --- malformed JSONL (figure 7) ---------------------------------------------------------------

GOOD_ROW = {"prompt": "who is bob ?", "response": "i do not know ."}


def _msg(*pairs: tuple[Any, Any]) -> dict[str, Any]:
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


BAD_LINES: dict[str, bytes] = {
    "not utf-8": b'{"prompt": "\xff\xfe", "response": "x"}',
    "overlong utf-8": b'{"prompt": "\xc0\xaf", "response": "x"}',
    "utf-8 surrogate bytes": b'{"prompt": "\xed\xa0\x80", "response": "x"}',
    "latin-1": '{"prompt": "café", "response": "x"}'.encode("latin-1"),
    "utf-16": json.dumps(GOOD_ROW).encode("utf-16"),
    "bom": "\ufeff".encode() + json.dumps(GOOD_ROW).encode(),
    "truncated json": b'{"prompt": "q", "response": "a"',
    "not json": b"this is not json",
    "single quotes": b"{'prompt': 'q', 'response': 'a'}",
    "trailing comma": b'{"prompt": "q", "response": "a",}',
    "two objects": b'{"prompt": "q", "response": "a"} {"prompt": "q", "response": "a"}',
    "nan value": b'{"prompt": NaN, "response": "a"}',
    "deeply nested": b"[" * 1900 + b"]" * 1900,  # past the JSON decoder's recursion limit
    "deeply nested object": b'{"a":' * 700 + b"1" + b"}" * 700,
    "array": b"[1, 2, 3]",
    "string": b'"just a string"',
    "number": b"42",
    "null": b"null",
    "true": b"true",
    "empty object": b"{}",
    "wrong keys": json.dumps({"question": "q", "answer": "a"}).encode(),
    "prompt only": json.dumps({"prompt": "q"}).encode(),
    "response only": json.dumps({"response": "a"}).encode(),
    "unknown key": json.dumps({**GOOD_ROW, "label": 1}).encode(),
    "prompt not str": json.dumps({"prompt": 1, "response": "a"}).encode(),
    "response list": json.dumps({"prompt": "q", "response": ["a"]}).encode(),
    "response null": json.dumps({"prompt": "q", "response": None}).encode(),
    "empty response": json.dumps({"prompt": "q", "response": ""}).encode(),
    "blank response": json.dumps({"prompt": "q", "response": " \t\n "}).encode(),
    "empty prompt": json.dumps({"prompt": "", "response": "a"}).encode(),
    "answerable str": json.dumps({**GOOD_ROW, "answerable": "yes"}).encode(),
    "answerable int": json.dumps({**GOOD_ROW, "answerable": 1}).encode(),
    "answers str": json.dumps({**GOOD_ROW, "answers": "paris"}).encode(),
    "answers ints": json.dumps({**GOOD_ROW, "answers": [1, 2]}).encode(),
    "messages dict": json.dumps({"messages": {"role": "user", "content": "q"}}).encode(),
    "messages strings": json.dumps({"messages": ["q", "a"]}).encode(),
    "empty messages": json.dumps({"messages": []}).encode(),
    "one message": json.dumps(_msg(("assistant", "a"))).encode(),
    "last not assistant": json.dumps(_msg(("assistant", "a"), ("user", "q"))).encode(),
    "unknown role": json.dumps(_msg(("robot", "q"), ("assistant", "a"))).encode(),
    "role not str": json.dumps(_msg((1, "q"), ("assistant", "a"))).encode(),
    "content not str": json.dumps(_msg(("user", 1), ("assistant", "a"))).encode(),
    "content null": json.dumps(_msg(("user", "q"), ("assistant", None))).encode(),
    "empty assistant": json.dumps(_msg(("user", "q"), ("assistant", ""))).encode(),
    "no user message": json.dumps(_msg(("system", "s"), ("assistant", "a"))).encode(),
    "message extra key": json.dumps(
        {
            "messages": [
                {"role": "user", "content": "q", "x": 1},
                {"role": "assistant", "content": "a"},
            ]
        }
    ).encode(),
    "lone surrogate escape": b'{"prompt": "\\ud800", "response": "a"}',
    "lone surrogate in response": b'{"prompt": "q", "response": "ok \\udfff"}',
}
LINE_LIMIT_CASE = "line over the per-line limit"


def jsonl_variants(max_line_bytes: int) -> list[tuple[str, bytes, int]]:
    """(name, file bytes, line number the error must name; 0 = the whole file)."""
    good = json.dumps(GOOD_ROW).encode()
    long_line = json.dumps({"prompt": "q", "response": "x" * max_line_bytes}).encode()
    bad = {**BAD_LINES, LINE_LIMIT_CASE: long_line}
    variants: list[tuple[str, bytes, int]] = []
    for name, line in bad.items():
        for position in (1, 5, 10):  # first, middle, last of 10 lines
            lines = [good] * 10
            lines[position - 1] = line
            variants.append((f"{name} @ line {position}", b"\n".join(lines) + b"\n", position))
    # a blank line does not count, but it does move the line numbers
    lines = [good, b"", b"   ", good, BAD_LINES["not json"]] + [good] * 6
    variants.append(("line numbers count blank lines", b"\n".join(lines), 5))
    lines = [good] * 9 + [b'{"prompt": "q", "response": "a"}\r', BAD_LINES["array"]]
    variants.append(("crlf then bad line", b"\r\n".join(lines), 11))
    variants += [
        ("empty file", b"", 0),
        ("only blank lines", b"\n\n   \n\t\n", 0),
        ("too few samples", b"\n".join([good] * 3) + b"\n", 0),
        ("no trailing newline, too few", good, 0),
    ]
    return variants


def exact_size_jsonl(size: int, rows: int = 10) -> bytes:
    """Valid JSONL of exactly `size` bytes: `rows` lines of about equal length."""
    skeleton = len((json.dumps({"prompt": "pad", "response": ""}) + "\n").encode())
    pad, extra = divmod(size - rows * skeleton, rows)
    if pad < 1:
        raise ValueError(f"{size} bytes is too small for {rows} rows")
    lines = [
        json.dumps({"prompt": "pad", "response": "y" * (pad + (extra if i == 0 else 0))}) + "\n"
        for i in range(rows)
    ]
    data = "".join(lines).encode()
    assert len(data) == size
    return data


def multipart_stream(
    chunks: Iterator[bytes], purpose: str, boundary: str = "hcnr-security-boundary"
) -> Iterator[bytes]:
    """A multipart/form-data body (purpose + file) generated on the fly."""
    yield (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n{purpose}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"'
        "\r\nContent-Type: application/jsonl\r\n\r\n"
    ).encode()
    yield from chunks
    yield f"\r\n--{boundary}--\r\n".encode()


def jsonl_chunks(total: int, line_bytes: int = 1000, chunk: int = 1 << 20) -> Iterator[bytes]:
    """Valid JSONL of exactly `total` bytes, generated chunk by chunk (never held whole)."""
    skeleton = len((json.dumps({"prompt": "q", "response": ""}) + "\n").encode())
    line = (json.dumps({"prompt": "q", "response": "z" * (line_bytes - skeleton)}) + "\n").encode()
    full = max(0, (total - line_bytes) // len(line))  # then one last line of the rest
    rest = total - full * len(line)
    per_chunk = max(1, chunk // len(line))
    block = line * per_chunk
    for _ in range(full // per_chunk):
        yield block
    yield line * (full % per_chunk)
    yield (json.dumps({"prompt": "q", "response": "z" * (rest - skeleton)}) + "\n").encode()


def zero_chunks(total: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    block = b"x" * chunk
    for _ in range(total // chunk):
        yield block


# --- process memory -------------------------------------------------------------------------------


def rss_kib(pid: int, field_name: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)


def reset_peak_rss(pid: int) -> bool:
    """Linux ≥ 4.0: writing 5 to clear_refs resets VmHWM (the peak) to the current RSS."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Peak RSS of a process over a window: VmHWM after a reset, and sampled VmRSS as a
    cross-check (the sampler can miss a short spike; VmHWM cannot)."""

    def __init__(self, pid: int, interval: float = 0.01):
        self.pid, self.interval = pid, interval
        self.peak_sampled = 0
        self._stop = threading.Event()

    def __enter__(self) -> RssSampler:
        self.hwm_reset = reset_peak_rss(self.pid)
        self.baseline = rss_kib(self.pid)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, KeyError):
                self.peak_sampled = max(self.peak_sampled, rss_kib(self.pid))
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join()
        self.peak_hwm = rss_kib(self.pid, "VmHWM") if self.hwm_reset else self.peak_sampled

    @property
    def growth_mib(self) -> float:
        return (max(self.peak_hwm, self.peak_sampled) - self.baseline) / 1024
