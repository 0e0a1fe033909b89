"""hcnr_client against the real API in this process (TestClient / ASGI transport, SQLite,
the real runner): its models accept what every route returns and mirror the OpenAPI
document, pages walk, errors are typed, downloads resume with Range and check sha256."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import hcnr_client
import httpx
import pytest
from fastapi.testclient import TestClient
from hcnr_client import types

from tests.service.service_support import InProcess, Models, digests

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
OPENAPI = Path(__file__).resolve().parents[2] / "api" / "openapi.json"
BASE_URL = "http://testserver"


def api_key(inproc: InProcess, tenant: str) -> str:
    return inproc.clients[tenant].headers["Authorization"].removeprefix("Bearer ")


class Recorder:
    """An httpx client on the in-process app that keeps every request it sends."""

    def __init__(self, app) -> None:
        self.http = TestClient(app)
        self.requests: list[httpx.Request] = []
        self.http.event_hooks["request"].append(self.requests.append)

    def artifact_gets(self, name: str) -> list[str | None]:
        return [
            r.headers.get("range")
            for r in self.requests
            if r.url.path.endswith(f"/artifacts/{name}")
        ]


@pytest.fixture(scope="module")
def recorder(inproc: InProcess) -> Recorder:
    return Recorder(inproc.app)


@pytest.fixture(scope="module")
def client(inproc: InProcess, recorder: Recorder) -> hcnr_client.HCNRClient:
    return hcnr_client.HCNRClient(
        api_key=api_key(inproc, "alice"), base_url=BASE_URL, http_client=recorder.http
    )


@pytest.fixture(scope="module")
def files(client: hcnr_client.HCNRClient, models: Models) -> dict[str, types.FileObject]:
    return {
        "honesty": client.files.create(file=models.honesty, purpose="honesty"),
        "task": client.files.create(file=models.task.read_bytes(), purpose="task"),
    }


@pytest.fixture(scope="module")
def job_id(client: hcnr_client.HCNRClient, inproc: InProcess, files) -> str:
    """A succeeded job (the runner in this process) and three queued ones after it."""
    job = client.repair_jobs.create(
        method="hcnr",
        base="path:base",
        finetuned="path:finetuned-adapter",
        honesty_file=files["honesty"],
        task_file=files["task"].id,
        metadata={"suite": "sdk", "kind": "done"},
    )
    assert job.status == "validating"  # the answer does not wait for the validation
    assert client.repair_jobs.retrieve(job.id).status == "queued"  # in-process: done already
    assert inproc.run_queued() == ["succeeded"]
    for i in range(3):
        client.repair_jobs.create(
            method="hcnr",
            base="path:base",
            finetuned="path:finetuned-adapter",
            honesty_file=files["honesty"],
            task_file=files["task"],
            metadata={"suite": "sdk", "kind": f"queued-{i}"},
        )
    inproc.queued.clear()  # never run: they stay queued
    return job.id


def test_models_accept_exactly_what_the_api_returns(client, inproc: InProcess, files, job_id):
    """Every object of every JSON route validates, round-trips to the same JSON and carries
    no field the client model does not declare."""
    raw = inproc.clients["alice"]
    pairs = [
        (files["honesty"], raw.get(f"/v1/files/{files['honesty'].id}").json()),
        (
            client.files.retrieve(files["task"].id),
            raw.get(f"/v1/files/{files['task'].id}").json(),
        ),
        (client.repair_jobs.retrieve(job_id), raw.get(f"/v1/repair-jobs/{job_id}").json()),
        (
            client.repair_jobs.list_artifacts(job_id),
            raw.get(f"/v1/repair-jobs/{job_id}/artifacts").json(),
        ),
    ]
    listed = raw.get("/v1/repair-jobs", params={"limit": 100}).json()["data"]
    pairs += list(zip(client.repair_jobs.list(limit=100).data, listed, strict=True))
    events = raw.get(f"/v1/repair-jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    paged = client.repair_jobs.list_events(job_id, limit=1000).data
    pairs += list(zip(paged, events, strict=True))
    for model, body in pairs:
        assert model.model_dump(mode="json") == body or _same(model, body)
        assert not model.model_extra, f"{type(model).__name__} misses {set(model.model_extra)}"
    job = client.repair_jobs.retrieve(job_id)
    assert job.status == "succeeded" and job.finished and job.progress == 1.0
    assert job.error is None and job.attempts == 1
    assert {a.name for a in client.repair_jobs.list_artifacts(job_id).data} >= {"config.json"}
    report = client.repair_jobs.retrieve_report(job_id)
    assert report == raw.get(f"/v1/repair-jobs/{job_id}/report").json()


def _same(model, body: dict) -> bool:
    """Equal up to the datetime spelling (the API's isoformat vs pydantic's)."""
    return type(model).model_validate(body) == model


MIRRORS = {
    "FilePublic": types.FileObject,
    "RepairJobPublic": types.RepairJob,
    "JobError": types.RepairJobError,
    "HubPushPublic": types.HubPush,
    "EventPublic": types.JobEvent,
    "ArtifactPublic": types.Artifact,
    "ArtifactList": types.ArtifactList,
    "FileDeleted": types.FileDeleted,
    "RepairJobDeleted": types.RepairJobDeleted,
    "EstimatePublic": types.RepairJobEstimate,
    "TokenCount": types.TokenCount,
    "MemoryPeak": types.MemoryPeak,
    "WorkerCapacity": types.WorkerCapacity,
    "SecretPublic": types.Secret,
    "SecretList": types.SecretList,
    "SecretDeleted": types.SecretDeleted,
}


@pytest.mark.parametrize("schema", sorted(MIRRORS))
def test_models_mirror_the_openapi_document(schema: str, inproc: InProcess):
    """Same fields as the schema in the published document (api/openapi.json) and in the
    app's own, and never stricter: a field the API may omit is optional in the client."""
    published = json.loads(OPENAPI.read_text())["components"]["schemas"][schema]
    live = inproc.clients["alice"].get("/openapi.json").json()["components"]["schemas"][schema]
    assert published == live
    spec = published
    model = MIRRORS[schema]
    assert set(model.model_fields) == set(spec["properties"])
    required = {name for name, field in model.model_fields.items() if field.is_required()}
    assert required <= set(spec.get("required", []))


