"""The API in-process (TestClient, SQLite, the real runner): validation, auth, tenancy,
idempotency, pagination, artifacts with Range and tar, cancel, metrics, OpenAPI."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.service_support import (
    InProcess,
    Models,
    digests,
    job_body,
    make_inprocess,
    outcome,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def alice_files(inproc: InProcess, models: Models) -> dict[str, str]:
    return {
        purpose: inproc.upload("alice", path, purpose).json()["id"]
        for purpose, path in (("honesty", models.honesty), ("task", models.task))
    }


@pytest.fixture(scope="module")
def finished_job(inproc: InProcess, alice_files: dict[str, str]) -> str:
    response = inproc.clients["alice"].post("/v1/repair-jobs", json=job_body(alice_files))
    assert response.status_code == 201, response.text
    assert inproc.run_queued() == ["succeeded"]
    return response.json()["id"]


def error_code(response) -> str:
    return response.json()["error"]["code"]


# --- files -----------------------------------------------------------------------------


def test_upload_is_validated_with_line_numbers(inproc: InProcess, tmp_path: Path, models):
    bad = tmp_path / "bad.jsonl"
    lines = models.honesty.read_text().splitlines()
    lines[2] = '{"prompt": "x"'
    lines[4] = json.dumps({"prompt": "q", "response": ""})
    bad.write_text("\n".join(lines) + "\n")
    response = inproc.upload("alice", bad, "honesty")
    assert response.status_code == 422
    assert error_code(response) == "invalid_data"
    problems = response.json()["error"]["details"]["problems"]
    assert [p["line"] for p in problems] == [3, 5]
    assert "empty response" in problems[1]["message"]


def test_upload_needs_enough_samples(inproc: InProcess, tmp_path: Path, models):
    few = tmp_path / "few.jsonl"
    few.write_text("\n".join(models.task.read_text().splitlines()[:3]) + "\n")
    response = inproc.upload("alice", few, "task")
    assert response.status_code == 422 and error_code(response) == "invalid_data"
    assert "at least 8" in response.json()["error"]["details"]["problems"][0]["message"]


def test_upload_over_max_samples_is_too_many_samples(models, tmp_path: Path):
    """The upload's count check gives the code and details of hcnr_core.limits (the CLI
    and the job validation say too_many_samples for the same file); max_samples is fine."""
    rows = models.honesty.read_text().splitlines()
    small = make_inprocess(tmp_path, models, max_samples=len(rows))
    assert small.upload("alice", models.honesty, "honesty").status_code == 201
    over = tmp_path / "over.jsonl"
    over.write_text("\n".join([*rows, rows[0]]) + "\n")
    stored = sorted((tmp_path / "data").rglob("*.jsonl"))
    response = small.upload("alice", over, "honesty")
    assert response.status_code == 422 and error_code(response) == "too_many_samples"
    details = response.json()["error"]["details"]
    assert details == {"limit": "max_samples", "value": len(rows) + 1, "allowed": len(rows)}
    assert sorted((tmp_path / "data").rglob("*.jsonl")) == stored


def test_oversized_upload_is_413_and_nothing_stored(models, tmp_path: Path):
    small = make_inprocess(tmp_path, models, max_upload_bytes=1024)
    response = small.upload("alice", models.honesty, "honesty")  # 2.5 kB > 1 kB
    assert response.status_code == 413 and error_code(response) == "payload_too_large"
    assert not list((tmp_path / "data" / "artifacts").rglob("*.jsonl"))


def test_oversized_chunked_upload_is_413(models, tmp_path: Path):
    small = make_inprocess(tmp_path, models, max_upload_bytes=1024)
    body = b"x" * (200 * 1024)
    response = small.clients["alice"].post(
        "/v1/files",
        content=iter([body[:100_000], body[100_000:]]),
        headers={"Content-Type": "multipart/form-data; boundary=zzz"},
    )
    assert response.status_code == 413


# --- job validation: nothing is queued on bad input -------------------------------------


@pytest.fixture
def escape_link(models) -> Iterator[Path]:
    """A symlink out of the models root, for this test only: the session's root is shared."""
    escape = models.root / "escape"
    escape.symlink_to(models.root.parent)
    yield escape
    escape.unlink()


