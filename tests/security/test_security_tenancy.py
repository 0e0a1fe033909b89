"""Figure 8: tenant isolation. Tenant B tries every id of tenant A on every route of the
OpenAPI document (and id variants, query and header variants, list filters, cursors,
idempotency keys): 0 successes, answers indistinguishable from an unknown id. On real
PostgreSQL the same, plus `pg_dump` of the database holds no plaintext API key."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import quote, unquote

import pytest

from tests.security.hostile import AppEnv, World, error_code, make_app_env
from tests.service import service_procs as procs

pytestmark = [pytest.mark.security, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
ALICE_SECRET = "hf_alice_0123456789abcdefghijklmnopqrstuvw"
UNKNOWN = {"job_id": "job_000000000000000000000000", "file_id": "file_000000000000000000000000"}


def alice_state(env: AppEnv) -> dict:
    """Alice's ids: a succeeded job (artifacts, events), a queued one, a cancelled one."""
    alice = env.alice
    done = alice.post("/v1/repair-jobs", json=env.job_body(metadata={"owner": "alice"}))
    assert done.status_code == 201, done.text
    assert env.inproc.run_queued() == ["succeeded"]
    headers = {"Idempotency-Key": "alice-key-1"}
    queued = alice.post("/v1/repair-jobs", json=env.job_body(), headers=headers).json()["id"]
    cancelled = alice.post("/v1/repair-jobs", json=env.job_body()).json()["id"]
    alice.post(f"/v1/repair-jobs/{cancelled}/cancel")
    env.inproc.queued.remove(cancelled)
    jobs = [done.json()["id"], queued, cancelled]
    names = [a["name"] for a in alice.get(f"/v1/repair-jobs/{jobs[0]}/artifacts").json()["data"]]
    events = alice.get(f"/v1/repair-jobs/{jobs[0]}/events").json()["data"]
    cursor = alice.get("/v1/repair-jobs", params={"limit": 1}).json()["next_cursor"]
    artifacts = alice.get(f"/v1/repair-jobs/{jobs[0]}/artifacts").json()["data"]
    files = [alice.get(f"/v1/files/{f}").json() for f in env.files.values()]
    digests = [a["sha256"] for a in artifacts] + [f["sha256"] for f in files]
    # A secret of hers: bob's reads and deletes by its name must look like "none set".
    assert alice.put("/v1/secrets/hf_token", json={"value": ALICE_SECRET}).status_code == 200
    return {
        "jobs": jobs,
        "files": list(env.files.values()),
        "names": names,
        "event_ids": [e["id"] for e in events],
        "cursor": cursor,
        "digests": digests,
        "secret_names": ["hf_token"],
    }


def id_variants(ident: str) -> list[str]:
    return [ident, ident.upper(), f"{ident}%20", f"%20{ident}", quote(ident), f"{ident}%00"]


def attempts(spec: dict, state: dict) -> list[tuple[str, str, dict]]:
    """(method, url, headers) for every operation with a path parameter, filled with each of
    alice's ids (and variants), plus the id-less ways to reach her data."""
    out: list[tuple[str, str, dict]] = []
    for path, operations in spec["paths"].items():
        if "{" not in path:
            continue
        # A secret's {name} is in the tenant's own name space: bob's PUT sets his own secret
        # (check_isolation: it leaves alice's); his reads and deletes are tried.
        secrets = path.startswith("/v1/secrets/")
        names = state["secret_names"] if secrets else state["names"]
        for method in operations:
            if secrets and method == "put":
                continue
            for job in state["jobs"] if "{job_id}" in path else [None]:
                for file_id in state["files"] if "{file_id}" in path else [None]:
                    for name in names if "{name}" in path else [None]:
                        jobs_ = id_variants(job) if job else [None]
                        for job_v in jobs_:
                            url = path
                            if job_v:
                                url = url.replace("{job_id}", job_v)
                            if file_id:
                                url = url.replace("{file_id}", file_id)
                            if name:
                                url = url.replace("{name}", name)
                            for file_v in id_variants(file_id)[1:] if file_id else []:
                                out.append((method.upper(), path.replace("{file_id}", file_v), {}))
                            out.append((method.upper(), url, {}))
                            if name:
                                out.append((method.upper(), url, {"Range": "bytes=0-10"}))
                            if url.endswith("/events/stream"):
                                out.append((method.upper(), url, {"Last-Event-ID": "0"}))
                            if url.endswith("/events"):
                                out.append((method.upper(), url + "?after=0&limit=1000", {}))
    return out