def test_pages_walk_every_job_and_event(client, recorder: Recorder, inproc: InProcess, job_id):
    raw = inproc.clients["alice"]
    every = [j["id"] for j in raw.get("/v1/repair-jobs", params={"limit": 100}).json()["data"]]
    assert len(every) == 4
    page = client.repair_jobs.list(limit=3)
    assert len(page.data) == 3 and page.has_more and page.has_next_page()
    assert [j.id for j in page] == every  # iteration fetches the next page
    assert [len(p.data) for p in page.iter_pages()] == [3, 1]
    second = page.get_next_page()
    assert [j.id for j in second.data] == every[3:] and not second.has_next_page()
    assert [j.id for j in client.repair_jobs.list(after=page.next_cursor)] == every[3:]
    queued = client.repair_jobs.list(status="queued", metadata={"suite": "sdk"}, limit=1)
    assert [j.metadata["kind"] for j in queued] == ["queued-2", "queued-1", "queued-0"]
    assert list(client.repair_jobs.list(metadata={"kind": "done"})) == [
        client.repair_jobs.retrieve(job_id)
    ]

    events = raw.get(f"/v1/repair-jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    assert len(events) > 4
    before = len(recorder.requests)
    walked = list(client.repair_jobs.list_events(job_id, limit=2))
    assert [e.id for e in walked] == [e["id"] for e in events]
    assert len(recorder.requests) - before == (len(events) + 1) // 2
    later = list(client.repair_jobs.list_events(job_id, after=events[1]["id"]))
    assert [e.id for e in later] == [e["id"] for e in events[2:]]


def test_stream_events_and_wait(client, job_id):
    paged = list(client.repair_jobs.list_events(job_id))
    streamed = list(client.repair_jobs.stream_events(job_id))
    assert streamed == paged and streamed[-1].type == "succeeded"
    assert list(client.repair_jobs.stream_events(job_id, after=paged[-2].id)) == paged[-1:]
    assert client.repair_jobs.wait(job_id, timeout=5).status == "succeeded"
    queued = next(iter(client.repair_jobs.list(status="queued")))
    with pytest.raises(hcnr_client.WaitTimeoutError):
        client.repair_jobs.wait(queued.id, timeout=0.3, poll_interval=0.1)


def test_errors_are_typed_with_code_message_and_param(
    client, inproc: InProcess, recorder: Recorder, files, job_id
):
    bob = client.with_options(api_key=api_key(inproc, "bob"))
    for call in (
        bob.repair_jobs.retrieve,
        bob.repair_jobs.cancel,
        bob.repair_jobs.list_artifacts,
        bob.repair_jobs.list_events,
    ):
        with pytest.raises(hcnr_client.NotFoundError) as excinfo:
            call(job_id)
        assert excinfo.value.code == "not_found" and excinfo.value.status_code == 404
    with pytest.raises(hcnr_client.NotFoundError):
        bob.files.retrieve(files["honesty"].id)
    with pytest.raises(hcnr_client.AuthenticationError) as excinfo:
        client.with_options(api_key="hcnr_wrong").repair_jobs.list()
    assert excinfo.value.code == "unauthorized"

    with pytest.raises(hcnr_client.UnprocessableEntityError) as excinfo:
        client.repair_jobs.create(
            method="hcnr",
            base="path:base",
            finetuned="path:finetuned-adapter",
            honesty_file=files["honesty"],
            task_file=files["task"],
            webhook_url="not a url",
        )
    assert excinfo.value.code == "invalid_request" and excinfo.value.param == "webhook_url"
    with pytest.raises(hcnr_client.UnprocessableEntityError) as excinfo:
        client.files.create(file=("bad.jsonl", b'{"prompt": "x"\n'), purpose="honesty")
    assert excinfo.value.code == "invalid_data" and excinfo.value.details["problems"]

    queued = next(iter(client.repair_jobs.list(status="queued")))
    before = len(recorder.requests)
    with pytest.raises(hcnr_client.ConflictError) as excinfo:
        client.repair_jobs.list_artifacts(queued.id)
    assert excinfo.value.code == "artifacts_not_ready"
    assert len(recorder.requests) - before == 1  # a final conflict is not retried
    with pytest.raises(hcnr_client.ConflictError) as excinfo:
        client.repair_jobs.cancel(job_id)
    assert excinfo.value.code == "job_not_cancellable"


def test_download_resumes_with_range_and_checks_sha256(
    client, recorder: Recorder, job_id, tmp_path: Path, direct_repair: Path
):
    listed = {a.name: a for a in client.repair_jobs.list_artifacts(job_id).data}
    fresh = client.repair_jobs.download(job_id, tmp_path / "fresh")
    assert digests(fresh) == digests(direct_repair)
    assert {p.name: types_sha(p) for p in fresh.iterdir()} == {
        n: a.sha256 for n, a in listed.items()
    }
    largest = max(listed.values(), key=lambda a: a.bytes)
    content = (fresh / largest.name).read_bytes()
    half = len(content) // 2

    # A download that stopped half-way: only the missing half is fetched.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / f"{largest.name}.part").write_bytes(content[:half])
    before = len(recorder.requests)
    client.repair_jobs.download(job_id, resumed)
    assert (resumed / largest.name).read_bytes() == content
    assert recorder.artifact_gets(largest.name)[-1] == f"bytes={half}-"
    assert not list(resumed.glob("*.part"))

    # A stale partial file: the sha256 check catches it and the file is fetched whole.
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / f"{largest.name}.part").write_bytes(b"\0" * half)
    mark = len(recorder.artifact_gets(largest.name))
    client.repair_jobs.download(job_id, stale)
    assert (stale / largest.name).read_bytes() == content
    assert recorder.artifact_gets(largest.name)[mark:] == [f"bytes={half}-", None]

    # Everything already there: nothing is fetched again.
    mark = len(recorder.requests)
    client.repair_jobs.download(job_id, fresh)
    assert [r.url.path for r in recorder.requests[mark:]] == [f"/v1/repair-jobs/{job_id}/artifacts"]
    assert len(recorder.requests) > before
    part = client.repair_jobs.artifact_content(job_id, largest.name, byte_range=(5, 20))
    assert part == content[5:21]