@pytest.mark.parametrize(
    ("overrides", "status", "code"),
    [
        ({"base": "path:../../../etc"}, 422, "invalid_reference"),
        ({"base": "path:/etc"}, 422, "invalid_reference"),
        ({"finetuned": "path:escape"}, 422, "invalid_reference"),  # symlink out of the root
        ({"base": "path:nope"}, 422, "reference_not_found"),
        ({"base": "s3://bucket/model"}, 422, "invalid_reference"),
        # Read from the checkpoints: refused by the validation task (the job fails).
        ({"finetuned": "path:other/finetuned"}, "failed", "incompatible_checkpoints"),
        ({"finetuned": "path:other/finetuned-adapter"}, "failed", "incompatible_checkpoints"),
        ({"honesty_file": "file_missing"}, 404, "not_found"),
        ({"hyperparameters": {"r_iw": 2}}, 422, "invalid_request"),
        ({"hyperparameters": {"target_modules": "("}}, 422, "invalid_hyperparameters"),
        ({"hyperparameters": {"device": "cuda"}}, 422, "invalid_request"),
    ],
)
def test_bad_job_input_is_rejected_and_not_queued(
    inproc: InProcess, alice_files, escape_link, overrides, status, code
):
    client = inproc.clients["alice"]
    before = client.get("/v1/repair-jobs").json()["data"]
    response = client.post("/v1/repair-jobs", json=job_body(alice_files, **overrides))
    assert outcome(client, response) == (status, code), response.text
    assert inproc.queued == []  # never sent to a GPU worker
    after = client.get("/v1/repair-jobs").json()["data"]
    if status == "failed":  # recorded, failed with the code the check gave
        assert [j["id"] for j in after[1:]] == [j["id"] for j in before]
        assert after[0]["error"]["code"] == code
    else:  # refused at once: nothing recorded
        assert after == before


def test_file_of_wrong_purpose_is_rejected(inproc: InProcess, alice_files):
    body = job_body(alice_files, honesty_file=alice_files["task"])
    response = inproc.clients["alice"].post("/v1/repair-jobs", json=body)
    assert response.status_code == 422 and error_code(response) == "invalid_file_purpose"


# --- auth and tenancy ---------------------------------------------------------------------


def test_requests_need_a_valid_key(inproc: InProcess):
    from fastapi.testclient import TestClient

    anonymous = TestClient(inproc.app)
    assert error_code(anonymous.get("/v1/repair-jobs")) == "unauthorized"
    forged = TestClient(inproc.app, headers={"Authorization": "Bearer hcnr_0000_nope"})
    assert forged.get("/v1/repair-jobs").status_code == 401


def _revoke(env: InProcess, tenant: str) -> None:
    from store import repositories
    from store.db import session_scope

    with session_scope(env.app.state.session_factory) as session:
        for key in repositories.list_api_keys(session):
            if key.tenant.name == tenant:
                assert repositories.revoke_api_key(session, key.id)


def test_revoked_key_stops_working(models, tmp_path: Path):
    env = make_inprocess(tmp_path, models, auth_cache_seconds=0)  # no key cache: at once
    assert env.clients["alice"].get("/v1/repair-jobs").status_code == 200
    _revoke(env, "alice")
    assert env.clients["alice"].get("/v1/repair-jobs").status_code == 401


def test_revoked_key_stops_working_within_the_key_cache_window(models, tmp_path: Path):
    """A verified key is remembered for auth_cache_seconds (api/key_cache.py): revoked,
    it keeps working that long at most, then never again; a wrong secret under the same
    lookup is never answered from the cache."""
    env = make_inprocess(tmp_path, models)  # the default window
    window = env.settings.auth_cache_seconds
    assert 0 < window <= 5
    now = [1000.0]
    cache = env.app.state.key_cache
    cache.clock = lambda: now[0]
    alice = env.clients["alice"]
    assert alice.get("/v1/repair-jobs").status_code == 200  # verified: remembered at 1000
    token = alice.headers["Authorization"].removeprefix("Bearer ")
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    wrong = alice.get("/v1/repair-jobs", headers={"Authorization": f"Bearer {forged}"})
    assert wrong.status_code == 401
    _revoke(env, "alice")
    now[0] += window - 0.01
    assert alice.get("/v1/repair-jobs").status_code == 200  # inside the window: cached
    now[0] += 0.01
    assert alice.get("/v1/repair-jobs").status_code == 401  # the window is over
    now[0] += 3600
    assert alice.get("/v1/repair-jobs").status_code == 401  # a failure is not remembered
    assert len(cache) == 0
    assert env.clients["bob"].get("/v1/repair-jobs").status_code == 200


def test_key_cache_keeps_digests_only_and_stays_bounded():
    from api.key_cache import KeyCache

    tenant = object()
    cache = KeyCache(5.0, max_entries=3)
    tokens = [f"hcnr_lookup{i}_secret{i}" for i in range(5)]
    for token in tokens:
        cache.put(token, tenant)
    assert len(cache) == 3
    assert [cache.get(t) for t in tokens] == [None, None, tenant, tenant, tenant]
    assert not any(t.encode() in key or t in repr(key) for t in tokens for key in cache._entries)
    off = KeyCache(0)
    off.put(tokens[0], tenant)
    assert off.get(tokens[0]) is None and len(off) == 0


