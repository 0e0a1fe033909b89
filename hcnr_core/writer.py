"""Output checkpoint writer: staged in a sibling directory, published by one rename.

A failed or cancelled repair therefore never leaves a half-written `--out`.
`write_checkpoint` is the one writer of every repair method (HCNR and the RAIT/DPO
baselines): sharded safetensors, the config, generation config and tokenizer files, the
Hub model card (`hcnr_core.card`) and the JSON report that lists every file's sha256.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from hcnr_core.card import CARD_NAME, CardInputs, render_card
from hcnr_core.checkpoint import TOKENIZER_FILES
from hcnr_core.errors import OutputExistsError
from hcnr_core.formats import sha256_file  # re-exported: the writer's callers digest files too

SHARD_BYTES = 2 * 1024**3
REPORT_NAME = "hcnr_report.json"
INDEX_NAME = "model.safetensors.index.json"


def check_output_dir(out: Path) -> None:
    """`out` may not exist yet, or be an empty directory; anything else is refused."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise OutputExistsError(f"{out} is not empty; choose a new output directory")


def plan_shards(sizes: dict[str, int], max_bytes: int = SHARD_BYTES) -> list[list[str]]:
    """Greedy, order-preserving split of tensor names into shards of at most `max_bytes`."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


class StagedOutput:
    """A staging directory next to `out`; `publish` renames it into place atomically."""

    def __init__(self, out: Path):
        self.out = out
        check_output_dir(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        self.dir = out.parent / f".{out.name}.staging-{uuid.uuid4().hex[:12]}"
        self.dir.mkdir()

    def __enter__(self) -> StagedOutput:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def write_tensors(
        self,
        names_and_sizes: dict[str, int],
        get_tensor: Callable[[str], torch.Tensor],
        max_shard_bytes: int = SHARD_BYTES,
    ) -> None:
        """Sharded safetensors plus the index that `from_pretrained` reads."""
        shards = plan_shards(names_and_sizes, max_shard_bytes)
        weight_map = {}
        for number, names in enumerate(shards, start=1):
            file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            tensors = {name: get_tensor(name).contiguous() for name in names}
            save_file(tensors, str(self.dir / file_name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, file_name))
        index = {
            "metadata": {"total_size": sum(names_and_sizes.values())},
            "weight_map": weight_map,
        }
        (self.dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def copy_files(self, source_dir: Path, names: Iterable[str]) -> list[str]:
        """Copy regular files (never links) that exist in `source_dir`; returns their names."""
        copied = []
        for name in names:
            src = source_dir / name
            if src.is_file() and not src.is_symlink():
                shutil.copyfile(src, self.dir / name)
                copied.append(name)
        return copied

    def write_text(self, name: str, text: str) -> None:
        (self.dir / name).write_text(text, encoding="utf-8")

    def write_report(self, name: str, report: dict[str, Any]) -> None:
        """`report["files"]` := the digests of every staged file, then the report itself
        (it cannot list its own digest)."""
        report["files"] = self.file_digests()
        self.write_text(name, json.dumps(report, indent=2) + "\n")

    def file_digests(self) -> dict[str, dict[str, Any]]:
        return {
            path.name: {"sha256": sha256_file(path), "bytes": path.stat().st_size}
            for path in sorted(self.dir.iterdir())
            if path.is_file()
        }

    def publish(self) -> Path:
        """fsync the files, then rename the staging directory onto `out`."""
        for path in self.dir.iterdir():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        check_output_dir(self.out)
        if self.out.is_dir():
            self.out.rmdir()  # empty, checked above
        os.rename(self.dir, self.out)
        return self.out


@dataclass(frozen=True)
class CheckpointFiles:
    """Where a repaired checkpoint's files besides its tensors come from: `config.json`
    from `config_dir`, `generation_config.json` from the first of `generation_dirs` that
    has one, the tokenizer's files from `tokenizer_dir` (an adapter fine-tune has no
    config of its own; its base's is the model's)."""

    config_dir: Path
    generation_dirs: Sequence[Path]
    tokenizer_dir: Path


def write_checkpoint(
    out: Path,
    sizes: dict[str, int],
    get_tensor: Callable[[str], torch.Tensor],
    files: CheckpointFiles,
    card: CardInputs,
    report: dict[str, Any],
    report_name: str,
    *,
    tick: Callable[[int, int], None] | None = None,
    before_report: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Stage and publish a checkpoint at `out`: tensors (`sizes`: name -> bytes, in file
    order), the model's metadata files, the card and `report` (its `files` set here).
    `tick(done, 3)` reports the steps; `before_report(report)` runs last before the report
    is written (its stage timings end there). Same inputs, same bytes, except the report's
    own `created_at` and timings."""
    with StagedOutput(out) as staged:
        staged.write_tensors(sizes, get_tensor)
        if tick is not None:
            tick(1, 3)
        staged.copy_files(files.config_dir, ["config.json"])
        for directory in files.generation_dirs:
            if staged.copy_files(directory, ["generation_config.json"]):
                break
        staged.copy_files(files.tokenizer_dir, TOKENIZER_FILES)
        staged.write_text(CARD_NAME, render_card(card, report))
        if tick is not None:
            tick(2, 3)
        report["files"] = staged.file_digests()
        if before_report is not None:
            before_report(report)
        staged.write_text(report_name, json.dumps(report, indent=2) + "\n")
        return staged.publish()
