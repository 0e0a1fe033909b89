"""Checkpoint references of a job (DESIGN.md §4), resolved to local directories.

path:relative/dir     a directory below the models root (realpath-confined)
hf:org/name@revision  a hub snapshot already in the local cache (offline, pinned)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from hcnr_core.errors import HCNRError

# Hub ids as the hub allows them: ASCII letters, digits, `_ . -`; no leading `.`/`-`,
# no `..` or `--` (checked below). `\w` would also admit any Unicode letter.
_HUB_PART = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}"
HF_REFERENCE = re.compile(rf"hf:({_HUB_PART}/{_HUB_PART})@([A-Za-z0-9_][A-Za-z0-9_.-]{{0,254}})")
MAX_REFERENCE_LENGTH = 1000  # the width of the job's reference columns


class InvalidReferenceError(HCNRError):
    code = "invalid_reference"


class ReferenceNotFoundError(HCNRError):
    code = "reference_not_found"


def resolve_reference(reference: str, models_root: Path) -> Path:
    """The real directory `reference` names; refuses anything outside the models root.

    Syntax is checked before the file system is touched: a reference that is too long,
    holds control characters or unencodable text, or has a `..` component is refused
    without a single system call (no probing outside the root, no existence oracle)."""
    if len(reference) > MAX_REFERENCE_LENGTH:
        raise InvalidReferenceError(f"reference longer than {MAX_REFERENCE_LENGTH} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in reference) or not _encodable(reference):
        raise InvalidReferenceError(f"{reference!r}: control or unencodable characters")
    if reference.startswith("path:"):
        return _resolve_path(reference.removeprefix("path:"), models_root)
    match = HF_REFERENCE.fullmatch(reference)
    if match and ".." not in reference and "--" not in reference:
        return _resolve_hub(match.group(1), match.group(2))
    raise InvalidReferenceError(
        f"{reference!r}: expected 'path:<dir under the models root>' or 'hf:org/name@revision'"
    )


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return False
    return True


def _resolve_path(relative: str, models_root: Path) -> Path:
    if not relative or os.path.isabs(relative) or "\\" in relative or "\x00" in relative:
        raise InvalidReferenceError(f"path:{relative}: must be a relative path")
    if ".." in relative.split("/"):
        raise InvalidReferenceError(f"path:{relative}: '..' is not allowed")
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