def types_sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_corrupted_artifact_fails_the_sha256_check(
    client, inproc: InProcess, job_id, tmp_path: Path
):
    """The stored file changed after its sha256 was listed (same size): the download raises
    ChecksumMismatchError and leaves neither the file nor a partial one."""
    stored = next(
        p for p in Path(inproc.settings.data_dir).rglob("config.json") if job_id in str(p)
    )
    original = stored.read_bytes()
    stored.write_bytes(original.replace(b"{", b"[", 1))
    try:
        with pytest.raises(hcnr_client.ChecksumMismatchError) as excinfo:
            client.repair_jobs.download(job_id, tmp_path / "out")
    finally:
        stored.write_bytes(original)
    assert excinfo.value.name == "config.json"
    assert not (tmp_path / "out" / "config.json").exists()
    assert not list((tmp_path / "out").glob("*.part"))


def test_async_client_against_the_app(inproc: InProcess, client, job_id, files, tmp_path):
    sync_jobs = [j.id for j in client.repair_jobs.list()]
    sync_events = list(client.repair_jobs.list_events(job_id))

    async def main() -> None:
        transport = httpx.ASGITransport(app=inproc.app)
        async with httpx.AsyncClient(transport=transport) as http:
            aclient = hcnr_client.AsyncHCNRClient(
                api_key=api_key(inproc, "alice"), base_url=BASE_URL, http_client=http
            )
            assert (await aclient.files.retrieve(files["task"].id)) == files["task"]
            assert (await aclient.repair_jobs.retrieve(job_id)).status == "succeeded"
            page = await aclient.repair_jobs.list(limit=3)
            assert len(page.data) == 3 and page.has_next_page()
            assert [j.id async for j in aclient.repair_jobs.list(limit=3)] == sync_jobs
            events = [e async for e in aclient.repair_jobs.list_events(job_id, limit=2)]
            assert events == sync_events
            assert [e async for e in aclient.repair_jobs.stream_events(job_id)] == sync_events
            assert (await aclient.repair_jobs.wait(job_id)).status == "succeeded"
            out = await aclient.repair_jobs.download(job_id, tmp_path / "async")
            assert digests(out) == digests(client.repair_jobs.download(job_id, tmp_path / "sync"))
            bob = aclient.with_options(api_key=api_key(inproc, "bob"))
            with pytest.raises(hcnr_client.NotFoundError):
                await bob.repair_jobs.retrieve(job_id)
            with pytest.raises(hcnr_client.ConflictError):
                await aclient.repair_jobs.cancel(job_id)

    asyncio.run(main())


