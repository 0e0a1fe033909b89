"""`hcnr serve` as users run it: API + worker subprocess, SQLite, kombu SQLAlchemy broker."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import flows
import pytest
import service_procs as procs
from conftest import Models

from hcnr_cli.client import HCNRClient


@dataclass
class Deployment:
    alice: HCNRClient
    bob: HCNRClient
    data_dir: Path


@pytest.fixture(scope="module")
def embedded(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    data_dir = tmp_path_factory.mktemp("embedded")
    env = procs.service_env(env="test", data_dir=data_dir, models_root=models.root)
    keys = {tenant: procs.create_key(env, tenant) for tenant in ("alice", "bob")}
    process, url = procs.start_api(env, data_dir / "serve.log")
    clients = {tenant: HCNRClient(url, key) for tenant, key in keys.items()}
    yield Deployment(clients["alice"], clients["bob"], data_dir)
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
