"""`push_to_hub` (issue 17): a succeeded job's published checkpoint is pushed to a Hub
repository with the tenant's own `hf_token` by the `hcnr.push_to_hub` task, run here in
process (Celery's eager apply, as the webhook). The hub is the loopback stand-in
(hub_standin.py), which keeps what was pushed so it can be read back."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service import service_procs as procs
from tests.service.hub_standin import HubStandIn
from tests.service.service_support import InProcess, Models, job_body, make_inprocess

ALICE_TOKEN = "hf_alice_write_0123456789"
BOB_TOKEN = "hf_bob_write_0123456789"


@pytest.fixture(scope="module")
def hub() -> Iterator[HubStandIn]:
    server = HubStandIn({}, writers={ALICE_TOKEN: {"alice-org"}, BOB_TOKEN: {"bob"}}).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def env(models: Models, hub: HubStandIn, tmp_path_factory) -> InProcess:
    return make_inprocess(
        tmp_path_factory.mktemp("hubpush"), models, hub_endpoint=hub.url, webhook_attempts=3
    )


@pytest.fixture(scope="module")
def files(env: InProcess, models: Models) -> dict[str, dict[str, str]]:
    return {
        tenant: {
            purpose: env.upload(tenant, path, purpose).json()["id"]
            for purpose, path in (("honesty", models.honesty), ("task", models.task))
        }
        for tenant in ("alice", "bob")
    }


def run_job(env: InProcess, tenant: str, files, push: dict) -> dict:
    client = env.clients[tenant]
    response = client.post("/v1/repair-jobs", json=job_body(files[tenant], push_to_hub=push))
    assert response.status_code == 201, response.text
    assert response.json()["push_to_hub"]["status"] == "pending"
    assert env.run_queued() == ["succeeded"]
    return client.get(f"/v1/repair-jobs/{response.json()['id']}").json()


def events(env: InProcess, tenant: str, job_id: str) -> list[dict]:
    response = env.clients[tenant].get(f"/v1/repair-jobs/{job_id}/events?limit=200")
    return [e for e in response.json()["data"] if e["type"].startswith("hub_push")]


def test_push_needs_the_tenants_hf_token_and_a_valid_repo_id(env: InProcess, files):
    bob = env.clients["bob"]
    assert bob.get("/v1/secrets/hf_token").status_code == 404
    response = bob.post(
        "/v1/repair-jobs", json=job_body(files["bob"], push_to_hub={"repo_id": "bob/x"})
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "hub_token_missing"
    assert "PUT /v1/secrets/hf_token" in response.json()["error"]["message"]
    assert env.queued == []
    for bad in ("noslash", "a/b/c", "../etc", "org/..x", "org/na--me", "-org/x", "o" * 97 + "/x"):
        body = job_body(files["bob"], push_to_hub={"repo_id": bad})
        assert bob.post("/v1/repair-jobs", json=body).status_code == 422, bad
    for extra in ({"revision": "a/../b"}, {"commit_message": "x" * 501}, {"privat": True}):
        body = job_body(files["bob"], push_to_hub={"repo_id": "bob/x", **extra})
        assert bob.post("/v1/repair-jobs", json=body).status_code == 422, extra


def test_succeeded_job_pushes_exactly_its_published_files(env: InProcess, hub: HubStandIn, files):
    alice = env.clients["alice"]
    assert alice.put("/v1/secrets/hf_token", json={"value": ALICE_TOKEN}).status_code == 200
    hub.requests.clear()
    job = run_job(env, "alice", files, {"repo_id": "alice-org/toy-hcnr", "private": True})
    assert job["status"] == "succeeded"
    push = job["push_to_hub"]
    repo = hub.repos["alice-org/toy-hcnr"]
    assert push["status"] == "succeeded", push
    assert push["repo_id"] == "alice-org/toy-hcnr" and push["error"] is None
    assert push["commit_sha"] == repo.revisions["main"]
    assert push["commit_url"] == f"{hub.url}/alice-org/toy-hcnr/commit/{push['commit_sha']}"
    assert push["url"] == f"{hub.url}/alice-org/toy-hcnr"
    assert repo.private and repo.token == ALICE_TOKEN
    # exactly the job's artifacts, byte for byte: weights, config, tokenizer, card, report
    artifacts = alice.get(f"/v1/repair-jobs/{job['id']}/artifacts").json()["data"]
    published = {a["name"]: a["sha256"] for a in artifacts}
    pushed = {name: hashlib.sha256(data).hexdigest() for name, data in repo.files.items()}
    assert pushed == published
    assert {"README.md", "hcnr_report.json", "config.json"} <= set(pushed)
    assert any(name.endswith(".safetensors") for name in pushed)
    card = repo.files["README.md"].decode()
    assert card.startswith("---\n") and "hcnr" in card.lower()
    # one commit, with the job's default message; every write carried alice's token
    [commit] = [c for c in hub.commits if c.repo_id == "alice-org/toy-hcnr"]
    assert commit.summary == f"Upload HCNR-repaired checkpoint ({job['id']})"
    writes = [(m, p, a) for m, p, a in hub.requests if m == "POST"]
    assert writes and all(auth == f"Bearer {ALICE_TOKEN}" for _, _, auth in writes)
    assert [e["type"] for e in events(env, "alice", job["id"])] == [
        "hub_push_started",
        "hub_push_succeeded",
    ]
    # the report says it too; a redelivered message pushes nothing twice
    report = alice.get(f"/v1/repair-jobs/{job['id']}/report").json()
    assert report["hub_push"]["commit_sha"] == push["commit_sha"]
    env.app.state.notify(job["id"])
    assert len([c for c in hub.commits if c.repo_id == "alice-org/toy-hcnr"]) == 1


def test_branch_and_commit_message(env: InProcess, hub: HubStandIn, files):
    target = {"repo_id": "alice-org/toy-branch", "revision": "hcnr-v1", "commit_message": "mine"}
    target["private"] = False
    job = run_job(env, "alice", files, target)
    push = job["push_to_hub"]
    assert push["status"] == "succeeded" and push["revision"] == "hcnr-v1"
    repo = hub.repos["alice-org/toy-branch"]
    assert not repo.private
    assert repo.revisions["hcnr-v1"] == push["commit_sha"]
    assert "README.md" in repo.branch_files["hcnr-v1"] and "README.md" not in repo.files
    assert hub.commits[-1].summary == "mine" and hub.commits[-1].revision == "hcnr-v1"


def test_a_refused_push_is_recorded_and_the_job_stays_succeeded(
    env: InProcess, hub: HubStandIn, files
):
    """bob's token may write to `bob/` only: pushing to alice's namespace is refused with
    bob's token — alice's is never used for bob's job (secrets are per tenant)."""
    bob = env.clients["bob"]
    assert bob.put("/v1/secrets/hf_token", json={"value": BOB_TOKEN}).status_code == 200
    hub.requests.clear()
    job = run_job(env, "bob", files, {"repo_id": "alice-org/stolen"})
    assert job["status"] == "succeeded" and job["error"] is None
    push = job["push_to_hub"]
    assert push["status"] == "failed" and push["commit_sha"] is None
    assert push["error"]["code"] == "hub_access_denied", push
    assert "alice-org/stolen" not in hub.repos
    auths = {auth for method, _, auth in hub.requests if method == "POST"}
    assert auths == {f"Bearer {BOB_TOKEN}"}
    assert [e["type"] for e in events(env, "bob", job["id"])] == [
        "hub_push_started",
        "hub_push_failed",
    ]
    # the checkpoint is still downloadable
    artifact = bob.get(f"/v1/repair-jobs/{job['id']}/artifacts/config.json")
    assert artifact.status_code == 200
    # and alice cannot see bob's job or its push
    assert env.clients["alice"].get(f"/v1/repair-jobs/{job['id']}").status_code == 404


