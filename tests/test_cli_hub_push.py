"""`hcnr repair --push-to-hub org/name` (issue 17): the written checkpoint is pushed with
the user's own token (HF_TOKEN) to HF_ENDPOINT — here the loopback Hub stand-in of the
service tests, which keeps what it received."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hcnr_cli.main import app
from tests.service.hub_standin import HubStandIn
from tests.toy_cli import repair_argv

TOKEN = "hf_cli_user_0123456789"


@pytest.fixture(scope="module")
def hub() -> Iterator[HubStandIn]:
    server = HubStandIn({}, writers={TOKEN: {"me"}}).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _hub_env(hub: HubStandIn, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    # never the machine's own saved login
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))


def run(argv: list[str]):
    return CliRunner().invoke(app, argv)


def test_repair_pushes_what_it_wrote(toy: dict[str, Path], hub: HubStandIn, tmp_path: Path):
    out = tmp_path / "out"
    hub.requests.clear()
    result = run(repair_argv(toy, out, "--push-to-hub", "me/toy-repaired"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    repo = hub.repos["me/toy-repaired"]
    assert repo.private  # the default: a repository the push creates is private
    assert summary["hub"]["commit_sha"] == repo.revisions["main"]
    assert summary["hub"]["url"] == f"{hub.url}/me/toy-repaired"
    # exactly the files the repair recorded, and its report, byte for byte
    report = json.loads((out / "hcnr_report.json").read_text())
    expected = {name: info["sha256"] for name, info in report["files"].items()}
    expected["hcnr_report.json"] = hashlib.sha256(
        (out / "hcnr_report.json").read_bytes()
    ).hexdigest()
    pushed = {name: hashlib.sha256(data).hexdigest() for name, data in repo.files.items()}
    assert pushed == expected
    assert "README.md" in pushed and any(n.endswith(".safetensors") for n in pushed)
    writes = [auth for method, _, auth in hub.requests if method == "POST"]
    assert writes and set(writes) == {f"Bearer {TOKEN}"}


def test_hub_public_creates_a_public_repository(toy, hub: HubStandIn, tmp_path: Path):
    result = run(repair_argv(toy, tmp_path / "out", "--push-to-hub", "me/open", "--hub-public"))
    assert result.exit_code == 0, result.output
    assert not hub.repos["me/open"].private


def test_no_token_or_a_bad_id_is_refused_before_any_work(
    toy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    result = run(repair_argv(toy, tmp_path / "a", "--push-to-hub", "me/../x"))
    assert result.exit_code != 0 and "org/name" in result.output
    assert not (tmp_path / "a").exists()
    monkeypatch.delenv("HF_TOKEN")
    result = run(repair_argv(toy, tmp_path / "b", "--push-to-hub", "me/x"))
    assert result.exit_code != 0 and "HF_TOKEN" in result.output
    assert not (tmp_path / "b").exists()


def test_a_refused_push_exits_non_zero_and_keeps_the_checkpoint(
    toy, hub: HubStandIn, tmp_path: Path
):
    out = tmp_path / "out"
    result = run(repair_argv(toy, out, "--push-to-hub", "someone-else/x"))
    assert result.exit_code != 0
    assert "error [hub_access_denied]" in result.output and str(out) in result.output
    assert (out / "hcnr_report.json").is_file()
    assert "someone-else/x" not in hub.repos
