"""`hf:` and `s3://` model references (issue 16): the validation task fetches the model
into the shared cache with the tenant's own (encrypted) hub token and pins the version on
the job; the GPU worker reads it offline. A stand-in for the hub's HTTP API
(hub_standin.py) and moto's S3 server, both on loopback: nothing reaches the internet."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.service import service_procs as procs
from tests.service.hub_standin import HubStandIn, Repo, repo_from_dir
from tests.service.service_support import InProcess, Models, make_inprocess
from tests.service.test_s3_storage import _boto_credentials

TOKEN = "hf_alice_test_token_0123456789"
MODELS_BUCKET = "team-models"


def adapter_naming(models: Models, base: str) -> Path:
    """The toy adapter as published: its adapter_config names the base as `base` (a hub
    id), not the local directory it was trained from."""
    target = models.root.parent / f"adapter-for-{base.replace('/', '--')}"
    if not target.exists():
        shutil.copytree(models.root / "finetuned-adapter", target)
        config = json.loads((target / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = base
        (target / "adapter_config.json").write_text(json.dumps(config))
    return target


@pytest.fixture(scope="module")
def hub(models: Models) -> Iterator[HubStandIn]:
    pickle_only = {
        "config.json": (models.root / "base" / "config.json").read_bytes(),
        "pytorch_model.bin": b"\x80\x04pickle",
    }
    server = HubStandIn(
        {
            "acme/toy-base": repo_from_dir(models.root / "base"),
            "acme/toy-adapter": repo_from_dir(
                adapter_naming(models, "acme/toy-base"), private=True, token=TOKEN
            ),
            "acme/pickle-only": Repo(pickle_only, revisions={}),
        }
    )
    server.repos["acme/pickle-only"].revisions["main"] = server.repos["acme/pickle-only"].commit
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory, monkeypatch_module) -> Iterator[SimpleNamespace]:
    pytest.importorskip("moto.server", reason="moto[server] is in the test extra")
    import boto3

    process, endpoint = procs.start_moto(tmp_path_factory.mktemp("moto-models"))
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch_module.setenv(key, value)
    client = boto3.client("s3", endpoint_url=endpoint, **_boto_credentials())
    client.create_bucket(Bucket=MODELS_BUCKET)
    yield SimpleNamespace(endpoint=endpoint, client=client)
    procs.stop(process)


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    patch = pytest.MonkeyPatch()
    yield patch
    patch.undo()


@pytest.fixture(scope="module")
def env(models: Models, hub: HubStandIn, s3, tmp_path_factory) -> InProcess:
    return make_inprocess(
        tmp_path_factory.mktemp("remote"),
        models,
        hub_endpoint=hub.url,
        hub_offline=False,
        s3_endpoint_url=s3.endpoint,
        models_s3_prefixes=[f"s3://{MODELS_BUCKET}/shared"],
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


def post_job(env: InProcess, tenant: str, files, base: str, finetuned: str) -> dict:
    body = {
        "method": "hcnr",
        "base": base,
        "finetuned": finetuned,
        "honesty_file": files[tenant]["honesty"],
        "task_file": files[tenant]["task"],
    }
    client = env.clients[tenant]
    response = client.post("/v1/repair-jobs", json=body)
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "validating"
    return client.get(f"/v1/repair-jobs/{response.json()['id']}").json()  # validated inline


def digests(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file() and p.suffix != ".md"
    }


# --- secrets --------------------------------------------------------------------------------


def test_secrets_are_write_only_encrypted_and_per_tenant(env: InProcess):
    from sqlalchemy import text

    alice, bob = env.clients["alice"], env.clients["bob"]
    response = alice.put("/v1/secrets/hf_token", json={"value": TOKEN})
    assert response.status_code == 200, response.text
    assert TOKEN not in response.text and response.json()["name"] == "hf_token"
    listed = alice.get("/v1/secrets").json()["data"]
    assert [s["name"] for s in listed] == ["hf_token"] and TOKEN not in str(listed)
    # another tenant sees nothing of it: not listed, 404 by name, cannot delete it
    assert bob.get("/v1/secrets").json()["data"] == []
    assert bob.get("/v1/secrets/hf_token").status_code == 404
    assert bob.delete("/v1/secrets/hf_token").status_code == 404
    assert alice.get("/v1/secrets/hf_token").status_code == 200
    # bob's PUT creates bob's own secret; alice's is untouched
    assert bob.put("/v1/secrets/hf_token", json={"value": "hf_bob"}).status_code == 200
    assert bob.delete("/v1/secrets/hf_token").status_code == 200
    assert alice.get("/v1/secrets/hf_token").status_code == 200
    # unknown names and control characters are refused
    assert alice.put("/v1/secrets/aws_key", json={"value": "x"}).status_code == 422
    assert alice.put("/v1/secrets/hf_token", json={"value": "a\nb"}).status_code == 422
    # the raw row holds no plaintext, and the value opens only as alice's hf_token
    engine = env.app.state.engine
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT tenant_id, name, ciphertext FROM tenant_secrets"))
        rows = list(rows)
    assert len(rows) == 1
    tenant_id, name, stored = rows[0]
    assert TOKEN not in stored and TOKEN.encode().hex() not in stored
    from store import secrets

    keys = [env.settings.secret_key]
    assert secrets.open_sealed(keys, tenant_id, name, stored) == TOKEN
    with pytest.raises(secrets.SecretUnreadable):  # bound to the tenant (associated data)
        secrets.open_sealed(keys, "ten_other", name, stored)
    with pytest.raises(secrets.SecretUnreadable):  # and to the service's key
        secrets.open_sealed(["another-key-" * 4], tenant_id, name, stored)


# --- hf: ----------------------------------------------------------------------------------------


def test_hub_job_is_fetched_pinned_and_queued(env: InProcess, hub: HubStandIn, files, models):
    alice_token = env.clients["alice"].put("/v1/secrets/hf_token", json={"value": TOKEN})
    assert alice_token.status_code == 200
    hub.requests.clear()
    job = post_job(env, "alice", files, "hf:acme/toy-base", "hf:acme/toy-adapter@main")
    assert job["status"] == "queued", job["error"]
    base_commit = hub.repos["acme/toy-base"].commit
    adapter_commit = hub.repos["acme/toy-adapter"].commit
    assert job["base_resolved"] == f"hf:acme/toy-base@{base_commit}"
    assert job["finetuned_resolved"] == f"hf:acme/toy-adapter@{adapter_commit}"
    # the private repository was asked for with alice's token, the public one too (hers)
    private = [auth for _, path, auth in hub.requests if "toy-adapter" in path]
    assert private and all(auth == f"Bearer {TOKEN}" for auth in private)
    cache = env.settings.model_cache / "hf"
    snapshot = cache / "acme--toy-adapter" / "snapshots" / adapter_commit / "toy-adapter"
    assert digests(snapshot) == digests(adapter_naming(models, "acme/toy-base"))
    assert "README.md" not in {p.name for p in snapshot.iterdir()}  # only what is needed


def test_private_repo_needs_the_tenants_token(env: InProcess, hub: HubStandIn, files):
    job = post_job(env, "bob", files, "hf:acme/toy-base", "hf:acme/toy-adapter")
    assert job["status"] == "failed"
    assert job["error"]["code"] == "hub_access_denied"
    assert "PUT /v1/secrets/hf_token" in job["error"]["message"]
    # alice's cached copy of the private commit is not bob's either
    commit = hub.repos["acme/toy-adapter"].commit
    job = post_job(env, "bob", files, "hf:acme/toy-base", f"hf:acme/toy-adapter@{commit}")
    assert job["status"] == "failed" and job["error"]["code"] == "hub_access_denied"


def test_estimate_reads_the_cache_never_the_hub_and_only_what_the_tenant_may(
    env: InProcess, hub: HubStandIn, files
):
    """After alice's job fetched both repositories: her estimate reads the cache without a
    request to the hub; bob's is refused for the private adapter as if it were absent, and a
    repository no validation fetched is not found (the estimate never downloads)."""
    assert env.clients["alice"].put("/v1/secrets/hf_token", json={"value": TOKEN}).is_success
    alice = post_job(env, "alice", files, "hf:acme/toy-base", "hf:acme/toy-adapter")
    assert alice["status"] == "queued", alice["error"]
    hub.requests.clear()

    def estimate(tenant: str, finetuned: str):
        body = {
            "method": "hcnr",
            "base": "hf:acme/toy-base",
            "finetuned": finetuned,
            "honesty_file": files[tenant]["honesty"],
            "task_file": files[tenant]["task"],
        }
        return env.clients[tenant].post("/v1/repair-jobs/estimate", json=body)

    mine = estimate("alice", "hf:acme/toy-adapter")
    assert mine.status_code == 200, mine.text
    assert mine.json()["parameters"] > 0 and mine.json()["adapter_parameters"] > 0
    assert hub.requests == []
    for tenant, reference in (("bob", "hf:acme/toy-adapter"), ("alice", "hf:acme/never-fetched")):
        refused = estimate(tenant, reference)
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["code"] == "reference_not_found"
    assert hub.requests == []


def test_pickle_only_repo_is_refused_before_download(env: InProcess, hub: HubStandIn, files):
    hub.requests.clear()
    job = post_job(env, "alice", files, "hf:acme/pickle-only", "hf:acme/toy-adapter")
    assert job["status"] == "failed" and job["error"]["code"] == "unsafe_checkpoint"
    assert "pytorch_model.bin" in job["error"]["message"]
    assert not [p for _, p, _ in hub.requests if "/resolve/" in p and "pickle-only" in p]
    assert not (env.settings.model_cache / "hf" / "acme--pickle-only" / "snapshots").exists()


def test_unknown_revision_and_repo(env: InProcess, files):
    job = post_job(env, "alice", files, "hf:acme/toy-base@no-such-branch", "hf:acme/toy-adapter")
    assert job["status"] == "failed" and job["error"]["code"] == "revision_not_found"
    job = post_job(env, "alice", files, "hf:acme/absent", "hf:acme/toy-adapter")
    assert job["status"] == "failed" and job["error"]["code"] == "hub_access_denied"


def test_cache_serves_offline_and_the_worker_runs_the_pinned_commit(
    env: InProcess, hub: HubStandIn, files
):
    """Stand-in stopped: the same references validate from the cache (same commits), and
    the GPU worker's run reads the pinned snapshots without any network."""
    port = hub.port
    env.queued.clear()
    hub.stop()
    try:
        job = post_job(env, "alice", files, "hf:acme/toy-base", "hf:acme/toy-adapter@main")
        assert job["status"] == "queued", job["error"]
        assert job["base_resolved"] == f"hf:acme/toy-base@{hub.repos['acme/toy-base'].commit}"
        # never cached: a clear code, not a hang or a stack trace
        job2 = post_job(env, "alice", files, "hf:acme/never-seen", "hf:acme/toy-adapter")
        assert job2["status"] == "failed"
        assert job2["error"]["code"] == "model_source_unavailable"
        env.queued.remove(job2["id"]) if job2["id"] in env.queued else None
        assert env.run_queued() == ["succeeded"]
        finished = env.clients["alice"].get(f"/v1/repair-jobs/{job['id']}").json()
        assert finished["status"] == "succeeded"
    finally:
        hub.port = port
        hub.start()