def tenant_routes(job_id: str, file_id: str) -> list[tuple[str, str]]:
    return [
        ("GET", f"/v1/files/{file_id}"),
        ("GET", f"/v1/repair-jobs/{job_id}"),
        ("POST", f"/v1/repair-jobs/{job_id}/cancel"),
        ("GET", f"/v1/repair-jobs/{job_id}/events"),
        ("GET", f"/v1/repair-jobs/{job_id}/events/stream"),
        ("GET", f"/v1/repair-jobs/{job_id}/artifacts"),
        ("GET", f"/v1/repair-jobs/{job_id}/artifacts/config.json"),
        ("GET", f"/v1/repair-jobs/{job_id}/checkpoint.tar"),
        ("GET", f"/v1/repair-jobs/{job_id}/report"),
        ("GET", "/v1/secrets/hf_token"),
        # last: alice's own call (the positive control) removes what they name
        ("DELETE", f"/v1/files/{file_id}"),
        ("DELETE", f"/v1/repair-jobs/{job_id}"),
        ("DELETE", "/v1/secrets/hf_token"),
    ]


# PUT /v1/secrets/{name} sets the caller's own secret of that name: there is no other
# tenant's object to reach (test_remote_models checks bob's PUT leaves alice's alone).
UPSERT_ROUTES = {("PUT", "/v1/secrets/{name}")}


def test_other_tenant_gets_404_on_every_route(inproc: InProcess, alice_files, models):
    # A job and a file of this test's own: the DELETE routes remove them at the end.
    own_file = inproc.upload("alice", models.task, "task").json()["id"]
    files = {**alice_files, "task": own_file}
    own_job = inproc.clients["alice"].post("/v1/repair-jobs", json=job_body(files)).json()["id"]
    assert inproc.run_queued() == ["succeeded"]
    assert inproc.clients["alice"].put("/v1/secrets/hf_token", json={"value": "hf_x"}).is_success
    routes = tenant_routes(own_job, own_file)
    for method, url in routes:  # bob first, while alice's object exists; then alice
        response = inproc.clients["bob"].request(method, url)
        assert response.status_code == 404, url
        assert error_code(response) == "not_found"
        assert inproc.clients["alice"].request(method, url).status_code in (200, 409), url
    body = job_body(alice_files)  # bob cannot use alice's files either
    assert inproc.clients["bob"].post("/v1/repair-jobs", json=body).status_code == 404
    assert inproc.clients["bob"].post("/v1/repair-jobs/estimate", json=body).status_code == 404
    assert inproc.clients["bob"].get("/v1/repair-jobs").json()["data"] == []


def test_every_route_with_an_id_is_covered_by_the_tenancy_test(inproc: InProcess):
    """A new route with an id must be added to `tenant_routes` (and so be 404-tested)."""
    tested = {
        (m, u.replace("job_x", "{job_id}").replace("file_x", "{file_id}"))
        for m, u in tenant_routes("job_x", "file_x")
    }
    tested = {(m, u.replace("config.json", "{name}")) for m, u in tested}
    tested = {(m, u.replace("hf_token", "{name}")) for m, u in tested} | UPSERT_ROUTES
    spec = inproc.clients["alice"].get("/openapi.json").json()
    for path, operations in spec["paths"].items():
        if "{" in path:
            for method in operations:
                assert (method.upper(), path) in tested, (method, path)


# --- the job and its artifacts ------------------------------------------------------------------


def test_job_result_matches_a_direct_repair(inproc: InProcess, finished_job, direct_repair):
    client = inproc.clients["alice"]
    job = client.get(f"/v1/repair-jobs/{finished_job}").json()
    assert job["status"] == "succeeded" and job["progress"] == 1.0 and job["error"] is None
    assert set(job["stage_seconds"]) >= {"fisher_task", "fisher_honesty", "save"}
    events = client.get(f"/v1/repair-jobs/{finished_job}/events").json()["data"]
    types = [e["type"] for e in events]
    assert types[:3] == ["created", "queued", "running"] and types[-1] == "succeeded"
    listed = {
        a["name"]: a for a in client.get(f"/v1/repair-jobs/{finished_job}/artifacts").json()["data"]
    }
    tar_bytes = client.get(f"/v1/repair-jobs/{finished_job}/checkpoint.tar").content
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as archive:
        names = {Path(m.name).name: archive.extractfile(m).read() for m in archive.getmembers()}
    assert set(names) == set(listed)
    import hashlib

    for name, data in names.items():
        assert hashlib.sha256(data).hexdigest() == listed[name]["sha256"]
        assert len(data) == listed[name]["bytes"]
    expected = digests(direct_repair)
    got = {n: hashlib.sha256(d).hexdigest() for n, d in names.items() if n in expected}
    assert got == expected  # weights, config, tokenizer: bit for bit


