"""Artifacts and uploads in S3-compatible object storage (moto's server on loopback):
`hcnr serve` with HCNR_ARTIFACTS_URL=s3://..., as when workers span machines."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hcnr_client import HCNRClient

from tests.service import flows
from tests.service import service_procs as procs
from tests.service.service_support import Models

BUCKET = "hcnr-artifacts"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, object]]:
    pytest.importorskip("moto.server", reason="moto[server] is in the test extra")
    import boto3

    process, endpoint = procs.start_moto(tmp_path_factory.mktemp("moto"))
    client = boto3.client("s3", endpoint_url=endpoint, **_boto_credentials())
    client.create_bucket(Bucket=BUCKET)
    yield endpoint, client
    procs.stop(process)


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": CREDENTIALS["AWS_DEFAULT_REGION"],
    }


def keys_under(client, prefix: str) -> list[str]:
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for item in listing.get("Contents", [])]


@pytest.fixture(scope="module")
def s3_service(s3, models: Models, tmp_path_factory) -> Iterator[HCNRClient]:
    endpoint, _ = s3
    data_dir = tmp_path_factory.mktemp("s3svc")
    env = procs.service_env(
        env="test",
        data_dir=data_dir,
        models_root=models.root,
        artifacts_url=f"s3://{BUCKET}/hcnr",
        s3_endpoint_url=endpoint,
    )
    env.update(CREDENTIALS)
    key = procs.create_key(env, "alice")
    process, url = procs.start_api(env, data_dir / "serve.log")
    with HCNRClient(base_url=url, api_key=key) as client:
        yield client
    procs.stop(process)


def test_flow_with_s3_artifacts(s3, s3_service: HCNRClient, models, direct_repair, tmp_path):
    _, bucket = s3
    job_id = flows.full_flow(s3_service, models, direct_repair, tmp_path / "download")
    stored = keys_under(bucket, f"hcnr/jobs/{job_id}/checkpoint/")
    listed = {a.name for a in s3_service.repair_jobs.list_artifacts(job_id).data}
    assert {key.rsplit("/", 1)[1] for key in stored} == listed
    assert keys_under(bucket, "hcnr/files/")  # uploads live in the bucket too
    config = s3_service.repair_jobs.artifact_content(job_id, "config.json")
    assert (
        s3_service.repair_jobs.artifact_content(job_id, "config.json", byte_range=(5, 20))
        == config[5:21]
    )


def test_cancelled_job_leaves_nothing_in_s3(s3, s3_service: HCNRClient, models: Models):
    _, bucket = s3
    job_id = flows.slow_job(s3_service, models)
    flows.wait_running(s3_service, job_id)
    s3_service.repair_jobs.cancel(job_id)
    assert s3_service.repair_jobs.wait(job_id, timeout=120, poll_interval=0.2).status == "cancelled"
    assert keys_under(bucket, f"hcnr/jobs/{job_id}/") == []


def test_storage_roundtrip(s3, tmp_path: Path):
    """The fsspec storage itself: put, ranged read, delete by prefix."""
    from store.storage import Storage

    endpoint, _ = s3
    storage = Storage(
        f"s3://{BUCKET}/unit",
        {"client_kwargs": {"endpoint_url": endpoint}, "key": "testing", "secret": "testing"},
    )
    source = tmp_path / "blob.bin"
    source.write_bytes(bytes(range(256)) * 10)
    storage.put_file(source, "a/blob.bin")
    assert storage.local_path("a/blob.bin") is None and storage.exists("a/blob.bin")
    with storage.open("a/blob.bin") as handle:
        handle.seek(300)
        assert handle.read(4) == bytes([44, 45, 46, 47])
    storage.delete_prefix("a")
    assert not storage.exists("a/blob.bin")
    with pytest.raises(ValueError):
        storage.local_path("../escape")