# --- s3:// ------------------------------------------------------------------------------------


def _upload_dir(s3, directory: Path, prefix: str) -> None:
    for path in sorted(directory.iterdir()):
        if path.is_file():
            s3.client.put_object(
                Bucket=MODELS_BUCKET, Key=f"{prefix}/{path.name}", Body=path.read_bytes()
            )


def test_s3_job_is_fetched_and_refetched_when_the_prefix_changes(env: InProcess, s3, files, models):
    _upload_dir(s3, models.root / "base", "shared/toy-base")
    _upload_dir(s3, adapter_naming(models, "team/toy-base"), "shared/toy-adapter")
    base, adapter = (
        f"s3://{MODELS_BUCKET}/shared/toy-base",
        f"s3://{MODELS_BUCKET}/shared/toy-adapter",
    )
    job = post_job(env, "alice", files, base, adapter)
    assert job["status"] == "queued", job["error"]
    assert job["base_resolved"].startswith(base + "#")
    from store.references import resolve_reference

    local = resolve_reference(
        job["finetuned_resolved"], env.settings.models_dir, env.settings.model_cache
    )
    assert digests(local) == digests(adapter_naming(models, "team/toy-base"))
    # a changed object changes the listing's ETags: a new pin, fetched again
    config = (models.root / "base" / "generation_config.json").read_bytes()
    s3.client.put_object(
        Bucket=MODELS_BUCKET, Key="shared/toy-base/generation_config.json", Body=config + b" "
    )
    again = post_job(env, "alice", files, base, adapter)
    assert again["status"] == "queued", again["error"]
    assert again["base_resolved"] != job["base_resolved"]
    assert again["finetuned_resolved"] == job["finetuned_resolved"]
    local = resolve_reference(
        again["base_resolved"], env.settings.models_dir, env.settings.model_cache
    )
    assert (local / "generation_config.json").read_bytes() == config + b" "