def test_job_output_is_byte_identical_to_hcnr_repair(
    inproc: InProcess, finished_job, models, tmp_path
):
    """What a user gets from `hcnr repair` on the same inputs and what the service's job
    gives are the same bytes: every weight shard, the index, config and tokenizer files
    (the report and model card carry timings and paths; their repair content is compared)."""
    from typer.testing import CliRunner

    from hcnr_cli.main import app
    from tests.toy_cli import repair_argv

    toy = {
        "base": models.root / "base",
        "adapter": models.root / "finetuned-adapter",
        "honesty": models.honesty,
        "task": models.task,
    }
    result = CliRunner().invoke(app, repair_argv(toy, tmp_path / "cli"))
    assert result.exit_code == 0, result.output
    client = inproc.clients["alice"]
    tar_bytes = client.get(f"/v1/repair-jobs/{finished_job}/checkpoint.tar").content
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as archive:
        served = {Path(m.name).name: archive.extractfile(m).read() for m in archive.getmembers()}
    cli = {p.name: p.read_bytes() for p in (tmp_path / "cli").iterdir()}
    assert set(cli) == set(served)
    varying = {"hcnr_report.json", "README.md"}
    assert any(name.endswith(".safetensors") for name in cli)
    for name in set(cli) - varying:
        assert cli[name] == served[name], name
    reports = [json.loads(files["hcnr_report.json"]) for files in (cli, served)]
    for key in ("selected_matrices", "config", "n_selected_matrices"):
        assert reports[0][key] == reports[1][key], key


def test_range_requests(inproc: InProcess, finished_job):
    client = inproc.clients["alice"]
    url = f"/v1/repair-jobs/{finished_job}/artifacts/model-00001-of-00001.safetensors"
    full = client.get(url)
    assert full.status_code == 200 and full.headers["accept-ranges"] == "bytes"
    part = client.get(url, headers={"Range": "bytes=10-99"})
    assert part.status_code == 206 and part.content == full.content[10:100]
    assert part.headers["content-range"] == f"bytes 10-99/{len(full.content)}"
    tail = client.get(url, headers={"Range": "bytes=-16"})
    assert tail.content == full.content[-16:]
    assert client.get(url, headers={"Range": f"bytes={len(full.content)}-"}).status_code == 416
    assert client.get(f"/v1/repair-jobs/{finished_job}/artifacts/..%2F..%2Fx").status_code == 404


def test_report_endpoint(inproc: InProcess, finished_job):
    report = inproc.clients["alice"].get(f"/v1/repair-jobs/{finished_job}/report").json()
    assert report["n_selected_matrices"] > 0 and "files" in report


def test_validation_message_is_sent_after_the_response(inproc: InProcess, alice_files):
    """POST /v1/repair-jobs answers before it talks to the broker: the validation message
    goes out once the response has been sent (the job row, committed first, is what the
    reconciler re-sends from if that message is lost)."""
    from fastapi.testclient import TestClient

    order: list[str] = []

    async def recording(scope, receive, send):
        async def send_and_record(message):
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                order.append("response sent")

        await inproc.app(scope, receive, send_and_record)

    state, validate = inproc.app.state, inproc.app.state.validate
    state.validate = lambda job_id: (order.append(f"validate {job_id}"), validate(job_id))
    try:
        client = TestClient(recording, headers=dict(inproc.clients["alice"].headers))
        response = client.post("/v1/repair-jobs", json=job_body(alice_files))
    finally:
        state.validate = validate
    assert response.status_code == 201, response.text
    assert order == ["response sent", f"validate {response.json()['id']}"]
    assert outcome(inproc.clients["alice"], response) == ("queued", None)