def test_files_list_and_delete(client, inproc: InProcess, models: Models):
    """files.list walks every page (after=last_id); delete removes a file, refused with a
    ConflictError (not retried) while an unfinished job reads it; async the same."""
    mine = [client.files.create(file=models.task, purpose="task").id for _ in range(3)]
    listed = [f.id for f in client.files.list(limit=2, purpose="task")]
    assert [i for i in listed if i in mine] == mine[::-1]
    assert all(f.purpose == "task" for f in client.files.list(purpose="task", limit=100).data)
    honesty = client.files.create(file=models.honesty, purpose="honesty").id
    job = client.repair_jobs.create(
        method="hcnr", base="path:base", finetuned="path:finetuned-adapter", honesty_file=honesty,
        task_file=mine[0],
    )  # fmt: skip
    inproc.queued.clear()  # validated and queued: never run here
    with pytest.raises(hcnr_client.ConflictError) as conflict:
        client.files.delete(honesty)
    assert conflict.value.code == "file_in_use"
    client.repair_jobs.cancel(job.id)
    assert client.files.delete(honesty) == types.FileDeleted(id=honesty, deleted=True)
    assert client.repair_jobs.delete(job.id) == types.RepairJobDeleted(id=job.id, deleted=True)
    with pytest.raises(hcnr_client.NotFoundError):
        client.repair_jobs.retrieve(job.id)
    with pytest.raises(hcnr_client.NotFoundError):
        client.files.retrieve(honesty)

    async def main() -> None:
        transport = httpx.ASGITransport(app=inproc.app)
        async with httpx.AsyncClient(transport=transport) as http:
            aclient = hcnr_client.AsyncHCNRClient(
                api_key=api_key(inproc, "alice"), base_url=BASE_URL, http_client=http
            )
            listed = [f.id async for f in aclient.files.list(limit=2, purpose="task")]
            assert [i for i in listed if i in mine] == mine[::-1]
            assert (await aclient.files.delete(mine[1])).deleted
            with pytest.raises(hcnr_client.NotFoundError):
                await aclient.files.retrieve(mine[1])

    asyncio.run(main())


def test_secrets_sync_and_async(inproc: InProcess, client):
    """client.secrets: set, retrieve, list, delete; the value never comes back."""
    secret = client.secrets.set("hf_token", "hf_sdk_value_123")
    assert secret.name == "hf_token" and "hf_sdk_value_123" not in secret.model_dump_json()
    assert [s.name for s in client.secrets.list().data] == ["hf_token"]
    assert client.secrets.retrieve("hf_token").created_at == secret.created_at

    async def main() -> None:
        transport = httpx.ASGITransport(app=inproc.app)
        async with httpx.AsyncClient(transport=transport) as http:
            aclient = hcnr_client.AsyncHCNRClient(
                api_key=api_key(inproc, "alice"), base_url=BASE_URL, http_client=http
            )
            assert (await aclient.secrets.retrieve("hf_token")).name == "hf_token"
            assert (await aclient.secrets.delete("hf_token")).deleted
            with pytest.raises(hcnr_client.NotFoundError):
                await aclient.secrets.retrieve("hf_token")
            assert (await aclient.secrets.set("hf_token", "x")).name == "hf_token"
            assert [s.name for s in (await aclient.secrets.list()).data] == ["hf_token"]

    asyncio.run(main())
    assert client.secrets.delete("hf_token").deleted
    with pytest.raises(hcnr_client.NotFoundError):
        client.secrets.retrieve("hf_token")