def test_s3_outside_the_allowed_prefixes_is_refused_at_once(env: InProcess, s3, files):
    body = {
        "method": "hcnr",
        "base": f"s3://{MODELS_BUCKET}/private/x",
        "finetuned": "path:finetuned-adapter",
        "honesty_file": files["alice"]["honesty"],
        "task_file": files["alice"]["task"],
    }
    response = env.clients["alice"].post("/v1/repair-jobs", json=body)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_reference"
    body["base"] = f"s3://{MODELS_BUCKET}/shared/toy-base#" + "0" * 32  # pins are ours
    assert env.clients["alice"].post("/v1/repair-jobs", json=body).status_code == 422


# --- the listing's bounds ---------------------------------------------------------------------


def test_listing_limits(tmp_path: Path):
    from hcnr_core.errors import HCNRError
    from store.remote_models import select_files
    from store.settings import Settings

    settings = Settings(env="test", data_dir=tmp_path, max_remote_model_files=3)
    ok = {"config.json": 10, "model.safetensors": 100, "setup.py": 5, "sub/model.safetensors": 1}
    assert select_files(ok, "x", settings) == {"config.json": 10, "model.safetensors": 100}
    many = {"config.json": 1, **{f"m-{i}.safetensors": 1 for i in range(3)}}
    with pytest.raises(HCNRError) as too_many:
        select_files(many, "x", settings)
    assert too_many.value.code == "checkpoint_too_large"
    assert too_many.value.details()["limit"] == "max_remote_model_files"
    big = Settings(env="test", data_dir=tmp_path, max_checkpoint_bytes=50)
    with pytest.raises(HCNRError) as too_big:
        select_files(ok, "x", big)
    assert too_big.value.details() == {"limit": "max_checkpoint_bytes", "value": 110, "allowed": 50}
