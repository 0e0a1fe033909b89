"""Checkpoint references of a job (DESIGN.md §4), resolved to local directories.

path:relative/dir        a directory below the models root (realpath-confined)
hf:org/name[@revision]   a Hugging Face Hub repository at a branch, tag or commit (default
                         main); the validation task downloads its safe files into the
                         shared model cache and pins the commit (store/remote_models.py)
s3://bucket/prefix       a model directory in S3-compatible storage, under one of the
                         operator's HCNR_MODELS_S3_PREFIXES; fetched and pinned likewise

A job records what its validation pinned (`hf:org/name@<commit>`,
`s3://bucket/prefix#<digest>`): the GPU worker resolves those from the cache, offline.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from hcnr_core.errors import HCNRError

# Defined beside the fetches that raise it; imported from here by the API (one direction:
# references -> remote_models, never back).
from store.remote_models import ReferenceNotFoundError

# Hub ids as the hub allows them: ASCII letters, digits, `_ . -`; no leading `.`/`-`,
# no `..` or `--` (checked below). `\w` would also admit any Unicode letter.
_HUB_PART = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}"
HF_REFERENCE = re.compile(
    rf"hf:({_HUB_PART}/{_HUB_PART})(?:@([A-Za-z0-9_][A-Za-z0-9_.-]{{0,254}}))?"
)
# Bucket names as S3 allows them; keys of printable ASCII without `#` (the pin separator)
# or `\`, no empty, `.` or `..` segment.
S3_REFERENCE = re.compile(
    r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/([!-~]{1,900}?)/?(?:#([0-9a-f]{32}))?"
)
MAX_REFERENCE_LENGTH = 1000  # the width of the job's reference columns


class InvalidReferenceError(HCNRError):
    code = "invalid_reference"


def _syntax(reference: str) -> None:
    if len(reference) > MAX_REFERENCE_LENGTH:
        raise InvalidReferenceError(f"reference longer than {MAX_REFERENCE_LENGTH} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in reference) or not _encodable(reference):
        raise InvalidReferenceError(f"{reference!r}: control or unencodable characters")


def _expected(reference: str) -> InvalidReferenceError:
    return InvalidReferenceError(
        f"{reference!r}: expected 'path:<dir under the models root>', "
        "'hf:org/name[@revision]' or 's3://bucket/prefix'"
    )


def parse_hub(reference: str) -> tuple[str, str | None]:
    """(repo_id, revision or None) of a well-formed `hf:` reference."""
    match = HF_REFERENCE.fullmatch(reference)
    if match is None or ".." in reference or "--" in reference:
        raise _expected(reference)
    if any(part.endswith((".", "-")) for part in match.group(1).split("/")):
        raise _expected(reference)  # the hub's rule: no name ends with `.` or `-`
    return match.group(1), match.group(2)


def parse_s3(reference: str, settings: Any, pinned: bool = False) -> tuple[str, str | None]:
    """(bucket/prefix, digest or None) of an `s3://` reference the operator allows.
    A client never sends the `#digest` pin: only the validation writes it."""
    match = S3_REFERENCE.fullmatch(reference)
    if match is None or (match.group(3) and not pinned):
        raise _expected(reference)
    bucket, key = match.group(1), match.group(2).rstrip("/")
    if any(part in ("", ".", "..") for part in key.split("/")) or "#" in key or "\\" in key:
        raise InvalidReferenceError(f"{reference!r}: empty, '.' or '..' key segment")
    location = f"{bucket}/{key}"
    allowed = [p.removeprefix("s3://").rstrip("/") for p in settings.models_s3_prefixes]
    if not any(location == p or location.startswith(p + "/") for p in allowed):
        raise InvalidReferenceError(
            f"{reference!r}: not under an S3 prefix the operator allows for models "
            "(HCNR_MODELS_S3_PREFIXES)"
        )
    artifacts = settings.artifacts_location.removeprefix("s3://").rstrip("/")
    if settings.artifacts_location.startswith("s3://") and (
        location == artifacts or location.startswith(artifacts + "/")
    ):  # other tenants' uploads and published checkpoints live there
        raise InvalidReferenceError(f"{reference!r}: lies in the service's own storage")
    return location, match.group(3)


def check_reference(reference: str, settings: Any) -> Path | None:
    """The quick check at job creation: syntax, confinement and, for `path:`, existence
    (the directory is returned). `hf:` and `s3://` are fetched by the validation task."""
    _syntax(reference)
    if reference.startswith("path:"):
        return _resolve_path(reference.removeprefix("path:"), settings.models_dir)
    if reference.startswith("hf:"):
        parse_hub(reference)
        return None
    if reference.startswith("s3://"):
        parse_s3(reference, settings)
        return None
    raise _expected(reference)


def fetch_reference(
    reference: str, settings: Any, tenant_id: str, hub_token: str | None
) -> tuple[Path, str | None]:
    """The validation's resolution: (local directory, pinned reference or None for
    `path:`). Downloads `hf:`/`s3://` models into the cache (store/remote_models.py)."""
    from store import remote_models

    check_reference(reference, settings)
    if reference.startswith("hf:"):
        fetched = remote_models.fetch_hub(*parse_hub(reference), settings, tenant_id, hub_token)
    elif reference.startswith("s3://"):
        fetched = remote_models.fetch_s3(parse_s3(reference, settings)[0], settings)
    else:
        return _resolve_path(reference.removeprefix("path:"), settings.models_dir), None
    return fetched.path, fetched.pinned


def resolve_reference(reference: str, models_root: Path, cache: Path | None = None) -> Path:
    """The real directory `reference` names, without any network: `path:` below the
    models root; a pinned `hf:org/name@<commit>` or `s3://...#<digest>` (what the
    validation recorded), or an `hf:` revision resolved before, from the model cache.

    Syntax is checked before the file system is touched: a reference that is too long,
    holds control characters or unencodable text, or has a `..` component is refused
    without a single system call (no probing outside the root, no existence oracle)."""
    _syntax(reference)
    if reference.startswith("path:"):
        return _resolve_path(reference.removeprefix("path:"), models_root)
    if reference.startswith("hf:"):
        repo_id, revision = parse_hub(reference)
        return _resolve_hub(repo_id, revision or "main", cache)
    if reference.startswith("s3://") and cache is not None:
        match = S3_REFERENCE.fullmatch(reference)
        if match is not None and match.group(3):
            return _resolve_s3(reference, match, cache)
    if reference.startswith("s3://"):
        raise ReferenceNotFoundError(f"{reference}: not fetched (the validation pins s3:// models)")
    raise _expected(reference)


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


def _resolve_hub(repo_id: str, revision: str, cache: Path | None) -> Path:
    from store import remote_models

    if cache is not None:
        commit = revision
        if not remote_models.COMMIT.fullmatch(revision):
            commit = remote_models._cached_ref(cache, repo_id, revision) or ""
        snapshot = remote_models.hub_snapshot(cache, repo_id, commit)
        if snapshot is not None:
            return snapshot
    raise ReferenceNotFoundError(
        f"hf:{repo_id}@{revision}: not in the model cache (a worker must share the "
        "validation's HCNR_MODEL_CACHE_DIR)"
    )


def _resolve_s3(reference: str, match: re.Match[str], cache: Path) -> Path:
    from store import remote_models

    location = f"{match.group(1)}/{match.group(2).rstrip('/')}"
    path = remote_models.s3_pinned(cache, location, match.group(3))
    if not path.is_dir():
        raise ReferenceNotFoundError(
            f"{reference}: not in the model cache (a worker must share the validation's "
            "HCNR_MODEL_CACHE_DIR)"
        )
    return path
