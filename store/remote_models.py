"""Models where users keep them: `hf:org/name[@revision]` on a Hugging Face Hub and
`s3://bucket/prefix` in S3-compatible storage, fetched by the validation task into the
shared model cache (`HCNR_MODEL_CACHE_DIR`) and pinned, so the GPU worker reads exactly
that version from the cache without any network.

Only what a checkpoint needs and cannot execute is fetched: top-level safetensors, JSON
configs, tokenizer files and the chat template (`SAFE_NAMES`). A source whose weights are
only pickle (`.bin`, `.pt`, ...) is refused before anything is downloaded; code files are
never fetched and `trust_remote_code` is never enabled (hcnr_core.checkpoint). The listing
is bounded (`max_remote_model_files`, `max_checkpoint_bytes`) before a byte moves, and
the received files are checked against it.

Cache layout (immutable snapshots, written by an atomic rename of a complete directory):

    hf/<org>--<name>/snapshots/<commit>/<name>/  the files of one hub commit
    hf/<org>--<name>/refs/<revision>           the commit a branch/tag last resolved to
    hf/<org>--<name>/access/<commit>.json      {"private": bool, "tenants": [...]}
    s3/<sha256(bucket/prefix)[:24]>/<digest>/<last segment>/  one S3 listing (digest of
                                               names + ETags + sizes)

The directory is named as the model (`<name>`, the prefix's last segment), as a local
copy would be: an adapter that names its base `org/Model` matches a base directory
called `Model` (hcnr_core.checkpoint), never a commit hash.

A hub reference asks the hub (with the tenant's own `hf_token`, never the operator's)
for the revision's commit, which also checks the tenant's access; when the hub cannot be
reached, or `HCNR_HUB_OFFLINE` is set, it resolves from the cache. A commit already cached
needs no network at all. A private or gated commit is served from the cache only to
tenants the hub once authorised for it: the cache is shared, access is not.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hcnr_core.errors import (
    CheckpointError,
    CheckpointTooLargeError,
    HCNRError,
    UnsafeCheckpointError,
)
from hcnr_core.formats import PICKLE_SUFFIXES  # torch-free: the API process imports this

log = logging.getLogger("hcnr.models")


class ReferenceNotFoundError(HCNRError):
    """A model reference names nothing (or nothing this tenant may read)."""

    code = "reference_not_found"


SAFE_NAMES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "adapter_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "tokenizer.model",  # sentencepiece: a protobuf, not pickle
        "chat_template.jinja",
        "chat_template.json",
    }
)
COMMIT = re.compile(r"[0-9a-f]{40}")


class HubAccessError(HCNRError):
    """The hub refused the repository: private, gated or absent for this token."""

    code = "hub_access_denied"


class RevisionNotFoundError(HCNRError):
    code = "revision_not_found"


class ModelSourceUnavailableError(HCNRError):
    """The hub or S3 cannot be reached and the model is not in the cache."""

    code = "model_source_unavailable"


@dataclass(frozen=True)
class Fetched:
    path: Path
    pinned: str  # the reference of exactly this version: hf:org/name@<commit>, s3://...#<digest>


# --- what may be fetched -------------------------------------------------------------------


def select_files(sizes: dict[str, int | None], source: str, settings: Any) -> dict[str, int]:
    """The files of a listing to fetch ({name: bytes}); refuses pickle-only weights, a
    listing without safetensors, unknown sizes and what exceeds the limits."""
    chosen = {
        name: size
        for name, size in sizes.items()
        if "/" not in name and (name in SAFE_NAMES or name.endswith(".safetensors"))
    }
    if not any(name.endswith(".safetensors") for name in chosen):
        pickles = sorted(n for n in sizes if n.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise UnsafeCheckpointError(
                f"{source}: weights only in pickle format ({', '.join(pickles[:5])}); pickle "
                "can execute code when loaded, so only safetensors are accepted"
            )
        raise CheckpointError(f"{source}: no safetensors weights at the top level")
    if not any(name in chosen for name in ("config.json", "adapter_config.json")):
        raise CheckpointError(f"{source}: not a checkpoint (no config.json or adapter_config.json)")
    unknown = sorted(name for name, size in chosen.items() if size is None or size < 0)
    if unknown:
        raise CheckpointError(f"{source}: the listing gives no size for {', '.join(unknown[:5])}")
    if len(chosen) > settings.max_remote_model_files:
        raise CheckpointTooLargeError(
            f"{source}: {len(chosen)} files; the limit is {settings.max_remote_model_files}",
            limit="max_remote_model_files",
            value=len(chosen),
            allowed=settings.max_remote_model_files,
        )
    total = sum(chosen.values())  # type: ignore[arg-type]
    if total > settings.max_checkpoint_bytes:
        raise CheckpointTooLargeError(
            f"{source}: {total} bytes to download; the limit is {settings.max_checkpoint_bytes}",
            limit="max_checkpoint_bytes",
            value=total,
            allowed=settings.max_checkpoint_bytes,
        )
    return chosen  # type: ignore[return-value]


def _check_received(staging: Path, expected: dict[str, int], source: str) -> None:
    for name, size in expected.items():
        got = (staging / name).stat().st_size
        if got != size:
            raise CheckpointError(f"{source}: {name} has {got} bytes, the listing said {size}")


@contextlib.contextmanager
def _staging(cache: Path) -> Iterator[Path]:
    (cache / "tmp").mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache / "tmp"))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, files: dict[str, int], target: Path) -> None:
    """Move the fetched files to `target` in one rename: a snapshot directory exists
    complete or not at all (a concurrent fetch of the same version simply loses)."""
    complete = staging / "complete"
    complete.mkdir()
    for name in files:
        os.replace(staging / name, complete / name)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(complete, target)
    except OSError:
        if not target.is_dir():
            raise


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- hub ---------------------------------------------------------------------------------


def hub_dir(cache: Path, repo_id: str) -> Path:
    return cache / "hf" / repo_id.replace("/", "--")


def _hub_target(cache: Path, repo_id: str, commit: str) -> Path:
    return hub_dir(cache, repo_id) / "snapshots" / commit / repo_id.split("/")[1]


def hub_snapshot(cache: Path, repo_id: str, commit: str) -> Path | None:
    path = _hub_target(cache, repo_id, commit)
    return path if COMMIT.fullmatch(commit) and path.is_dir() else None


_ONLINE = threading.Lock()


@contextlib.contextmanager
def _hub_online() -> Iterator[None]:
    """huggingface_hub refuses every request while HF_HUB_OFFLINE=1, which the service's
    images and tests set so that transformers never reaches out by itself. The fetch is
    the one deliberate exception (the operator's HCNR_HUB_OFFLINE governs it), so the
    library's flag is lifted for its duration only, one fetch at a time per process."""
    from huggingface_hub import constants

    with _ONLINE:
        saved = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = False
        try:
            yield
        finally:
            constants.HF_HUB_OFFLINE = saved


def fetch_hub(
    repo_id: str, revision: str | None, settings: Any, tenant_id: str, token: str | None
) -> Fetched:
    cache, revision = settings.model_cache, revision or "main"
    source = f"hf:{repo_id}@{revision}"
    if COMMIT.fullmatch(revision) and _allowed(cache, repo_id, revision, tenant_id):
        return Fetched(hub_snapshot(cache, repo_id, revision), f"hf:{repo_id}@{revision}")
    if settings.hub_offline:
        return _hub_from_cache(cache, repo_id, revision, tenant_id, "HCNR_HUB_OFFLINE is set")
    try:
        info = _model_info(repo_id, revision, settings, token)
    except _Unreachable as exc:
        return _hub_from_cache(cache, repo_id, revision, tenant_id, str(exc))
    commit = info.sha
    if not commit or not COMMIT.fullmatch(commit):
        raise ModelSourceUnavailableError(f"{source}: the hub answered no commit")
    if hub_snapshot(cache, repo_id, commit) is None:
        sizes = {s.rfilename: s.size for s in info.siblings or []}
        files = select_files(sizes, source, settings)
        _download_hub(repo_id, commit, files, settings, token, source)
    directory = hub_dir(cache, repo_id)
    if not COMMIT.fullmatch(revision):
        _write_text(directory / "refs" / revision, commit)
    _record_access(directory, commit, bool(info.private or info.gated), tenant_id)
    return Fetched(hub_snapshot(cache, repo_id, commit), f"hf:{repo_id}@{commit}")


class _Unreachable(Exception):
    pass


def _model_info(repo_id: str, revision: str, settings: Any, token: str | None) -> Any:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
    )
    from huggingface_hub.errors import RevisionNotFoundError as HubRevisionNotFound

    source = f"hf:{repo_id}@{revision}"
    # token=False: never the operator's own login (HF_TOKEN, ~/.cache) for a tenant's job
    api = HfApi(endpoint=settings.hub_endpoint, token=token or False)
    try:
        with _hub_online():
            return api.model_info(repo_id, revision=revision, files_metadata=True, timeout=30)
    except GatedRepoError as exc:
        raise HubAccessError(
            f"{source}: the repository is gated and this tenant's hub token "
            + ("has not been granted access" if token else "is not set")
            + "; accept its terms on the hub, then set the token: PUT /v1/secrets/hf_token"
        ) from exc
    except HubRevisionNotFound as exc:
        raise RevisionNotFoundError(f"{source}: no such revision (branch, tag or commit)") from exc
    except RepositoryNotFoundError as exc:  # the hub answers 401/404 alike for private repos
        hint = (
            "with this tenant's hub token"
            if token
            else "without a hub token; if it is private or gated, set the tenant's token: "
            "PUT /v1/secrets/hf_token"
        )
        raise HubAccessError(f"{source}: repository not found or not accessible {hint}") from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise HubAccessError(
                f"{source}: the hub refused access ({status}); set or renew the tenant's "
                "token: PUT /v1/secrets/hf_token"
            ) from exc
        raise _Unreachable(f"the hub answered {status}") from exc
    except (*_transport_errors(), OSError) as exc:
        raise _Unreachable(f"the hub cannot be reached ({type(exc).__name__})") from exc


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection and timeout errors of the HTTP client huggingface_hub uses (httpx2 in
    huggingface_hub 2.x, httpx before)."""
    errors: list[type[BaseException]] = []
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError, AttributeError):
            errors.append(__import__(module).TransportError)
    return tuple(errors)


def _download_hub(
    repo_id: str, commit: str, files: dict[str, int], settings: Any, token: str | None, source: str
) -> None:
    from huggingface_hub import hf_hub_download

    with _staging(settings.model_cache) as staging:
        with _hub_online():
            for name in files:
                # local_dir: plain files (the hub cache's symlinks into blobs/ would resolve
                # outside the checkpoint, which hcnr_core.checkpoint refuses)
                hf_hub_download(
                    repo_id,
                    name,
                    revision=commit,
                    local_dir=staging,
                    endpoint=settings.hub_endpoint,
                    token=token or False,
                    etag_timeout=30,
                )
        _check_received(staging, files, source)
        _publish(staging, files, _hub_target(settings.model_cache, repo_id, commit))
    log.info("fetched %s (%d files, %d bytes)", source, len(files), sum(files.values()))


def _record_access(directory: Path, commit: str, private: bool, tenant_id: str) -> None:
    path = directory / "access" / f"{commit}.json"
    seen = _read_access(path)
    tenants = set(seen.get("tenants", [])) | ({tenant_id} if private else set())
    if seen.get("private") == private and tenants == set(seen.get("tenants", [])):
        return
    _write_text(path, json.dumps({"private": private, "tenants": sorted(tenants)}))


def _read_access(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _allowed(cache: Path, repo_id: str, commit: str, tenant_id: str) -> bool:
    """A cached commit this tenant may read without asking the hub: public, or private
    and the hub once authorised this tenant for it."""
    if hub_snapshot(cache, repo_id, commit) is None:
        return False
    access = _read_access(hub_dir(cache, repo_id) / "access" / f"{commit}.json")
    if not access:
        return False  # unknown: ask the hub
    return not access.get("private") or tenant_id in access.get("tenants", [])


def cached_snapshot(cache: Path, repo_id: str, revision: str, tenant_id: str) -> Path | None:
    """The cached snapshot of `hf:repo_id@revision` this tenant may read without the hub
    (public, or private and authorised once), else None: for reads that must not go to the
    network or leak a private model to another tenant, e.g. an estimate."""
    commit = revision if COMMIT.fullmatch(revision) else _cached_ref(cache, repo_id, revision)
    if commit is None or not _allowed(cache, repo_id, commit, tenant_id):
        return None
    return hub_snapshot(cache, repo_id, commit)


def _hub_from_cache(cache: Path, repo_id: str, revision: str, tenant_id: str, why: str) -> Fetched:
    commit = revision if COMMIT.fullmatch(revision) else _cached_ref(cache, repo_id, revision)
    if commit is None or hub_snapshot(cache, repo_id, commit) is None:
        raise ModelSourceUnavailableError(
            f"hf:{repo_id}@{revision}: not in the model cache and {why}"
        )
    if not _allowed(cache, repo_id, commit, tenant_id):
        raise HubAccessError(
            f"hf:{repo_id}@{revision}: cached, but this tenant's access to the private "
            f"repository cannot be checked ({why})"
        )
    return Fetched(hub_snapshot(cache, repo_id, commit), f"hf:{repo_id}@{commit}")


def _cached_ref(cache: Path, repo_id: str, revision: str) -> str | None:
    try:
        commit = (hub_dir(cache, repo_id) / "refs" / revision).read_text().strip()
    except OSError:
        return None
    return commit if COMMIT.fullmatch(commit) else None


# --- S3 ----------------------------------------------------------------------------------


def s3_filesystem(settings: Any) -> Any:
    """The service's own S3 client settings (HCNR_S3_ENDPOINT_URL and the AWS credentials
    of its environment), as store.storage uses them for artifacts."""
    import fsspec

    options: dict[str, Any] = {}
    if settings.s3_endpoint_url:
        options["client_kwargs"] = {"endpoint_url": settings.s3_endpoint_url}
    return fsspec.filesystem("s3", **options)


def s3_dir(cache: Path, location: str) -> Path:
    return cache / "s3" / hashlib.sha256(location.encode()).hexdigest()[:24]


def s3_pinned(cache: Path, location: str, digest: str) -> Path:
    return s3_dir(cache, location) / digest / location.rsplit("/", 1)[-1]


def fetch_s3(location: str, settings: Any) -> Fetched:
    """`location` is `bucket/prefix` (already checked against HCNR_MODELS_S3_PREFIXES)."""
    source = f"s3://{location}"
    fs = s3_filesystem(settings)
    try:
        entries = fs.ls(location, detail=True, refresh=True)
    except FileNotFoundError as exc:
        raise _not_found(source) from exc
    except PermissionError as exc:
        raise HubAccessError(f"{source}: the service's S3 credentials may not read it") from exc
    except OSError as exc:
        raise ModelSourceUnavailableError(f"{source}: S3 cannot be reached: {exc}") from exc
    objects = {
        entry["name"].rsplit("/", 1)[-1]: entry for entry in entries if entry.get("type") == "file"
    }
    if not objects:
        raise _not_found(source)
    files = select_files({n: e.get("size") for n, e in objects.items()}, source, settings)
    listing = sorted((n, str(objects[n].get("ETag", "")), files[n]) for n in files)
    digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:32]
    target = s3_pinned(settings.model_cache, location, digest)
    if not target.is_dir():
        with _staging(settings.model_cache) as staging:
            for name in files:
                fs.get_file(objects[name]["name"], str(staging / name))
            _check_received(staging, files, source)
            _publish(staging, files, target)
        log.info("fetched %s (%d files, %d bytes)", source, len(files), sum(files.values()))
    return Fetched(target, f"s3://{location}#{digest}")


def _not_found(source: str) -> HCNRError:
    return ReferenceNotFoundError(f"{source}: no objects under this prefix")
