"""Checkpoint references of a job (DESIGN.md §4), resolved to local directories.

path:relative/dir     a directory below the models root (realpath-confined)
hf:org/name@revision  a hub snapshot already in the local cache (offline, pinned)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from hcnr_core.errors import HCNRError

HF_REFERENCE = re.compile(r"hf:([\w.-]+/[\w.-]+)@([\w.-]+)")


class InvalidReferenceError(HCNRError):
    code = "invalid_reference"


class ReferenceNotFoundError(HCNRError):
    code = "reference_not_found"


def resolve_reference(reference: str, models_root: Path) -> Path:
    """The real directory `reference` names; refuses anything outside the models root."""
    if reference.startswith("path:"):
        return _resolve_path(reference.removeprefix("path:"), models_root)
    match = HF_REFERENCE.fullmatch(reference)
    if match:
        return _resolve_hub(match.group(1), match.group(2))
    raise InvalidReferenceError(
        f"{reference!r}: expected 'path:<dir under the models root>' or 'hf:org/name@revision'"
    )


def _resolve_path(relative: str, models_root: Path) -> Path:
    if not relative or os.path.isabs(relative) or "\\" in relative or "\x00" in relative:
        raise InvalidReferenceError(f"path:{relative}: must be a relative path")
    root = os.path.realpath(models_root)
    real = os.path.realpath(os.path.join(root, relative))
    if real == root or not real.startswith(root + os.sep):
        raise InvalidReferenceError(f"path:{relative}: resolves outside the models root")
    if not os.path.isdir(real):
        raise ReferenceNotFoundError(f"path:{relative}: no such model directory")
    return Path(real)


def _resolve_hub(repo_id: str, revision: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception as exc:  # the hub library raises many kinds; all mean "not cached"
        raise ReferenceNotFoundError(
            f"hf:{repo_id}@{revision}: not in the local hub cache ({type(exc).__name__})"
        ) from exc