def isolation_results(env: AppEnv, state: dict) -> dict:
    spec = env.alice.get("/openapi.json").json()
    tried = attempts(spec, state)
    secrets_ = state["jobs"] + state["files"] + state["digests"] + [ALICE_SECRET]
    successes, leaks, shapes, covered = [], [], set(), set()
    for method, url, headers in tried:
        response = env.bob.request(method, url, headers=headers)
        covered.add((method, re.sub(r"(job|file)_[0-9a-fA-F]{24}\S*?(?=/|$)", "ID", url)))
        if response.status_code < 400:
            successes.append((method, url, response.status_code))
        # Alice's ids or file digests in the answer (beyond the id bob sent himself).
        sent = unquote(url)
        if any(s in response.text and s not in sent for s in secrets_):
            leaks.append((method, url, response.text[:200]))
        shapes.add((response.status_code, error_code(response)))
    # Id-less routes: lists, filters, cursors, replays, creating with alice's files.
    listing = env.bob.get("/v1/repair-jobs", params={"metadata": "owner=alice"}).json()["data"]
    paged = env.bob.get("/v1/repair-jobs", params={"cursor": state["cursor"]}).json()["data"]
    every = env.bob.get("/v1/repair-jobs", params={"limit": 100}).json()["data"]
    replay = env.bob.post(
        "/v1/repair-jobs",
        json=env.job_body(),  # alice's file ids
        headers={"Idempotency-Key": "alice-key-1"},
    )
    bob_files = env.bob.get("/v1/files", params={"limit": 100}).json()["data"]
    alice_files = set(state["files"])
    files_seen = [f["id"] for f in bob_files if f["id"] in alice_files]
    after_alice = env.bob.get("/v1/files", params={"after": state["files"][0]})
    id_less = {
        "list_by_alice_metadata": len(listing),
        "list_with_alice_cursor": len(paged),
        "list_all": len(every),
        "create_with_alice_files": replay.status_code,
        "files_list": len(files_seen),
        "files_after_alice_file": after_alice.status_code,
    }
    if listing or paged or every:
        successes.append(("GET", "/v1/repair-jobs (lists)", len(listing) + len(paged)))
    if files_seen or after_alice.status_code < 400:
        successes.append(("GET", "/v1/files (list)", len(files_seen)))
    if replay.status_code < 400:
        successes.append(("POST", "/v1/repair-jobs (alice's files / key)", replay.status_code))
    # The same routes for an id nobody has: the answers bob got must look just like it.
    unknown = {
        (r.status_code, error_code(r))
        for r in (
            env.bob.get(f"/v1/repair-jobs/{UNKNOWN['job_id']}"),
            env.bob.get(f"/v1/files/{UNKNOWN['file_id']}"),
        )
    }
    return {
        "attempts": len(tried) + 4,
        "operations": len({(m, p) for p, ops in spec["paths"].items() for m in ops if "{" in p}),
        "successes": successes,
        "leaks": leaks,
        "shapes": shapes,
        "unknown_shapes": unknown,
        "id_less": id_less,
        "covered": covered,
    }


def check_isolation(env: AppEnv) -> dict:
    state = alice_state(env)
    # Positive control: alice herself reaches all of it.
    for job in state["jobs"][:1]:
        for suffix in ("", "/artifacts", "/events", "/report", "/checkpoint.tar"):
            assert env.alice.get(f"/v1/repair-jobs/{job}{suffix}").status_code == 200
    result = isolation_results(env, state)
    assert result["attempts"] >= 100
    assert not result["successes"]
    assert not result["leaks"]
    assert result["shapes"] == {(404, "not_found")}, result["shapes"]
    assert result["unknown_shapes"] == {(404, "not_found")}
    assert result["id_less"]["create_with_alice_files"] == 404
    assert result["id_less"]["files_after_alice_file"] == 404
    # Bob's PUT of the same name sets his own secret; his DELETE removes his; hers stays.
    assert env.bob.put("/v1/secrets/hf_token", json={"value": "hf_bob_1234567890"}).is_success
    assert [s["name"] for s in env.bob.get("/v1/secrets").json()["data"]] == ["hf_token"]
    assert env.bob.delete("/v1/secrets/hf_token").is_success
    assert env.bob.get("/v1/secrets/hf_token").status_code == 404
    assert env.alice.get("/v1/secrets/hf_token").status_code == 200
    return result


def test_tenant_b_gets_nothing_of_tenant_a_sqlite(app_env: AppEnv):
    check_isolation(app_env)


