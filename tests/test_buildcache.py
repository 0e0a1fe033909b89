"""The build cache every builder shares (organism, real-model scenario, GGUF imports)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hcnr_core.buildcache import (
    build_lock,
    cached_manifest,
    clear_outputs,
    file_sizes,
    source_fingerprint,
)

_HOLDER = """
import sys, time
from pathlib import Path
from hcnr_core.buildcache import build_lock
out = Path(sys.argv[1])
with build_lock(out):
    (out.parent / "held").write_text("1")
    time.sleep(1.0)
    (out.parent / "released").write_text("1")
"""


def test_build_lock_makes_a_second_process_wait_for_the_first(tmp_path: Path) -> None:
    out = tmp_path / "tiny-0"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)])
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "held").exists():
            assert holder.poll() is None and time.monotonic() < deadline, "holder never locked"
            time.sleep(0.02)
        with build_lock(out):
            # Without the lock we would get here while the holder still sleeps.
            assert (tmp_path / "released").exists()
    finally:
        holder.wait(timeout=60)
    assert holder.returncode == 0


def test_lock_survives_clearing_the_build(tmp_path: Path) -> None:
    out = tmp_path / "tiny-0"
    (out / "base").mkdir(parents=True)
    with build_lock(out):
        clear_outputs(out, "organism.json", ["base"])
        assert not (out / "base").exists()
    assert (tmp_path / ".tiny-0.lock").exists()  # a sibling: clearing `out` never takes it


def test_manifest_vouches_only_while_every_file_is_whole(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model.safetensors").write_bytes(b"x" * 10)
    manifest = {"key": "k", "files": file_sizes(tmp_path, ["base"])}
    (tmp_path / "organism.json").write_text(json.dumps(manifest))
    assert cached_manifest(tmp_path, "organism.json", "k") is not None
    assert cached_manifest(tmp_path, "organism.json", "other-key") is None
    (tmp_path / "base" / "model.safetensors").write_bytes(b"x" * 4)  # truncated
    assert cached_manifest(tmp_path, "organism.json", "k") is None
    (tmp_path / "base" / "model.safetensors").unlink()  # half-built: the folder is gone
    assert cached_manifest(tmp_path, "organism.json", "k") is None


# --- build keys: declared recipe versions, pinned recipe code ------------------------------------

# The code behind each build key, pinned. A build key hashes a declared recipe version, not
# the code, so that a refactor does not throw away hours of builds (a SmolLM2 scenario
# takes ~1.5 h per seed on 2 cores). When this test fails you changed that code: if the
# change alters what a build produces (weights, data, or for `realmodel eval` the metrics),
# bump the version named below so every cache rebuilds; either way, update the pin.
RECIPE_PINS = {
    "organism": (
        "RECIPE_VERSION",
        "3afd3c58e1a11bf85c8987da095cc0e4951c01e7dad649c1e283cda397603e44",
    ),
    "realmodel": (
        "RECIPE_VERSION",
        "d0eff5e02e8e14bbdc722b38fe52f685479c1de4978666c27f8410a20c502767",
    ),
    "realmodel eval": (
        "EVAL_VERSION",
        "d07bc2b458ec845aa717d128ffdfef9a3a5c14393056c5724dfc1fe7e8f8f9a9",
    ),
}


def _recipe_sources(name: str) -> tuple[object, tuple[Path, ...]]:
    from hcnr_core.organism import build as organism
    from hcnr_core.realmodel import build as realmodel

    return {
        "organism": (organism, organism.recipe_sources()),
        "realmodel": (realmodel, realmodel.recipe_sources()),
        "realmodel eval": (realmodel, realmodel.eval_sources()),
    }[name]


@pytest.mark.parametrize("name", sorted(RECIPE_PINS))
def test_recipe_code_changes_are_declared(name: str) -> None:
    module, sources = _recipe_sources(name)
    version, pinned = RECIPE_PINS[name]
    got = source_fingerprint(sources)
    assert got == pinned, (
        f"the {name} code changed ({', '.join(p.name for p in sources)}): if builds now "
        f"produce something else, bump {module.__name__}.{version}; then pin {got}"
    )


def test_build_keys_follow_the_declared_versions_not_the_code(monkeypatch) -> None:
    from hcnr_core.organism import build as organism
    from hcnr_core.realmodel import build as realmodel

    spec = organism.SIZES["tiny"]
    key = organism.build_key("tiny", 0, spec)
    assert organism.build_key("tiny", 0, spec) == key
    assert organism.build_key("tiny", 1, spec) != key
    monkeypatch.setattr(organism, "RECIPE_VERSION", organism.RECIPE_VERSION + 1)
    assert organism.build_key("tiny", 0, spec) != key

    rspec = realmodel.SPECS["smollm2-135m"]
    measured = realmodel.eval_key(rspec)
    monkeypatch.setattr(realmodel, "EVAL_VERSION", realmodel.EVAL_VERSION + 1)
    assert realmodel.eval_key(rspec) != measured