def test_a_damaged_artifact_is_not_pushed(env: InProcess, hub: HubStandIn, files):
    """The push re-reads the published files and checks them against the job's digests:
    a file changed in the artifact store since is refused, nothing reaches the hub."""
    from store import repositories
    from store.db import session_scope

    alice = env.clients["alice"]
    assert alice.put("/v1/secrets/hf_token", json={"value": ALICE_TOKEN}).status_code == 200
    target = {"repo_id": "alice-org/damaged"}
    job = run_job(env, "alice", files, target)
    assert job["push_to_hub"]["status"] == "succeeded"
    factory = env.app.state.session_factory
    with session_scope(factory) as session:  # as if this push had not happened yet...
        row = repositories.get_job_by_id(session, job["id"])
        row.report = {k: v for k, v in row.report.items() if k != "hub_push"}
        first = repositories.list_artifacts(session, job["id"])[0]
        name, stored = first.name, env.app.state.storage.local_path(first.storage_key)
    stored.write_bytes(stored.read_bytes() + b" ")  # ...and a published file changed
    del hub.repos["alice-org/damaged"]
    env.app.state.notify(job["id"])
    push = alice.get(f"/v1/repair-jobs/{job['id']}").json()["push_to_hub"]
    assert push["status"] == "failed" and push["error"]["code"] == "checksum_mismatch"
    assert name in push["error"]["message"]
    assert "alice-org/damaged" not in hub.repos