@pytest.fixture(scope="module")
def pg_env(world: World, pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> AppEnv:
    return make_app_env(world, tmp_path_factory.mktemp("pg"), database_url=pg_url)


def test_tenant_b_gets_nothing_of_tenant_a_postgresql(pg_env: AppEnv):
    check_isolation(pg_env)


# --- hostile strings where PostgreSQL is stricter than SQLite ---------------------------------


def test_hostile_strings_are_4xx_on_postgresql(pg_env: AppEnv):
    """NUL bytes and over-long values reach the database only as 4xx, never as a 500."""
    bob = pg_env.bob
    requests = [
        ("GET", "/v1/repair-jobs/job_%00", None),
        ("GET", "/v1/files/file_%00abc", None),
        ("GET", "/v1/repair-jobs/" + "j" * 5000, None),
        ("GET", "/v1/repair-jobs?metadata=a%3Db%00", None),
        ("GET", "/v1/repair-jobs?cursor=" + "MjAyNi0wMS0wMVQwMDowMDowMHxqb2JfAA==", None),
        ("POST", "/v1/repair-jobs", pg_env.job_body(metadata={"k\x00": "v"})),
        ("POST", "/v1/repair-jobs", pg_env.job_body(metadata={"k": "v\x00"})),
        ("POST", "/v1/repair-jobs", pg_env.job_body(metadata={"k" * 65: "v"})),
        ("POST", "/v1/repair-jobs", pg_env.job_body(metadata={"k": "v" * 513})),
        ("POST", "/v1/repair-jobs", pg_env.job_body(honesty_file="file_\x00")),
        ("POST", "/v1/repair-jobs", pg_env.job_body(base="path:base\x00")),
    ]
    answers = []
    for method, url, body in requests:
        response = bob.request(method, url, json=body) if body else bob.request(method, url)
        answers.append((url[:60], body and str(body.get("metadata"))[:40], response.status_code))
    assert all(400 <= status < 500 for *_, status in answers), answers
    long_filter = bob.get("/v1/repair-jobs", params={"metadata": "k" * 100 + "=v"})
    assert long_filter.status_code == 200 and long_filter.json()["data"] == []
    files = {"file": ("a\x00b.jsonl", pg_env.world.task.read_bytes(), "application/jsonl")}
    upload = bob.post("/v1/files", files=files, data={"purpose": "task"})
    assert upload.status_code in (201, 422), upload.text
    if upload.status_code == 201:
        assert "\x00" not in upload.json()["filename"]


# --- pg_dump: keys are stored hashed ----------------------------------------------------------


def pg_dump(url: str) -> str:
    """The whole database (schema and data) as SQL text."""
    port = re.search(r":(\d+)/", url).group(1)
    binary = procs.postgres_bindir() / "pg_dump"
    command = [str(binary), "-h", "127.0.0.1", "-p", port, "-U", "postgres", "hcnr"]
    result = subprocess.run(
        [*procs._as_postgres_user(), *command], capture_output=True, text=True, cwd="/"
    )
    result.check_returncode()
    return result.stdout


def key_exposure(dump: str, keys: list[str]) -> dict:
    """Plaintext keys (whole or secret part) and secret fragments (≥ 8 characters, or the
    shown prefix `hcnr_<lookup>_` followed by even 4 characters of the secret) in `dump`."""
    whole = sum(1 for k in keys if k in dump)
    secrets_ = [k.split("_", 2)[2] for k in keys]
    secret_parts = sum(1 for s in secrets_ if s in dump)
    fragments = sum(1 for s in secrets_ if any(s[i : i + 8] in dump for i in range(len(s) - 7)))
    prefix_plus = sum(1 for k in keys if k[: k.rindex("_") + 5] in dump)
    lookups_shown = sum(1 for k in keys if k.split("_")[1] in dump)
    return {
        "keys": len(keys),
        "plaintext_keys": whole,
        "plaintext_secrets": secret_parts,
        "secret_fragments": fragments,
        "prefix_beyond_lookup": prefix_plus,
        "lookups_shown": lookups_shown,
    }


def dump_check(pg_url: str, env: AppEnv, workdir: Path) -> dict:
    """Keys made three ways (library, `hcnr keys create` CLI, the app fixture), used,
    one revoked; then the dump."""
    from fastapi.testclient import TestClient

    from store import repositories
    from store.db import session_scope

    keys = []
    with session_scope(env.inproc.app.state.session_factory) as session:
        for i in range(5):
            _, key = repositories.create_api_key(session, f"dump-tenant-{i}", name=f"k{i}")
            keys.append(key)
    cli_env = procs.service_env(env="test", data_dir=workdir, database_url=pg_url)
    keys += [procs.create_key(cli_env, "dump-cli") for _ in range(2)]
    keys += [
        c.headers["Authorization"].removeprefix("Bearer ") for c in env.inproc.clients.values()
    ]
    for key in keys:  # every key authenticates (so they are real), and is used
        client = TestClient(env.inproc.app, headers={"Authorization": f"Bearer {key}"})
        assert client.get("/v1/repair-jobs").status_code == 200
    with session_scope(env.inproc.app.state.session_factory) as session:
        repositories.revoke_api_key(session, keys[0].split("_")[1])
    dump = pg_dump(pg_url)
    assert "api_keys" in dump and "secret_hash" in dump  # the dump has the key table
    return key_exposure(dump, keys)


def test_pg_dump_holds_no_plaintext_key(pg_env: AppEnv, pg_url: str, tmp_path: Path):
    exposure = dump_check(pg_url, pg_env, tmp_path)
    assert exposure["keys"] >= 9
    assert exposure["plaintext_keys"] == 0
    assert exposure["plaintext_secrets"] == 0
    assert exposure["secret_fragments"] == 0
    assert exposure["prefix_beyond_lookup"] == 0
    assert exposure["lookups_shown"] == exposure["keys"]  # the key id is meant to be stored
