"""Pushing a repaired checkpoint to a Hugging Face Hub repository (issue 17).

Two callers: `hcnr repair --push-to-hub` (the user's own token and HF_ENDPOINT) and the
service's `hcnr.push_to_hub` task (worker/hub_push.py: the tenant's `hf_token` secret and
HCNR_HUB_ENDPOINT). Both name the exact files to send — a checkpoint's published
artifacts, README card and report included — so nothing else in the folder (scratch, a
tracker's spool) ever leaves, and one commit carries them all.

Errors come back as `HubPushError` with a code and whether trying again may help (429,
5xx, transport), so the task retries those with backoff like a webhook and records the
rest at once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from store.references import _HUB_PART

REPO_ID = re.compile(rf"{_HUB_PART}/{_HUB_PART}")
REVISION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")  # as an `hf:` reference's @rev
MAX_COMMIT_MESSAGE = 500
DEFAULT_REVISION = "main"


def check_repo_id(repo_id: str) -> str:
    """`org/name` as the hub allows it (the `hf:` reference rule of store/references.py)."""
    if REPO_ID.fullmatch(repo_id) is None or ".." in repo_id or "--" in repo_id:
        raise ValueError(
            f"{repo_id!r}: expected a hub repository id 'org/name' (letters, digits, "
            "'_', '.', '-'; no leading '.'/'-', no '..' or '--')"
        )
    return repo_id


def check_revision(revision: str) -> str:
    if REVISION.fullmatch(revision) is None or ".." in revision:
        raise ValueError(f"{revision!r}: expected a branch name (letters, digits, '_', '.', '-')")
    return revision


@dataclass(frozen=True)
class HubTarget:
    repo_id: str
    private: bool = True
    revision: str | None = None  # a branch; created from main when missing
    commit_message: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HubTarget:
        return cls(
            repo_id=data["repo_id"],
            private=bool(data.get("private", True)),
            revision=data.get("revision"),
            commit_message=data.get("commit_message"),
        )


class HubPushError(Exception):
    def __init__(self, code: str, message: str, retryable: bool = False):
        super().__init__(message)
        self.code, self.retryable = code, retryable


def push(
    files: Mapping[str, Path],
    target: HubTarget,
    token: str | None,
    endpoint: str | None = None,
    default_message: str = "Upload HCNR-repaired checkpoint",
) -> dict[str, Any]:
    """Create `target.repo_id` if missing (`private` applies only then: the hub never
    changes an existing repository's visibility here) and commit `files` (name in the
    repository -> local path) to its branch in one commit. Returns repo_id, revision,
    commit_sha, commit_url and url."""
    from huggingface_hub import CommitOperationAdd, HfApi

    from store.remote_models import _hub_online

    revision = target.revision or DEFAULT_REVISION
    # token=False: an empty token must never fall back to the process's own login
    api = HfApi(endpoint=endpoint, token=token or False)
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
        for name, path in sorted(files.items())
    ]
    try:
        with _hub_online():
            repo_url = api.create_repo(target.repo_id, private=target.private, exist_ok=True)
            if revision != DEFAULT_REVISION:
                api.create_branch(target.repo_id, branch=revision, exist_ok=True)
            info = api.create_commit(
                target.repo_id,
                operations,
                commit_message=target.commit_message or default_message,
                revision=revision,
            )
    except Exception as exc:
        raise classify(exc, target.repo_id) from exc
    return {
        "repo_id": target.repo_id,
        "revision": revision,
        "commit_sha": info.oid,
        "commit_url": info.commit_url,
        "url": str(repo_url),
    }


def classify(exc: Exception, repo_id: str) -> HubPushError:
    """A hub or transport failure as a code: hub_access_denied (401/403, or a repository
    the token cannot see), hub_unavailable (429, 5xx, network: retryable) or
    hub_push_rejected (any other refusal: the message says why)."""
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    from store.remote_models import _transport_errors

    if isinstance(exc, HubPushError):
        return exc
    if isinstance(exc, RepositoryNotFoundError):
        return HubPushError(
            "hub_access_denied", f"{repo_id}: the hub token cannot create or write to it"
        )
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            return HubPushError(
                "hub_access_denied", f"{repo_id}: the hub refused the token ({status})"
            )
        if status == 429 or (status is not None and status >= 500):
            return HubPushError("hub_unavailable", f"the hub answered {status}", retryable=True)
        return HubPushError("hub_push_rejected", f"{repo_id}: the hub answered {status}: {exc}")
    if isinstance(exc, (*_transport_errors(), OSError)):
        return HubPushError(
            "hub_unavailable",
            f"the hub cannot be reached ({type(exc).__name__})",
            retryable=True,
        )
    return HubPushError("hub_push_rejected", f"{type(exc).__name__}: {exc}")