def test_a_wrong_token_fails_the_push_not_the_job(env: InProcess, hub: HubStandIn, files):
    bob = env.clients["bob"]
    assert bob.put("/v1/secrets/hf_token", json={"value": "hf_not_a_hub_token"}).status_code == 200
    job = run_job(env, "bob", files, {"repo_id": "bob/toy"})
    assert job["status"] == "succeeded"
    assert job["push_to_hub"]["status"] == "failed"
    assert job["push_to_hub"]["error"]["code"] == "hub_access_denied"
    assert "bob/toy" not in hub.repos


def test_a_busy_hub_is_retried_with_backoff(env: InProcess, hub: HubStandIn, files):
    bob = env.clients["bob"]
    assert bob.put("/v1/secrets/hf_token", json={"value": BOB_TOKEN}).status_code == 200
    hub.fail_creates[:] = [503, 429]
    job = run_job(env, "bob", files, {"repo_id": "bob/retried"})
    assert hub.fail_creates == []
    assert job["push_to_hub"]["status"] == "succeeded", job["push_to_hub"]
    assert [e["type"] for e in events(env, "bob", job["id"])] == [
        "hub_push_started",
        "hub_push_retrying",
        "hub_push_retrying",
        "hub_push_succeeded",
    ]
    # attempts are bounded (webhook_attempts=3): a hub down for longer fails the push
    hub.fail_creates[:] = [503, 503, 503]
    job = run_job(env, "bob", files, {"repo_id": "bob/down"})
    assert job["push_to_hub"]["status"] == "failed"
    assert job["push_to_hub"]["error"]["code"] == "hub_unavailable"
    assert hub.fail_creates == [] and "bob/down" not in hub.repos


def test_push_of_a_job_that_did_not_succeed_is_skipped(env: InProcess, hub: HubStandIn, files):
    alice = env.clients["alice"]
    body = job_body(files["alice"], push_to_hub={"repo_id": "alice-org/never"})
    created = alice.post("/v1/repair-jobs", json=body)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    assert alice.post(f"/v1/repair-jobs/{job_id}/cancel").json()["status"] == "cancelled"
    assert env.run_queued() == ["cancelled"]
    job = alice.get(f"/v1/repair-jobs/{job_id}").json()
    assert job["push_to_hub"]["status"] == "skipped"
    assert events(env, "alice", job_id) == []
    assert "alice-org/never" not in hub.repos


