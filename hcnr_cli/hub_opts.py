"""`hcnr repair --push-to-hub org/name [--hub-private/--hub-public]`: push the written
checkpoint to a Hugging Face Hub repository with the user's own token (HF_TOKEN, or the
one `hf auth login` saved) at HF_ENDPOINT (default: the hub). The same push as the
service's (store/hub_push.py): exactly the files the repair wrote and recorded in its
report (weights, config, tokenizer, README card) and the report itself, in one commit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from hcnr_cli.common import err, fail

PANEL = "Hugging Face Hub"

PushToHub = Annotated[
    str | None,
    typer.Option(
        "--push-to-hub",
        metavar="ORG/NAME",
        help="After the repair, push the checkpoint to this Hub repository (created if "
        "missing) with HF_TOKEN or the saved login, at HF_ENDPOINT",
        rich_help_panel=PANEL,
    ),
]
HubPrivate = Annotated[
    bool,
    typer.Option(
        "--hub-private/--hub-public",
        help="Visibility of a repository the push creates (an existing one keeps its own)",
        rich_help_panel=PANEL,
    ),
]


def target_of(repo_id: str | None, private: bool) -> tuple[Any, str] | None:
    """(HubTarget, token) for the flags, None without --push-to-hub; a bad repository id
    or a missing token exits before any work."""
    if repo_id is None:
        return None
    from huggingface_hub import get_token

    from store.hub_push import HubTarget, check_repo_id

    try:
        check_repo_id(repo_id)
    except ValueError as exc:
        fail(exc)
    token = get_token()
    if not token:
        fail(ValueError("--push-to-hub needs a Hub token: set HF_TOKEN or run `hf auth login`"))
    return HubTarget(repo_id, private=private), token


def push(target: tuple[Any, str] | None, out: Path, report: dict, report_name: str) -> dict | None:
    """Push what the repair wrote; returns the outcome (repo, commit sha and URL)."""
    if target is None:
        return None
    from store.hub_push import HubPushError
    from store.hub_push import push as push_files

    hub_target, token = target
    names = {*report.get("files", {}), report_name}
    files = {name: out / name for name in sorted(names) if (out / name).is_file()}
    err.print(f"pushing {len(files)} files to {hub_target.repo_id} ...", highlight=False)
    try:
        return push_files(files, hub_target, token, os.environ.get("HF_ENDPOINT") or None)
    except HubPushError as exc:
        fail(HubPushError(exc.code, f"{exc} (the checkpoint is in {out})"))
    return None