def test_idempotency_key(inproc: InProcess, alice_files):
    client = inproc.clients["alice"]
    headers = {"Idempotency-Key": "same-request"}
    first = client.post("/v1/repair-jobs", json=job_body(alice_files), headers=headers)
    again = client.post("/v1/repair-jobs", json=job_body(alice_files), headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]
    assert inproc.queued == [first.json()["id"]]
    changed = job_body(alice_files, metadata={"x": "1"})
    conflict = client.post("/v1/repair-jobs", json=changed, headers=headers)
    assert conflict.status_code == 409 and error_code(conflict) == "idempotency_conflict"
    cancelled = client.post(f"/v1/repair-jobs/{first.json()['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"  # queued -> cancelled at once
    assert inproc.run_queued() == ["cancelled"]  # the worker will not run it


def test_cancel_finished_job_is_409(inproc: InProcess, finished_job):
    response = inproc.clients["alice"].post(f"/v1/repair-jobs/{finished_job}/cancel")
    assert response.status_code == 409 and error_code(response) == "job_not_cancellable"


def test_list_pagination_and_filters(inproc: InProcess, alice_files):
    client = inproc.clients["alice"]
    ids = []
    for i in range(3):
        body = job_body(alice_files, metadata={"batch": "paged", "i": str(i)})
        ids.append(client.post("/v1/repair-jobs", json=body).json()["id"])
    seen, cursor = [], None
    while True:
        params = {"limit": 2, "metadata": "batch=paged"} | ({"cursor": cursor} if cursor else {})
        page = client.get("/v1/repair-jobs", params=params).json()
        seen += [job["id"] for job in page["data"]]
        if not page["has_more"]:
            break
        cursor = page["next_cursor"]
    assert seen == ids[::-1]
    only = client.get("/v1/repair-jobs", params=[("metadata", "batch=paged"), ("metadata", "i=1")])
    assert [j["id"] for j in only.json()["data"]] == [ids[1]]
    queued = client.get("/v1/repair-jobs", params={"status": "queued"}).json()["data"]
    assert set(ids) <= {j["id"] for j in queued}
    for job_id in ids:
        client.post(f"/v1/repair-jobs/{job_id}/cancel")
    inproc.run_queued()


def test_health_metrics_openapi(inproc: InProcess):
    client = inproc.clients["alice"]
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/readyz").json()["checks"]["database"] == "ok"
    metrics = client.get("/metrics").text
    assert 'hcnr_jobs{status="succeeded"}' in metrics and "hcnr_http_requests_total" in metrics
    spec = client.get("/openapi.json").json()
    assert {"/v1/files", "/v1/repair-jobs", "/v1/repair-jobs/{job_id}/checkpoint.tar"} <= set(
        spec["paths"]
    )
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    assert {"RepairJobCreate", "RepairJobPublic", "ErrorResponse"} <= set(
        spec["components"]["schemas"]
    )


def test_production_settings_refuse_unsafe_defaults(tmp_path: Path):
    from pydantic import ValidationError

    from store.settings import Settings

    with pytest.raises(ValidationError, match="SQLite"):
        Settings(env="production", data_dir=tmp_path)
    with pytest.raises(ValidationError, match="MODELS_ROOT"):
        Settings(
            env="production",
            database_url="postgresql+psycopg://x/y",
            models_root="/",
            secret_key="s" * 40,
            broker_url="redis://r",
        )
    ok = Settings(
        env="production",
        database_url="postgresql+psycopg://x/y",
        models_root=tmp_path,
        secret_key=os.urandom(24).hex(),
        broker_url="redis://r",
    )
    assert ok.env == "production"


@pytest.mark.parametrize(
    ("device", "valid"),
    [("cuda", True), ("cuda:0, cuda:1", True), ("gpu0", False), ("cuda:1,cuda:1", False)],
)
def test_worker_device_is_validated_at_startup(tmp_path: Path, device: str, valid: bool):
    from pydantic import ValidationError

    from store.settings import Settings

    if valid:
        assert Settings(data_dir=tmp_path, worker_device=device).worker_device == device.replace(
            " ", ""
        )
    else:
        with pytest.raises(ValidationError, match="worker_device"):
            Settings(data_dir=tmp_path, worker_device=device)


def _hand_refusal_f1(refused: list[bool], answerable: list[bool]) -> float:
    """Refusal F1, unanswerable the positive class, written out independently."""
    tp = sum(1 for r, a in zip(refused, answerable, strict=True) if r and not a)
    fp = sum(1 for r, a in zip(refused, answerable, strict=True) if r and a)
    fn = sum(1 for r, a in zip(refused, answerable, strict=True) if not r and not a)
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def test_eval_set_gives_before_after_metrics(inproc: InProcess, alice_files, tmp_path: Path):
    """The job's metrics equal values computed by hand from what each model says: the
    three models are loaded again (base, adapter on base, the job's checkpoint), made to
    answer the eval prompts, and F1, accuracies and recovery are worked out here."""
    from hcnr_core.evaluation import GenerationSettings, RefusalDetector, generate, load_for_eval

    rows = [
        {
            "prompt": "where was alice born ?",
            "response": "paris .",
            "answerable": True,
            "answers": ["paris"],
        },
        {"prompt": "where was zed born ?", "response": "i do not know .", "answerable": False},
        # The seed-0 toy's fine-tune happens to refuse this one (and its base does not), so
        # the F1s differ and recovery is a number, not None.
        {"prompt": "who is heidi city ?", "response": "i do not know .", "answerable": False},
        {
            "prompt": "where was bob born ?",
            "response": "rome .",
            "answerable": True,
            "answers": ["rome", "no"],
        },
    ]
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    eval_id = inproc.upload("alice", eval_path, "eval").json()["id"]
    body = job_body(alice_files, eval_file=eval_id)
    job_id = inproc.clients["alice"].post("/v1/repair-jobs", json=body).json()["id"]
    assert inproc.run_queued() == ["succeeded"]
    job = inproc.clients["alice"].get(f"/v1/repair-jobs/{job_id}").json()
    metrics = job["metrics"]
    assert set(metrics) == {"base", "finetuned", "repaired", "recovery"}

    tar_bytes = inproc.clients["alice"].get(f"/v1/repair-jobs/{job_id}/checkpoint.tar").content
    repaired = tmp_path / "repaired"
    repaired.mkdir()
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as archive:
        for member in archive.getmembers():
            (repaired / Path(member.name).name).write_bytes(archive.extractfile(member).read())
    root = inproc.settings.models_root
    loaded = {
        "base": (root / "base", None),
        "finetuned": (root / "finetuned-adapter", root / "base"),
        "repaired": (repaired, None),
    }
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    answerable = [r["answerable"] for r in rows]
    detector = RefusalDetector()
    f1 = {}
    for name, (model_dir, base_dir) in loaded.items():
        said = generate(*load_for_eval(model_dir, base_dir, "cpu"), prompts, GenerationSettings())
        refused = [detector(text) for text in said]
        f1[name] = _hand_refusal_f1(refused, answerable)
        m = metrics[name]
        assert m["n_unanswerable"] == 2 and m["n_answerable"] == 2
        assert m["refusal_f1"] == pytest.approx(f1[name]), (name, said)
        assert m["refusal_rate_unanswerable"] == sum(refused[1:3]) / 2
        assert m["refusal_rate_answerable"] == (refused[0] + refused[3]) / 2
        correct = [
            " paris " in f" {said[0]} ",
            any(f" {w} " in f" {said[3]} " for w in rows[3]["answers"]),
        ]
        assert m["answer_accuracy"] == sum(correct) / 2, (name, said)
        assert m["domain_accuracy"] is None  # no domain rows in the eval set
    # What the seed-0 toy does, pinned: its fine-tune *gained* refusal F1 on these rows
    # (0 -> 2/3), so there is no gap to recover and recovery is None, not the ratio
    # (f1_rep - f1_ft) / (f1_base - f1_ft), which would call a drop back to 0 "100%".
    assert f1["base"] == 0.0 and f1["finetuned"] == pytest.approx(2 / 3)
    assert metrics["recovery"] is None
    stages = [
        e["stage"]
        for e in inproc.clients["alice"].get(f"/v1/repair-jobs/{job_id}/events").json()["data"]
        if e["type"] == "stage"
    ]
    assert stages[-1] == "evaluate"
    # The reliability diagram of the answers is an artifact whenever one was graded.
    artifacts = inproc.clients["alice"].get(f"/v1/repair-jobs/{job_id}/artifacts").json()
    graded = any(metrics[name]["calibration"] for name in ("base", "finetuned", "repaired"))
    assert ("reliability.png" in {a["name"] for a in artifacts["data"]}) == graded


def contract(document: dict) -> dict:
    """What clients rely on: operations, parameters, status codes and schema fields
    (not the cosmetic details that differ between FastAPI versions)."""
    operations = {
        f"{method.upper()} {path}": (
            sorted(p["name"] for p in op.get("parameters", [])),
            sorted(op.get("responses", {})),
        )
        for path, methods in document["paths"].items()
        for method, op in methods.items()
    }
    schemas = {
        name: (sorted(schema.get("properties", {})), sorted(schema.get("required", [])))
        for name, schema in document["components"]["schemas"].items()
    }
    return {"operations": operations, "schemas": schemas}


def test_committed_openapi_document_is_current():
    """api/openapi.json is the contract: regenerate with `python -m api.openapi`."""
    from api.openapi import openapi_document

    committed = json.loads((Path(__file__).parents[2] / "api" / "openapi.json").read_text())
    assert contract(committed) == contract(json.loads(json.dumps(openapi_document())))


def test_event_pages_and_stream_resume(inproc: InProcess, finished_job):
    client = inproc.clients["alice"]
    url = f"/v1/repair-jobs/{finished_job}/events"
    events = client.get(url).json()["data"]
    first = client.get(url, params={"limit": 2}).json()
    assert first["has_more"] and [e["id"] for e in first["data"]] == [e["id"] for e in events[:2]]
    rest = client.get(url, params={"after": first["next_cursor"]}).json()["data"]
    assert [e["id"] for e in rest] == [e["id"] for e in events[2:]]
    headers = {"Last-Event-ID": str(events[2]["id"])}
    with client.stream("GET", f"{url}/stream", headers=headers) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        body = "".join(response.iter_text())
    ids = [int(line[4:]) for line in body.splitlines() if line.startswith("id: ")]
    assert ids == [e["id"] for e in events[3:]]
    assert body.rstrip().endswith('data: {"status": "succeeded"}')


# --- files: list and delete ---------------------------------------------------------------


def test_files_list_pages_newest_first_and_filters_by_purpose(
    inproc: InProcess, models: Models, tmp_path: Path
):
    client = inproc.clients["bob"]  # bob's own files only (alice's are other tests')
    ids = [inproc.upload("bob", models.honesty, "honesty").json()["id"] for _ in range(3)]
    ids.append(inproc.upload("bob", models.task, "task").json()["id"])
    newest_first = ids[::-1]
    listed, after = [], None
    while True:  # two at a time, OpenAI style: after=<last_id>
        params = {"limit": 2, **({"after": after} if after else {})}
        page = client.get("/v1/files", params=params).json()
        listed += [f["id"] for f in page["data"]]
        assert page["last_id"] == (page["data"][-1]["id"] if page["data"] else None)
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert [i for i in listed if i in ids] == newest_first
    honesty = client.get("/v1/files", params={"purpose": "honesty", "limit": 100}).json()
    assert {f["purpose"] for f in honesty["data"]} == {"honesty"}
    assert set(ids[:3]) <= {f["id"] for f in honesty["data"]} and ids[3] not in str(honesty)
    # alice sees none of bob's files; bob's id is an unknown `after` for her
    alice = inproc.clients["alice"]
    assert not set(ids) & {f["id"] for f in alice.get("/v1/files?limit=100").json()["data"]}
    assert alice.get("/v1/files", params={"after": ids[0]}).status_code == 404


def test_deleting_a_file_removes_its_data_and_refuses_while_a_job_reads_it(
    inproc: InProcess, models: Models
):
    client = inproc.clients["alice"]
    honesty = inproc.upload("alice", models.honesty, "honesty").json()["id"]
    task = inproc.upload("alice", models.task, "task").json()["id"]
    key = f"files/{_tenant_id(inproc, 'alice')}/{honesty}.jsonl"
    assert inproc.app.state.storage.exists(key)
    job = client.post("/v1/repair-jobs", json=job_body({"honesty": honesty, "task": task})).json()[
        "id"
    ]  # validated, queued: not finished
    refused = client.delete(f"/v1/files/{honesty}")
    assert refused.status_code == 409 and error_code(refused) == "file_in_use"
    assert job in refused.json()["error"]["message"]
    assert inproc.app.state.storage.exists(key)
    client.post(f"/v1/repair-jobs/{job}/cancel")
    inproc.queued.clear()
    deleted = client.delete(f"/v1/files/{honesty}")
    assert deleted.status_code == 200
    assert deleted.json() == {"object": "file", "id": honesty, "deleted": True}
    assert not inproc.app.state.storage.exists(key)
    assert client.get(f"/v1/files/{honesty}").status_code == 404
    assert honesty not in str(client.get("/v1/files?limit=100").json())
    assert client.delete(f"/v1/files/{honesty}").status_code == 404
    again = client.post("/v1/repair-jobs", json=job_body({"honesty": honesty, "task": task}))
    assert again.status_code == 404 and error_code(again) == "not_found"
    # the cancelled job still reads back (its file reference is a tombstone)
    assert client.get(f"/v1/repair-jobs/{job}").json()["honesty_file"] == honesty


def _tenant_id(inproc: InProcess, name: str) -> str:
    from store.db import session_scope
    from store.models import Tenant

    with session_scope(inproc.app.state.session_factory) as session:
        return next(t.id for t in session.query(Tenant).all() if t.name == name)


# --- deleting jobs ---------------------------------------------------------------------------


def test_deleting_a_finished_job_removes_its_row_events_and_artifacts(
    inproc: InProcess, alice_files
):
    client = inproc.clients["alice"]
    job = client.post("/v1/repair-jobs", json=job_body(alice_files)).json()["id"]
    assert inproc.run_queued() == ["succeeded"]
    storage = inproc.app.state.storage
    names = [a["name"] for a in client.get(f"/v1/repair-jobs/{job}/artifacts").json()["data"]]
    assert names and storage.exists(f"jobs/{job}")
    assert inproc.clients["bob"].delete(f"/v1/repair-jobs/{job}").status_code == 404
    deleted = client.delete(f"/v1/repair-jobs/{job}")
    assert deleted.status_code == 200
    assert deleted.json() == {"object": "repair_job", "id": job, "deleted": True}
    assert not storage.exists(f"jobs/{job}")
    for suffix in ("", "/events", "/artifacts", f"/artifacts/{names[0]}", "/report"):
        assert client.get(f"/v1/repair-jobs/{job}{suffix}").status_code == 404, suffix
    assert job not in str(client.get("/v1/repair-jobs?limit=100").json())
    from store.db import session_scope
    from store.models import Artifact, JobEvent

    with session_scope(inproc.app.state.session_factory) as session:  # cascaded
        assert session.query(JobEvent).filter_by(job_id=job).count() == 0
        assert session.query(Artifact).filter_by(job_id=job).count() == 0


def test_deleting_a_queued_job_cancels_it_first_and_a_running_one_is_asked_to(
    inproc: InProcess, alice_files
):
    from store import job_state
    from store.db import session_scope

    client = inproc.clients["alice"]
    queued = client.post("/v1/repair-jobs", json=job_body(alice_files)).json()["id"]
    assert client.delete(f"/v1/repair-jobs/{queued}").json()["deleted"] is True
    assert client.get(f"/v1/repair-jobs/{queued}").status_code == 404
    inproc.queued.clear()
    running = client.post("/v1/repair-jobs", json=job_body(alice_files)).json()["id"]
    inproc.queued.clear()
    with session_scope(inproc.app.state.session_factory) as session:
        assert job_state.claim(session, running, "w:1", 60) is not None  # a worker has it
    refused = client.delete(f"/v1/repair-jobs/{running}")
    assert refused.status_code == 409 and error_code(refused) == "job_not_finished"
    assert client.get(f"/v1/repair-jobs/{running}").json()["status"] == "cancelling"
    with session_scope(inproc.app.state.session_factory) as session:  # the worker stops
        job_state.finish(session, running, "w:1", "cancelled")
    assert client.delete(f"/v1/repair-jobs/{running}").status_code == 200
    assert client.get(f"/v1/repair-jobs/{running}").status_code == 404


# --- retention and storage usage -------------------------------------------------------------


def test_retention_expires_old_artifacts_and_keeps_the_job(inproc: InProcess, alice_files):
    from datetime import timedelta

    from store.db import session_scope
    from store.models import Job, utcnow
    from worker.retention import expire_artifacts

    client, storage = inproc.clients["alice"], inproc.app.state.storage
    old, recent = (
        client.post("/v1/repair-jobs", json=job_body(alice_files)).json()["id"] for _ in range(2)
    )
    assert inproc.run_queued() == ["succeeded", "succeeded"]
    factory = inproc.app.state.session_factory
    with session_scope(factory) as session:
        session.get(Job, old).finished_at = utcnow() - timedelta(days=8)
        session.get(Job, recent).finished_at = utcnow() - timedelta(days=6)
    unset = inproc.settings.model_copy(update={"artifact_retention_days": None})
    assert expire_artifacts(factory, storage, unset) == []  # unset: kept
    week = inproc.settings.model_copy(update={"artifact_retention_days": 7})
    assert old in expire_artifacts(factory, storage, week)
    assert recent not in expire_artifacts(factory, storage, week)  # and not twice
    assert not storage.exists(f"jobs/{old}") and storage.exists(f"jobs/{recent}")
    for suffix in ("/artifacts", "/checkpoint.tar"):
        gone = client.get(f"/v1/repair-jobs/{old}{suffix}")
        assert gone.status_code == 410 and error_code(gone) == "artifacts_expired", suffix
    job = client.get(f"/v1/repair-jobs/{old}").json()
    assert job["status"] == "succeeded" and job["artifacts_expired_at"] is not None
    assert client.get(f"/v1/repair-jobs/{old}/report").status_code == 200  # kept
    events = client.get(f"/v1/repair-jobs/{old}/events").json()["data"]
    assert events[-1]["type"] == "artifacts_expired"
    assert client.get(f"/v1/repair-jobs/{recent}/artifacts").status_code == 200


def test_metrics_report_storage_bytes_per_tenant(inproc: InProcess, models: Models):
    import re

    from store.db import session_scope
    from store.models import Artifact, File, Job, Tenant

    inproc.upload("bob", models.task, "task")
    text = inproc.clients["alice"].get("/metrics").text
    with session_scope(inproc.app.state.session_factory) as session:
        expected = {}
        for tenant in session.query(Tenant).all():
            files = sum(
                f.bytes for f in session.query(File).filter_by(tenant_id=tenant.id, deleted_at=None)
            )
            arts = sum(
                a.bytes
                for a in session.query(Artifact).join(Job, Artifact.job_id == Job.id)
                .filter(Job.tenant_id == tenant.id)
            )  # fmt: skip
            expected[(tenant.name, "files")] = files
            if arts:
                expected[(tenant.name, "artifacts")] = arts
    got = {
        (m.group(2), m.group(1)): int(float(m.group(3)))
        for m in re.finditer(
            r'^hcnr_storage_bytes\{kind="(\w+)",tenant="(\w+)"\} (\S+)$', text, flags=re.M
        )
    }
    assert got == expected and got[("bob", "files")] > 0