def test_sdk_sync_and_async(env: InProcess, hub: HubStandIn, files):
    """`repair_jobs.create(push_to_hub=...)` in both clients; `RepairJob.push_to_hub` holds
    the outcome; a tenant without hf_token gets the code as a typed error."""
    import asyncio

    import hcnr_client
    from fastapi.testclient import TestClient

    def key(tenant: str) -> str:
        return env.clients[tenant].headers["Authorization"].removeprefix("Bearer ")

    assert env.clients["alice"].put("/v1/secrets/hf_token", json={"value": ALICE_TOKEN}).is_success
    url = "http://testserver"
    alice = hcnr_client.HCNRClient(
        api_key=key("alice"), base_url=url, http_client=TestClient(env.app)
    )
    args = {"method": "hcnr", "base": "path:base", "finetuned": "path:finetuned-adapter"}
    args |= {"honesty_file": files["alice"]["honesty"], "task_file": files["alice"]["task"]}
    job = alice.repair_jobs.create(**args, push_to_hub="alice-org/sdk-sync")
    assert isinstance(job.push_to_hub, hcnr_client.HubPush)
    assert (job.push_to_hub.repo_id, job.push_to_hub.status) == ("alice-org/sdk-sync", "pending")
    assert job.push_to_hub.private is True
    assert env.run_queued() == ["succeeded"]
    pushed = alice.repair_jobs.retrieve(job.id).push_to_hub
    assert pushed.status == "succeeded"
    assert pushed.commit_sha == hub.repos["alice-org/sdk-sync"].revisions["main"]

    async def main() -> hcnr_client.RepairJob:
        transport = httpx.ASGITransport(app=env.app)
        async with httpx.AsyncClient(transport=transport) as http:
            aclient = hcnr_client.AsyncHCNRClient(
                api_key=key("alice"), base_url=url, http_client=http
            )
            target = {"repo_id": "alice-org/sdk-async", "private": False, "revision": "v2"}
            return await aclient.repair_jobs.create(**args, push_to_hub=target)

    created = asyncio.run(main())
    assert created.push_to_hub.revision == "v2" and created.push_to_hub.private is False
    env.queued.clear()  # not run: the request is what this checks
    env.clients["bob"].delete("/v1/secrets/hf_token")
    bob = alice.with_options(api_key=key("bob"))
    bob_args = {**args, "honesty_file": files["bob"]["honesty"], "task_file": files["bob"]["task"]}
    with pytest.raises(hcnr_client.UnprocessableEntityError) as refused:
        bob.repair_jobs.create(**bob_args, push_to_hub="bob/x")
    assert refused.value.code == "hub_token_missing"


@pytest.mark.slow
def test_the_push_runs_as_a_celery_task_of_hcnr_serve(
    models: Models, hub: HubStandIn, tmp_path: Path
):
    """`hcnr serve` (broker, embedded worker on the job and webhook queues): the push is
    a task of its own, routed and run by Celery, with the secret read in that process;
    the job comes from `hcnr jobs create --push-to-hub ... --hub-public`."""
    env = procs.service_env(
        env="test", data_dir=tmp_path, models_root=models.root, hub_endpoint=hub.url
    )
    key = procs.create_key(env, "carol")
    process, url = procs.start_api(env, tmp_path / "serve.log")
    try:
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
        assert client.put("/v1/secrets/hf_token", json={"value": ALICE_TOKEN}).status_code == 200
        # the job is created by `hcnr jobs create --push-to-hub` (the CLI over HTTP)
        cli_env = {**env, "HCNR_API_URL": url, "HCNR_API_KEY": key}
        argv = [procs.HCNR, "jobs", "create", "--method", "hcnr", "--base", "path:base"]
        argv += ["--finetuned", "path:finetuned-adapter", "--honesty", str(models.honesty)]
        argv += ["--task", str(models.task), "--push-to-hub", "alice-org/served", "--hub-public"]
        created = subprocess.run(argv, env=cli_env, capture_output=True, text=True, timeout=120)
        assert created.returncode == 0, created.stderr
        job_id = json.loads(created.stdout)["id"]
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            job = client.get(f"/v1/repair-jobs/{job_id}").json()
            if job["push_to_hub"]["status"] in ("succeeded", "failed", "skipped"):
                break
            time.sleep(0.5)
        assert job["status"] == "succeeded", job["error"]
        assert job["push_to_hub"]["status"] == "succeeded", job["push_to_hub"]
        artifacts = client.get(f"/v1/repair-jobs/{job_id}/artifacts").json()["data"]
        repo = hub.repos["alice-org/served"]
        pushed = {name: hashlib.sha256(data).hexdigest() for name, data in repo.files.items()}
        assert pushed == {a["name"]: a["sha256"] for a in artifacts}
        assert job["push_to_hub"]["commit_sha"] == repo.revisions["main"]
        assert not repo.private  # --hub-public
    finally:
        procs.stop(process)
