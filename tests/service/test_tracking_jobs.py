"""A job's tracker `integrations` (issue 17): refused at POST when the service must not
follow them (file:/sqlite: URIs name the worker's disk, private addresses, credentials in
the body), stored apart from the hyper-parameters, and run by the worker — here W&B with
no key, offline, published as `wandb-offline.tar` and read back with W&B's records."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from tests.service.service_support import InProcess, Models, job_body

pytest.importorskip("wandb")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def files(inproc: InProcess, models: Models) -> dict[str, str]:
    return {
        purpose: inproc.upload("alice", path, purpose).json()["id"]
        for purpose, path in (("honesty", models.honesty), ("task", models.task))
    }


def _post(inproc: InProcess, files: dict[str, str], integrations: list) -> object:
    body = job_body(files, integrations=integrations)
    return inproc.clients["alice"].post("/v1/repair-jobs", json=body)


@pytest.mark.parametrize(
    ("integration", "code", "words"),
    [
        ({"type": "mlflow", "uri": "file:///etc"}, "invalid_integration", "http(s)"),
        ({"type": "mlflow", "uri": "sqlite:////tmp/x.db"}, "invalid_integration", "http(s)"),
        ({"type": "mlflow", "uri": "http://127.0.0.1:5000"}, "invalid_integration", "public"),
        ({"type": "mlflow", "uri": "http://10.1.2.3"}, "invalid_integration", "public"),
        ({"type": "mlflow", "uri": "http://[::1]:80"}, "invalid_integration", "public"),
        ({"type": "mlflow", "uri": "http://169.254.169.254"}, "invalid_integration", "public"),
        ({"type": "wandb", "api_key": "k" * 40}, None, "no credentials"),
        ({"type": "mlflow", "uri": "https://u:pw@8.8.8.8"}, None, "credentials"),
        ({"type": "wandb", "uri": "https://8.8.8.8"}, None, "not an option"),
        ({"type": "comet"}, None, "type"),
        ({"type": "wandb", "project": "../../x"}, None, "project"),
    ],
)
def test_refused_at_post(
    inproc: InProcess, files: dict[str, str], integration: dict, code: str | None, words: str
) -> None:
    response = _post(inproc, files, [integration])
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    if code is not None:
        assert error["code"] == code
    assert words in json.dumps(error)
    assert inproc.queued == []


def test_one_integration_per_type(inproc: InProcess, files: dict[str, str]) -> None:
    response = _post(inproc, files, [{"type": "wandb"}, {"type": "wandb", "project": "b"}])
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_integration"


def test_stored_apart_from_the_hyperparameters(inproc: InProcess, files: dict[str, str]) -> None:
    from api.schemas import Hyperparameters

    wanted = {"type": "mlflow", "uri": "https://8.8.8.8:5000", "project": "honesty"}
    response = _post(inproc, files, [wanted])
    assert response.status_code == 201, response.text
    job = inproc.clients["alice"].get(f"/v1/repair-jobs/{response.json()['id']}").json()
    (echoed,) = job["integrations"]
    assert {k: v for k, v in echoed.items() if v is not None} == {**wanted, "tags": {}}
    assert set(job["hyperparameters"]) == set(Hyperparameters.model_fields)  # no _integrations
    inproc.queued.clear()  # not run: nothing listens at that address


def test_a_wandb_job_publishes_its_offline_run(
    inproc: InProcess, files: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_tracking import _wandb_run

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    response = _post(inproc, files, [{"type": "wandb", "project": "svc", "tags": {"team": "a"}}])
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    assert inproc.run_queued() == ["succeeded"]
    client = inproc.clients["alice"]
    report = client.get(f"/v1/repair-jobs/{job_id}/report").json()
    (entry,) = report["tracking"]
    assert entry["status"] == "ok" and entry["offline_artifact"] == "wandb-offline.tar"
    assert "offline_dir" not in entry  # the worker's scratch means nothing to the user
    names = {a["name"] for a in client.get(f"/v1/repair-jobs/{job_id}/artifacts").json()["data"]}
    assert "wandb-offline.tar" in names
    tar = client.get(f"/v1/repair-jobs/{job_id}/artifacts/wandb-offline.tar")
    assert tar.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(tar.content)) as archive:
        members = archive.getmembers()
        assert all(m.isfile() or m.isdir() for m in members)
        archive.extractall(tmp_path, filter="data")
    (run_dir,) = tmp_path.glob("offline-run-*")
    assert entry["run_id"] in run_dir.name
    run = _wandb_run(run_dir)
    assert (run["name"], run["project"], run["exit_code"]) == (job_id, "svc", 0)
    assert run["config"]["job_id"] == job_id
    assert run["config"]["config.r_iw"] == report["config"]["r_iw"]
    for stage, seconds in report["stage_seconds"].items():
        assert run["summary"][f"stage_seconds/{stage}"] == seconds, stage
    assert run["summary"]["n_selected_matrices"] == report["n_selected_matrices"]
    events = client.get(f"/v1/repair-jobs/{job_id}/events").json()["data"]
    (event,) = [e for e in events if e["type"] == "tracking"]
    assert event["message"] == "tracked" and event["data"]["tracking"] == report["tracking"]


def test_the_tenants_own_key_is_used(inproc: InProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tenant's wandb_api_key secret reaches the tracker (and makes the run online);
    without it the worker's environment applies."""
    from hcnr_core.tracking import Integration
    from store import repositories
    from store.db import session_scope
    from worker import job_tracking

    client = inproc.clients["alice"]
    assert client.put("/v1/secrets/wandb_api_key", json={"value": "w" * 40}).is_success
    factory = inproc.app.state.session_factory
    with session_scope(factory) as session:
        tenant = repositories.get_or_create_tenant(session, "alice")
        bob = repositories.get_or_create_tenant(session, "bob")

    class Ctx:
        session_factory, settings = factory, inproc.settings

    class FakeJob:
        id = "job_x"
        tenant_id = tenant.id

    specs = [Integration(type="wandb"), Integration(type="mlflow", uri="https://8.8.8.8")]
    keys = job_tracking._credentials(Ctx, FakeJob, specs)
    assert keys == {"wandb": "w" * 40}
    FakeJob.tenant_id = bob.id
    assert job_tracking._credentials(Ctx, FakeJob, specs) == {}  # bob's own: none
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert job_tracking._with_mode(specs[0], "w" * 40).mode == "online"
    assert job_tracking._with_mode(specs[0], None).mode == "offline"
    client.delete("/v1/secrets/wandb_api_key")
