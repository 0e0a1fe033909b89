"""The build cache every builder shares (organism, real-model scenario, GGUF imports)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from hcnr_core.buildcache import build_lock, cached_manifest, clear_outputs, file_sizes

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
