"""`hcnr serve` as users run it: API + worker subprocess, SQLite, kombu SQLAlchemy broker."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hcnr_client import HCNRClient

from tests.service import flows
from tests.service import service_procs as procs
from tests.service.service_support import Models


@dataclass
class Deployment:
    alice: HCNRClient
    bob: HCNRClient
    data_dir: Path
    url: str
    keys: dict[str, str]


@pytest.fixture(scope="module")
def embedded(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    data_dir = tmp_path_factory.mktemp("embedded")
    env = procs.service_env(env="test", data_dir=data_dir, models_root=models.root)
    keys = {tenant: procs.create_key(env, tenant) for tenant in ("alice", "bob")}
    process, url = procs.start_api(env, data_dir / "serve.log")
    clients = {tenant: HCNRClient(base_url=url, api_key=key) for tenant, key in keys.items()}
    yield Deployment(clients["alice"], clients["bob"], data_dir, url, keys)
    for client in clients.values():
        client.close()
    procs.stop(process)


def test_embedded_flow_matches_direct_repair(
    embedded: Deployment, models: Models, direct_repair: Path, tmp_path: Path
):
    job_id = flows.full_flow(embedded.alice, models, direct_repair, tmp_path / "download")
    flows.other_tenant_flow(embedded.alice, embedded.bob, job_id)


def test_embedded_cancel_running_job(embedded: Deployment, models: Models):
    flows.cancel_flow(embedded.alice, models, embedded.data_dir / "artifacts")


def test_serve_stops_its_worker(models: Models, tmp_path: Path):
    env = procs.service_env(env="test", data_dir=tmp_path, models_root=models.root)
    process, _ = procs.start_api(env, tmp_path / "serve.log")
    procs.stop(process)
    workers = subprocess.run(["pgrep", "-f", "worker.celery_app"], capture_output=True, text=True)
    mine = [pid for pid in workers.stdout.split() if _environ_has(pid, str(tmp_path))]
    assert mine == []


def _environ_has(pid: str, needle: str) -> bool:
    try:
        return needle.encode() in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def test_jobs_cli_over_http(embedded: Deployment, models: Models, direct_repair, tmp_path):
    """`hcnr jobs create --wait`, get, list, events, download, and a clear error code."""
    from tests.service.service_support import digests

    env = {
        **procs.service_env(),
        "HCNR_API_URL": embedded.url,
        "HCNR_API_KEY": embedded.keys["alice"],
    }

    def hcnr(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [procs.HCNR, "jobs", *args], env=env, capture_output=True, text=True, timeout=300
        )

    created = hcnr(
        "create",
        "--method",
        "hcnr",
        "--base",
        "path:base",
        "--finetuned",
        "path:finetuned-adapter",
        "--honesty",
        str(models.honesty),
        "--task",
        str(models.task),
        "--metadata",
        "via=cli",
        "--wait",
    )
    assert created.returncode == 0, created.stderr
    job = json.loads(created.stdout)
    assert job["status"] == "succeeded" and job["metadata"] == {"via": "cli"}
    assert json.loads(hcnr("get", job["id"]).stdout)["id"] == job["id"]
    listed = json.loads(hcnr("list", "--metadata", "via=cli").stdout)
    assert [j["id"] for j in listed["data"]] == [job["id"]]
    events = [json.loads(line) for line in hcnr("events", job["id"]).stdout.splitlines()]
    assert events[-1]["type"] == "succeeded"
    followed = hcnr("events", "--follow", job["id"]).stdout.splitlines()
    assert len(followed) == len(events)
    downloaded = hcnr("download", job["id"], "--out", str(tmp_path / "ckpt"))
    assert downloaded.returncode == 0, downloaded.stderr
    assert digests(tmp_path / "ckpt") == digests(direct_repair)
    assert hcnr("wait", job["id"]).returncode == 0

    bad = hcnr(
        "create",
        "--base",
        "path:../outside",
        "--finetuned",
        "path:finetuned",
        "--honesty",
        str(models.honesty),
        "--task",
        str(models.task),
    )
    assert bad.returncode == 2 and "[invalid_reference]" in bad.stderr
    env["HCNR_API_KEY"] = embedded.keys["bob"]
    other = hcnr("get", job["id"])
    assert other.returncode == 2 and "[not_found]" in other.stderr


@pytest.mark.gpu
def test_embedded_job_on_cuda(models: Models, tmp_path: Path):
    """HCNR_WORKER_DEVICE=cuda: the pool child initialises CUDA and repairs on the GPU."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    env = procs.service_env(
        env="test", data_dir=tmp_path, models_root=models.root, worker_device="cuda"
    )
    key = procs.create_key(env, "gpu")
    process, url = procs.start_api(env, tmp_path / "serve.log")
    try:
        with HCNRClient(base_url=url, api_key=key) as client:
            files = flows.upload_inputs(client, models.honesty, models.task)
            body = {
                "method": "hcnr",
                "base": "path:base",
                "finetuned": "path:finetuned-adapter",
                "honesty_file": files["honesty"],
                "task_file": files["task"],
            }
            job = client.repair_jobs.wait(client.repair_jobs.create(**body).id, timeout=300)
            assert job.status == "succeeded", job.error
            assert client.repair_jobs.retrieve_report(job.id)["config"]["device"] == "cuda"
    finally:
        procs.stop(process)
