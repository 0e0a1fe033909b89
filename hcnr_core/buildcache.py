"""What the organism and the real-model builds share: a manifest that vouches for a
finished build, and the bookkeeping around it.

A build writes its outputs, then its manifest last (with the build key and the size of
every output file); a later call with the same key returns it from cache unless a file is
missing or changed size (an interrupted or damaged build is rebuilt). Clearing removes the
manifest first, so a half-cleared directory never vouches for itself. Builders hold
`build_lock(out)` while they check and build, so two processes asking for the same build
(two test runs, a bench beside a test run) build it once instead of clearing each other's
half-written files.

Build keys hash what a build is *asked* (model, seed, spec, library versions) and a
declared recipe version, not the source files: a refactor of the code that trains or
measures must not throw away hours of builds. What keeps the version honest is
`tests/test_buildcache.py::test_recipe_code_changes_are_declared`, which pins the
`source_fingerprint` of each recipe's code: whoever changes that code updates the pin and,
if the change alters what a build produces, bumps the recipe version with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive flock on `path`, released by the kernel even if the holder is killed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def build_lock(out: str | Path) -> contextlib.AbstractContextManager[None]:
    """The lock a builder holds on `out` while it checks its cache and builds (a sibling
    file, so clearing `out` never removes a lock someone holds)."""
    out = Path(out)
    return file_lock(out.parent / f".{out.name}.lock")


def cached_manifest(out: str | Path, manifest: str, key: str) -> dict[str, Any] | None:
    """The manifest of a complete build with this key in `out`, else None."""
    out = Path(out)
    try:
        data = json.loads((out / manifest).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if data.get("key") != key:
        return None
    for name, size in data.get("files", {}).items():
        path = out / name
        if not path.is_file() or path.stat().st_size != size:
            return None  # interrupted or damaged: rebuild
    return data


def clear_outputs(out: Path, manifest: str, outputs: Iterable[str]) -> None:
    """Remove a stale or partial build, its manifest first (so it never vouches for it)."""
    for name in (manifest, *outputs):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def file_sizes(out: Path, outputs: Iterable[str]) -> dict[str, int]:
    """Size of every file under the output directories, by path relative to `out`."""
    return {
        str(p.relative_to(out)): p.stat().st_size
        for name in outputs
        for p in sorted((out / name).rglob("*"))
        if p.is_file()
    }


@contextlib.contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Record the wall time of the block in `timings[stage]` (seconds, 2 decimals)."""
    started = time.perf_counter()
    yield
    timings[stage] = round(time.perf_counter() - started, 2)


def source_fingerprint(sources: Iterable[Path]) -> str:
    """sha256 of the given source files, in order: the code a recipe version stands for."""
    digest = hashlib.sha256()
    for path in sources:
        digest.update(Path(path).name.encode() + b"\0" + Path(path).read_bytes())
    return digest.hexdigest()
