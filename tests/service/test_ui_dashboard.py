"""The dashboard at /ui through the in-process app (TestClient): login and its cookie,
CSRF and same-origin checks, tenant isolation of every /ui route, and a job created
from the form whose page shows exactly the job's report. The browser test is
test_ui_browser.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.service import ui_support as ui
from tests.service.service_support import InProcess, Models, job_body, make_inprocess

MISSING = "job_" + "0" * 24


@pytest.fixture(scope="module")
def keys(inproc: InProcess) -> dict[str, str]:
    return {t: c.headers["Authorization"].split()[1] for t, c in inproc.clients.items()}


@pytest.fixture(scope="module")
def eval_file(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Unanswerable (the honesty rows), answerable and domain rows (the task rows with
    their answers) in one eval set: every metric of the table is a number."""
    tasks = [json.loads(line) for line in models.task.read_text().splitlines()]
    rows = [
        *(json.loads(line) for line in models.honesty.read_text().splitlines()),
        *({**t, "answers": [t["response"].rstrip(" .")]} for t in tasks[:8]),
        *({**t, "answers": [t["response"].rstrip(" .")], "answerable": True} for t in tasks[8:]),
    ]
    path = tmp_path_factory.mktemp("ui-eval") / "eval.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def queued_job(inproc: InProcess, models: Models) -> str:
    """A job of alice's that stays queued (never run): the target of refused posts."""
    files = {
        p: inproc.upload("alice", path, p).json()["id"]
        for p, path in (("honesty", models.honesty), ("task", models.task))
    }
    response = inproc.clients["alice"].post("/v1/repair-jobs", json=job_body(files))
    assert response.status_code == 201, response.text
    inproc.queued.remove(response.json()["id"])
    return response.json()["id"]


@pytest.fixture(scope="module")
def finished(inproc: InProcess, models: Models, keys, eval_file: Path) -> dict:
    """A job created through the dashboard's form (three uploads), run to the end."""
    client = ui.login(inproc.app, keys["alice"])
    token = ui.csrf_of(client)
    uploads = {
        "honesty_upload": ("honesty.jsonl", models.honesty.read_bytes(), "application/jsonl"),
        "task_upload": ("task.jsonl", models.task.read_bytes(), "application/jsonl"),
        "eval_upload": ("eval.jsonl", eval_file.read_bytes(), "application/jsonl"),
    }
    form = {
        "csrf_token": token,
        "method": "hcnr",
        "base": "path:base",
        "finetuned": "path:finetuned-adapter",
        "hyperparameters": '{"r_iw": 0.3}',
        "metadata": "run=ui-form, team=honesty",
    }
    response = client.post("/ui/jobs", data=form, files=uploads, follow_redirects=False)
    assert response.status_code == 303, response.text
    job_id = response.headers["location"].rsplit("/", 1)[1]
    queued_page = ui.parse(client.get(f"/ui/jobs/{job_id}").text)
    assert queued_page.by_id("job-status").text == "queued"
    assert queued_page.by_id("cancel").tag == "button"
    assert inproc.run_queued() == ["succeeded"]
    return {"id": job_id, "client": client}


def test_login_sets_a_strict_httponly_cookie_and_refuses_bad_keys(inproc: InProcess, keys):
    anonymous = TestClient(inproc.app)
    response = anonymous.get("/ui/jobs", follow_redirects=False)
    assert (response.status_code, response.headers["location"]) == (303, "/ui/login")
    bad = anonymous.post("/ui/login", data={"api_key": "hcnr_nope_nope"}, follow_redirects=False)
    assert bad.status_code == 401 and "set-cookie" not in bad.headers
    assert ui.parse(bad.text).by_id("login-error").text.startswith("That API key is not valid")

    good = anonymous.post("/ui/login", data={"api_key": keys["alice"]}, follow_redirects=False)
    assert (good.status_code, good.headers["location"]) == (303, "/ui/jobs")
    cookie = good.headers["set-cookie"].lower()
    assert {"httponly", "samesite=strict", "path=/ui"} <= {p.strip() for p in cookie.split(";")}
    assert keys["alice"] not in good.headers["location"]
    page = anonymous.get("/ui/jobs")
    assert page.status_code == 200 and ui.parse(page.text).by_id("tenant-name").text == "alice"
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert keys["alice"] not in page.text  # the key never comes back in a page


def test_a_revoked_key_ends_the_session(inproc: InProcess):
    from store import repositories
    from store.db import session_scope

    with session_scope(inproc.app.state.session_factory) as session:
        record, key = repositories.create_api_key(session, "alice")
        key_id = record.id
    client = ui.login(inproc.app, key)
    assert client.get("/ui/jobs", follow_redirects=False).status_code == 200
    with session_scope(inproc.app.state.session_factory) as session:
        assert repositories.revoke_api_key(session, key_id)
    response = client.get("/ui/jobs", follow_redirects=False)
    assert (response.status_code, response.headers["location"]) == (303, "/ui/login")


def _posts(job_id: str, models: Models) -> list[tuple[str, dict, dict]]:
    """Every state-changing /ui form post, with a body that would succeed."""
    jsonl = {"file": ("h.jsonl", models.honesty.read_bytes(), "application/jsonl")}
    job = {"method": "hcnr", "base": "path:base", "finetuned": "path:finetuned-adapter"}
    return [
        (f"/ui/jobs/{job_id}/cancel", {}, {}),
        ("/ui/files", {"purpose": "honesty"}, jsonl),
        ("/ui/jobs", job, {}),
        ("/ui/jobs/estimate", job, {}),
        ("/ui/secrets", {"name": "mlflow_token", "value": "t" * 20}, {}),
        ("/ui/secrets/mlflow_token/delete", {}, {}),
        ("/ui/logout", {}, {}),
    ]


def test_form_posts_need_a_session_the_csrf_token_and_the_same_origin(
    inproc: InProcess, keys, queued_job: str, models: Models
):
    alice = ui.login(inproc.app, keys["alice"])
    bob = ui.login(inproc.app, keys["bob"])
    token, bobs_token = ui.csrf_of(alice), ui.csrf_of(bob)
    assert token != bobs_token
    anonymous = TestClient(inproc.app)
    for path, data, files in _posts(queued_job, models):
        refused = [
            anonymous.post(path, data={**data, "csrf_token": token}, files=files or None),
            alice.post(path, data=data, files=files or None),
            alice.post(path, data={**data, "csrf_token": "0" * 64}, files=files or None),
            alice.post(path, data={**data, "csrf_token": bobs_token}, files=files or None),
            alice.post(
                path,
                data={**data, "csrf_token": token},
                files=files or None,
                headers={"Origin": "https://evil.example"},
            ),
        ]
        assert [r.status_code for r in refused] == [401, 403, 403, 403, 403], path
    assert inproc.clients["alice"].get("/v1/secrets").json()["data"] == []  # none was set
    assert inproc.clients["alice"].get(f"/v1/repair-jobs/{queued_job}").json()["status"] == (
        "queued"
    )
    assert inproc.queued == []  # no job was created
    assert alice.get("/ui/jobs", follow_redirects=False).status_code == 200  # still logged in
    # The same posts with the token and no foreign Origin go through.
    cancel = alice.post(
        f"/ui/jobs/{queued_job}/cancel",
        data={"csrf_token": token},
        headers={"Origin": "http://testserver"},
        follow_redirects=False,
    )
    assert (cancel.status_code, cancel.headers["location"]) == (303, f"/ui/jobs/{queued_job}")
    assert inproc.clients["alice"].get(f"/v1/repair-jobs/{queued_job}").json()["status"] == (
        "cancelled"
    )
    out = alice.post("/ui/logout", data={"csrf_token": token}, follow_redirects=False)
    assert (out.status_code, out.headers["location"]) == (303, "/ui/login")
    assert alice.get("/ui/jobs", follow_redirects=False).status_code == 303


def _id_routes(routes: list) -> set[tuple[str, str]]:
    """(method, path) of every /ui route that takes an id or a name (FastAPI may wrap
    routers)."""
    from fastapi.routing import APIRoute

    found = set()
    for route in routes:
        router = getattr(route, "original_router", None)
        found |= _id_routes(router.routes) if router else set()
        if (
            isinstance(route, APIRoute)
            and route.path.startswith("/ui/")
            and "{" in route.path
            and route.path != "/ui/static/{name}"  # the dashboard's own files, no tenant data
        ):
            found |= {(method, route.path) for method in route.methods}
    return found


def test_every_ui_route_is_tenant_isolated(inproc: InProcess, keys, finished, queued_job):
    """Bob gets 404 for every /ui route with one of alice's job ids, as for an unknown id;
    alice's jobs are not in his list and her files cannot be used in his jobs."""
    bob = ui.login(inproc.app, keys["bob"])
    token = ui.csrf_of(bob)
    job_id = finished["id"]
    requests = {
        ("GET", "/ui/jobs/{job_id}"): lambda j: bob.get(f"/ui/jobs/{j}"),
        ("GET", "/ui/jobs/{job_id}/stream"): lambda j: bob.get(f"/ui/jobs/{j}/stream"),
        ("POST", "/ui/jobs/{job_id}/cancel"): lambda j: bob.post(
            f"/ui/jobs/{j}/cancel", data={"csrf_token": token}
        ),
        ("GET", "/ui/jobs/{job_id}/artifacts/{name}"): lambda j: bob.get(
            f"/ui/jobs/{j}/artifacts/config.json"
        ),
        ("GET", "/ui/jobs/{job_id}/checkpoint.tar"): lambda j: bob.get(
            f"/ui/jobs/{j}/checkpoint.tar"
        ),
    }
    secret_routes = {("POST", "/ui/secrets/{name}/delete")}  # tested in the secrets test
    assert set(requests) | secret_routes == _id_routes(inproc.app.routes)
    # (a new route with an id needs a line above)
    before = inproc.clients["alice"].get(f"/v1/repair-jobs/{queued_job}").json()
    for route, request in requests.items():
        for target in (job_id, queued_job):
            theirs, unknown = request(target), request(MISSING)
            assert (theirs.status_code, unknown.status_code) == (404, 404), route
            # the same page as for an unknown id (the id bob sent is echoed, nothing else)
            assert theirs.text.replace(target, MISSING) == unknown.text, route
    assert inproc.clients["alice"].get(f"/v1/repair-jobs/{queued_job}").json() == before
    listing = bob.get("/ui/jobs")
    assert job_id not in listing.text and queued_job not in listing.text
    alices = inproc.clients["alice"].get(f"/v1/repair-jobs/{job_id}").json()
    form = {
        "csrf_token": token,
        "method": "hcnr",
        "base": "path:base",
        "finetuned": "path:finetuned-adapter",
        "honesty_file": alices["honesty_file"],
        "task_file": alices["task_file"],
    }
    refused = bob.post("/ui/jobs", data=form)
    assert refused.status_code == 404
    assert ui.parse(refused.text).by_id("form-error").attrs["data-code"] == "not_found"
    assert inproc.queued == []


def test_the_job_page_shows_the_jobs_report(inproc: InProcess, finished):
    client, job_id = finished["client"], finished["id"]
    api = inproc.clients["alice"]
    report = api.get(f"/v1/repair-jobs/{job_id}/report").json()
    job = api.get(f"/v1/repair-jobs/{job_id}").json()
    response = client.get(f"/ui/jobs/{job_id}")
    assert response.status_code == 200
    page = ui.parse(response.text)
    assert page.by_id("job-status").text == "succeeded"
    assert page.find_all(id="cancel") == []  # nothing to cancel any more

    # The before/after table: every value is the report's, and is printed to 3 places.
    shown = ui.honesty_values(page)
    assert shown == ui.expected_honesty(report["metrics"])
    f1 = page.find("tr", data_metric="refusal_f1").find("td", data_model="repaired").text
    assert f1 == f"{report['metrics']['repaired']['refusal_f1']:.3f}"
    domain = report["metrics"]["finetuned"]["domain_accuracy"]
    assert domain is not None  # the eval set has domain rows: a real number is compared
    bars = {
        (r.attrs["data-metric"], r.attrs["data-model"]): float(r.attrs["data-value"])
        for r in page.by_id("honesty-chart").find_all("rect")
        if "data-metric" in r.attrs
    }
    assert bars[("domain_accuracy", "finetuned")] == domain
    assert bars[("refusal_f1", "repaired")] == report["metrics"]["repaired"]["refusal_f1"]

    # The reliability diagram: every non-empty calibration bin of every model, as reported.
    models = ("base", "finetuned", "repaired")
    calibrated = [m for m in models if report["metrics"][m].get("calibration")]
    assert calibrated  # answered questions with answers to grade: calibration is present
    points = {
        (g.attrs["data-model"], int(g.attrs["data-bin"])): (
            int(g.attrs["data-n"]),
            float(g.attrs["data-accuracy"]),
            float(g.attrs["data-confidence"]),
        )
        for g in page.by_id("reliability-chart").find_all("g")
        if g.attrs.get("class") == "bin"
    }
    assert points == {
        (m, b["bin"]): (b["n"], b["accuracy"], b["confidence"])
        for m in calibrated
        for b in report["metrics"][m]["calibration"]["bins"]
        if b["n"]
    }

    # Timings, the heat map and the artifacts: the job's, the report's and the API's.
    stages = {r.attrs["data-stage"] for r in page.by_id("timings-table").find_all("tr")
              if "data-stage" in r.attrs}  # fmt: skip
    assert stages == set(job["stage_seconds"])
    assert ui.page_cells(page) == ui.expected_cells(report)
    assert sum(ui.page_cells(page).values()) == sum(
        m["n_columns"] for m in report["selected_matrices"]
    )
    # Shaded by the fraction of each matrix's input columns: widths as published (the
    # safetensors headers of the job's own weights), fractions summed by hand.
    widths = {}
    for artifact in api.get(f"/v1/repair-jobs/{job_id}/artifacts").json()["data"]:
        if artifact["name"].endswith(".safetensors"):
            data = api.get(f"/v1/repair-jobs/{job_id}/artifacts/{artifact['name']}").content
            header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
            widths |= {k: v["shape"][1] for k, v in header.items() if len(v.get("shape", [])) == 2}
    assert report["selected_matrices"]
    for matrix in report["selected_matrices"]:
        assert matrix["in_features"] == widths[matrix["name"]], matrix["name"]
    fractions = ui.page_fractions(page)
    assert fractions == ui.expected_fractions(report)
    assert all(0 < f < 1 for _, _, f in fractions.values())  # a share, not a count
    table = {
        (r.attrs["data-layer"], r.attrs["data-kind"]): json.loads(
            next(td for td in r.find_all("td") if "data-value" in td.attrs).attrs["data-value"]
        )
        for r in page.by_id("heatmap-table").find_all("tr")
        if "data-layer" in r.attrs
    }
    assert table == {k: f for k, (_, _, f) in fractions.items()}  # the text alternative
    svg_desc = page.by_id("heatmap").find("desc").text
    layer, kind = next(iter(fractions))
    n, width, _ = fractions[(layer, kind)]
    assert f"layer {layer} {kind}: " in svg_desc and f"({n} of {width} columns)" in svg_desc
    listed = {}
    for row in page.by_id("artifacts-table").find_all("tr"):
        if "data-artifact" in row.attrs:
            size = next(td for td in row.find_all("td") if "data-bytes" in td.attrs)
            listed[row.attrs["data-artifact"]] = (
                int(size.attrs["data-bytes"]),
                row.find("code").text,
            )
    from_api = api.get(f"/v1/repair-jobs/{job_id}/artifacts").json()["data"]
    assert listed == {a["name"]: (a["bytes"], a["sha256"]) for a in from_api}
    download = client.get(f"/ui/jobs/{job_id}/artifacts/config.json")
    assert download.status_code == 200
    assert hashlib.sha256(download.content).hexdigest() == listed["config.json"][1]
    assert (
        client.get(f"/ui/jobs/{job_id}/checkpoint.tar").content
        == api.get(f"/v1/repair-jobs/{job_id}/checkpoint.tar").content
    )


def test_the_jobs_list_filters_and_streams(inproc: InProcess, finished, monkeypatch):
    from api.ui import routes

    client, job_id = finished["client"], finished["id"]

    def ids(**params) -> list[str]:
        page = ui.parse(client.get("/ui/jobs", params=params).text)
        return [r.attrs["data-job-id"] for r in page.by_id("jobs").find_all("tr")
                if "data-job-id" in r.attrs]  # fmt: skip

    assert job_id in ids()
    assert ids(metadata="run=ui-form") == [job_id]
    assert ids(metadata="run=ui-form, team=honesty", status="succeeded") == [job_id]
    assert job_id not in ids(status="failed") + ids(metadata="run=other")
    bad = client.get("/ui/jobs", params={"status": "nonsense"})
    assert bad.status_code == 422
    assert ui.parse(bad.text).by_id("error-message").attrs["data-code"] == "invalid_request"

    monkeypatch.setattr(routes, "STREAM_MAX_SECONDS", 0)  # one poll, then the stream ends
    stream = client.get("/ui/jobs/stream", params={"metadata": "run=ui-form"})
    assert stream.headers["content-type"].startswith("text/event-stream")
    (data,) = [line[6:] for line in stream.text.splitlines() if line.startswith("data: ")]
    assert [(j["id"], j["status"], j["progress"]) for j in json.loads(data)] == [
        (job_id, "succeeded", 1.0)
    ]
    monkeypatch.undo()
    # A finished job's own stream replays its events, then ends.
    events = client.get(f"/ui/jobs/{job_id}/stream").text
    assert "event: log" in events and events.rstrip().endswith('data: {"status": "succeeded"}')


def test_a_form_submitted_twice_creates_one_job(inproc: InProcess, keys, models: Models):
    """The form carries an idempotency key: a second post of it replays the first job."""
    client = ui.login(inproc.app, keys["alice"])
    page = client.get("/ui/jobs/new").text
    key = ui.parse(page).find("input", name="idempotency_key").attrs["value"]
    assert len(key) >= 20 and key not in client.get("/ui/jobs/new").text  # one per form
    ids = {
        p: inproc.upload("alice", path, p).json()["id"]
        for p, path in (("honesty", models.honesty), ("task", models.task))
    }
    form = {
        "csrf_token": ui.CSRF.search(page).group(1),
        "idempotency_key": key,
        "method": "hcnr",
        "base": "path:base",
        "finetuned": "path:finetuned-adapter",
        "honesty_file": ids["honesty"],
        "task_file": ids["task"],
    }
    first = client.post("/ui/jobs", data=form, follow_redirects=False)
    again = client.post("/ui/jobs", data=form, follow_redirects=False)
    assert first.status_code == again.status_code == 303
    assert first.headers["location"] == again.headers["location"]
    job_id = first.headers["location"].rsplit("/", 1)[1]
    assert inproc.queued == [job_id]  # queued once
    changed = client.post("/ui/jobs", data={**form, "metadata": "x=y"})
    assert changed.status_code == 409
    assert ui.parse(changed.text).by_id("form-error").attrs["data-code"] == "idempotency_conflict"
    assert inproc.queued == [job_id]
    inproc.queued.clear()


def test_upload_page_stores_and_validates_files(inproc: InProcess, keys, models: Models):
    client = ui.login(inproc.app, keys["alice"])
    token = ui.csrf_of(client)
    good = client.post(
        "/ui/files",
        data={"csrf_token": token, "purpose": "task"},
        files={"file": ("task.jsonl", models.task.read_bytes(), "application/jsonl")},
    )
    assert good.status_code == 201
    file_id = ui.parse(good.text).by_id("uploaded-id").text
    stored = inproc.clients["alice"].get(f"/v1/files/{file_id}").json()
    assert stored["purpose"] == "task"
    assert stored["sha256"] == hashlib.sha256(models.task.read_bytes()).hexdigest()
    bad = client.post(
        "/ui/files",
        data={"csrf_token": token, "purpose": "honesty"},
        files={"file": ("bad.jsonl", b'{"prompt": "x"}\nnot json\n', "application/jsonl")},
    )
    assert bad.status_code == 422
    error = ui.parse(bad.text).by_id("form-error")
    assert error.attrs["data-code"] == "invalid_data" and "line 2" in error.text


def test_ui_routes_are_not_in_the_openapi_document(inproc: InProcess):
    paths = inproc.clients["alice"].get("/openapi.json").json()["paths"]
    assert paths and not [p for p in paths if p.startswith("/ui")]


def test_frontier_chart_marks_the_choice_and_the_non_dominated_candidates():
    from api.ui import charts

    report = {
        "config": {"max_domain_drop": 2.0},
        "reference": {
            "finetuned": {"refusal_f1": 0.2, "domain_accuracy": 0.9},
            "base": {"refusal_f1": 0.7, "domain_accuracy": 0.6},
        },
        "candidates": [
            {"name": "a", "method": "hcnr", "status": "ok", "refusal_f1": 0.5,
             "domain_accuracy": 0.89, "domain_drop_points": 1.0, "qualified": True},
            {"name": "b", "method": "hcnr", "status": "ok", "refusal_f1": 0.4,
             "domain_accuracy": 0.85, "domain_drop_points": 5.0, "qualified": False},
            {"name": "c", "method": "rait", "status": "ok", "refusal_f1": 0.8,
             "domain_accuracy": 0.7, "domain_drop_points": 20.0, "qualified": False},
            {"name": "d", "method": "dpo", "status": "failed"},
        ],
        "chosen": "a",
    }  # fmt: skip
    assert charts.pareto([(0.89, 0.5), (0.85, 0.4), (0.7, 0.8)]) == [(0.7, 0.8), (0.89, 0.5)]
    svg = ui.parse(str(charts.frontier(report)))
    marks = {
        g.attrs["data-name"]: g
        for g in svg.find_all("g")
        if "candidate" in g.attrs.get("class", "")
    }
    assert set(marks) == {"a", "b", "c"}  # the failed candidate has no point
    assert [n for n, g in marks.items() if g.find_all("circle", **{"class": "chosen"})] == ["a"]
    assert {n: g.attrs["data-qualified"] for n, g in marks.items()} == {
        "a": "true", "b": "false", "c": "false"
    }  # fmt: skip
    # The frontier joins c and a (b is dominated by a); the limit line sits at 88%.
    (line,) = svg.find_all("polyline")
    assert len(line.attrs["points"].split()) == 2
    (limit,) = [e for e in svg.find_all("line") if e.attrs.get("class") == "limit"]
    assert "88.0%" in limit.text


# --- secrets, estimates, Hub push, tracking and pinned models --------------------------------

HUB_TOKEN = "hf_alice_ui_write_0123456789"


def test_settings_page_sets_lists_and_deletes_secrets_per_tenant(inproc: InProcess, keys):
    """Names and dates only (the value never comes back), through the API's secret routes;
    bob neither sees nor deletes alice's."""
    alice, bob = ui.login(inproc.app, keys["alice"]), ui.login(inproc.app, keys["bob"])
    token, bobs = ui.csrf_of(alice), ui.csrf_of(bob)
    value = "hf_secret_value_never_shown_0123"
    saved = alice.post(
        "/ui/secrets", data={"csrf_token": token, "name": "hf_token", "value": value},
        follow_redirects=False,
    )  # fmt: skip
    assert (saved.status_code, saved.headers["location"]) == (303, "/ui/settings?saved=hf_token")
    page = alice.get(saved.headers["location"])
    assert value not in page.text
    doc = ui.parse(page.text)
    assert doc.by_id("secret-saved").text == "hf_token saved."
    rows = [r.attrs["data-secret"] for r in doc.by_id("secrets-table").find_all("tr")
            if "data-secret" in r.attrs]  # fmt: skip
    api = inproc.clients["alice"].get("/v1/secrets").json()["data"]
    assert rows == [s["name"] for s in api] == ["hf_token"]
    # bob's page lists none of alice's; his delete of the name is a 404 and hers stays
    assert ui.parse(bob.get("/ui/settings").text).find_all(data_secret="hf_token") == []
    refused = bob.post("/ui/secrets/hf_token/delete", data={"csrf_token": bobs})
    assert refused.status_code == 404
    assert ui.parse(refused.text).by_id("error-message").attrs["data-code"] == "not_found"
    assert [s["name"] for s in inproc.clients["alice"].get("/v1/secrets").json()["data"]] == [
        "hf_token"
    ]
    # bad input comes back as the API's refusal, without echoing the value
    bad = alice.post("/ui/secrets", data={"csrf_token": token, "name": "nope", "value": value})
    assert bad.status_code == 422 and value not in bad.text
    assert ui.parse(bad.text).by_id("form-error").attrs["data-code"] == "invalid_request"
    ctrl = alice.post(
        "/ui/secrets", data={"csrf_token": token, "name": "hf_token", "value": "a\x01b"}
    )
    assert ctrl.status_code == 422 and "a\x01b" not in ctrl.text
    gone = alice.post(
        "/ui/secrets/hf_token/delete", data={"csrf_token": token}, follow_redirects=False
    )
    assert (gone.status_code, gone.headers["location"]) == (303, "/ui/settings?deleted=hf_token")
    assert inproc.clients["alice"].get("/v1/secrets").json()["data"] == []
    assert ui.parse(alice.get("/ui/settings").text).by_id("no-secrets")


def _estimate_shown(page: ui.Element) -> dict:
    memory = {
        r.attrs["data-mode"]: [json.loads(td.attrs["data-value"]) for td in r.find_all("td")]
        for r in page.by_id("estimate-memory").find_all("tr")
        if "data-mode" in r.attrs
    }
    wall = page.by_id("est-wall").attrs
    return {
        "parameters": int(page.by_id("est-parameters").attrs["data-value"]),
        "tokens": {
            li.attrs["data-set"]: int(li.attrs["data-tokens"])
            for li in page.by_id("est-tokens").find_all("li")
        },
        "memory": memory,
        "wall": (float(wall["data-value"]), float(wall["data-low"]), float(wall["data-high"])),
        "runnable": page.by_id("estimate").attrs["data-runnable"] == "true",
    }


def _estimate_expected(answer: dict) -> dict:
    memory = {"whole": [answer["memory_whole"]["host_gib"], answer["memory_whole"]["device_gib"]]}
    if answer["memory_layerwise"]:
        layerwise = answer["memory_layerwise"]
        memory["layerwise"] = [layerwise["host_gib"], layerwise["device_gib"]]
    return {
        "parameters": answer["parameters"],
        "tokens": {k: v["tokens"] for k, v in answer["tokens"].items()},
        "memory": memory,
        "wall": (answer["wall_seconds"], answer["wall_seconds_low"], answer["wall_seconds_high"]),
        "runnable": answer["runnable"],
    }


def test_estimate_button_shows_the_apis_estimate_and_creates_nothing(
    inproc: InProcess, keys, models: Models, tmp_path_factory
):
    client = ui.login(inproc.app, keys["alice"])
    ids = {
        p: inproc.upload("alice", path, p).json()["id"]
        for p, path in (("honesty", models.honesty), ("task", models.task))
    }
    body = job_body(ids)
    before = inproc.clients["alice"].get("/v1/repair-jobs", params={"limit": 100}).json()
    form = {
        "csrf_token": ui.csrf_of(client),
        **{k: body[k] for k in ("method", "base", "finetuned")},
    }
    form |= {"honesty_file": ids["honesty"], "task_file": ids["task"]}
    response = client.post("/ui/jobs/estimate", data=form)
    assert response.status_code == 200, response.text
    page = ui.parse(response.text)
    answer = inproc.clients["alice"].post("/v1/repair-jobs/estimate", json=body).json()
    assert answer["parameters"] > 0 and answer["memory_whole"]["host_gib"] > 0
    assert _estimate_shown(page) == _estimate_expected(answer)
    # the form comes back filled in, and nothing was created or queued
    assert page.by_id("job-honesty-file").attrs["value"] == ids["honesty"]
    assert inproc.queued == []
    after = inproc.clients["alice"].get("/v1/repair-jobs", params={"limit": 100}).json()
    assert [j["id"] for j in after["data"]] == [j["id"] for j in before["data"]]

    # no worker with the memory: the API's 422 no_worker_fits, with the estimate it carries
    tiny = make_inprocess(tmp_path_factory.mktemp("ui-tiny"), models, worker_memory_gib=0.001)
    tiny_key = tiny.clients["alice"].headers["Authorization"].split()[1]
    small = ui.login(tiny.app, tiny_key)
    tiny_ids = {
        p: tiny.upload("alice", path, p).json()["id"]
        for p, path in (("honesty", models.honesty), ("task", models.task))
    }
    form = {**form, "csrf_token": ui.csrf_of(small)}
    form |= {"honesty_file": tiny_ids["honesty"], "task_file": tiny_ids["task"]}
    refused = small.post("/ui/jobs/estimate", data=form)
    api = tiny.clients["alice"].post("/v1/repair-jobs/estimate", json=job_body(tiny_ids))
    assert refused.status_code == api.status_code == 422
    page = ui.parse(refused.text)
    assert page.by_id("form-error").attrs["data-code"] == "no_worker_fits"
    shown = _estimate_shown(page)
    assert shown == _estimate_expected(api.json()["error"]["details"])
    assert shown["runnable"] is False


@pytest.fixture(scope="module")
def hub_env(models: Models, tmp_path_factory):
    """An app whose hub is the loopback stand-in: a public base to pin, alice's token may
    write to alice-org/."""
    from tests.service.hub_standin import HubStandIn, repo_from_dir

    hub = HubStandIn(
        {"acme/toy-base": repo_from_dir(models.root / "base")},
        writers={HUB_TOKEN: {"alice-org"}},
    ).start()
    env = make_inprocess(
        tmp_path_factory.mktemp("ui-hub"), models, hub_endpoint=hub.url, hub_offline=False
    )
    yield env, hub
    hub.stop()


def test_job_page_shows_the_push_the_tracking_runs_and_the_pinned_base(
    hub_env, models: Models, monkeypatch: pytest.MonkeyPatch
):
    """One job from the form: hf: base (pinned by the validation), pushed to the Hub with
    the hf_token set on the settings page, tracked by W&B offline; its page shows what the
    API and the hub say."""
    pytest.importorskip("wandb")
    env, hub = hub_env
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    keys = {t: c.headers["Authorization"].split()[1] for t, c in env.clients.items()}
    alice, bob = ui.login(env.app, keys["alice"]), ui.login(env.app, keys["bob"])
    ids = {
        p: env.upload(t, path, p).json()["id"]
        for t in ("bob",)
        for p, path in (("honesty", models.honesty), ("task", models.task))
    }
    form = {
        "method": "hcnr",
        "base": "hf:acme/toy-base",
        "finetuned": "path:finetuned",
        "push_to_hub": "alice-org/ui-push",
        "integrations": '{"type": "wandb", "project": "ui"}',
    }
    # bob has no hf_token: the API's refusal, with the way to the settings page
    refused = bob.post(
        "/ui/jobs", data={**form, **_file_fields(ids), "csrf_token": ui.csrf_of(bob)}
    )
    assert refused.status_code == 422
    error = ui.parse(refused.text).by_id("form-error")
    assert error.attrs["data-code"] == "hub_token_missing"
    assert error.find("a", id="to-settings").attrs["href"] == "/ui/settings"
    assert env.queued == []

    token = ui.csrf_of(alice)
    set_token = {"csrf_token": token, "name": "hf_token", "value": HUB_TOKEN}
    assert alice.post("/ui/secrets", data=set_token, follow_redirects=False).status_code == 303
    uploads = {
        "honesty_upload": ("h.jsonl", models.honesty.read_bytes(), "application/jsonl"),
        "task_upload": ("t.jsonl", models.task.read_bytes(), "application/jsonl"),
    }
    created = alice.post(
        "/ui/jobs", data={**form, "csrf_token": token}, files=uploads, follow_redirects=False
    )
    assert created.status_code == 303, created.text
    job_id = created.headers["location"].rsplit("/", 1)[1]
    assert env.run_queued() == ["succeeded"]
    api = env.clients["alice"]
    job = api.get(f"/v1/repair-jobs/{job_id}").json()
    page = ui.parse(alice.get(f"/ui/jobs/{job_id}").text)

    # the pinned base: the hub's commit, as the API reports it
    assert job["base_resolved"] == f"hf:acme/toy-base@{hub.repos['acme/toy-base'].commit}"
    assert page.by_id("base-resolved").text == job["base_resolved"]
    assert page.find_all(id="finetuned-resolved") == []  # a path: reference is not pinned

    # the push: succeeded, to a private repository, at the hub's commit
    push = job["push_to_hub"]
    repo = hub.repos["alice-org/ui-push"]
    assert push["status"] == "succeeded" and repo.private  # the box was not ticked
    assert page.by_id("push-status").text == "succeeded"
    assert page.by_id("push-repo").text == "alice-org/ui-push"
    commit = page.by_id("push-commit")
    assert commit.text == push["commit_sha"] == repo.revisions["main"]
    assert commit.attrs["href"] == push["commit_url"]
    assert page.by_id("push-url").attrs["href"] == push["url"] == f"{hub.url}/alice-org/ui-push"
    assert page.find_all(id="push-error") == []

    # tracking: the integration, and the run as the tracking event records it
    (integration,) = page.by_id("integrations-table").find_all(data_integration="wandb")
    assert "ui" in integration.text
    events = api.get(f"/v1/repair-jobs/{job_id}/events", params={"limit": 200}).json()["data"]
    ((run,),) = [e["data"]["tracking"] for e in events if e["type"] == "tracking"]
    row = page.by_id("tracking-table").find("tr", data_run="wandb")
    assert row.attrs["data-status"] == run["status"] == "ok"
    assert run["run_id"] in row.text
    link = row.find("a", **{"class": "run-offline"})
    assert link.attrs["href"] == f"/ui/jobs/{job_id}/artifacts/wandb-offline.tar"
    tar = alice.get(link.attrs["href"])
    listed = {a["name"]: a for a in api.get(f"/v1/repair-jobs/{job_id}/artifacts").json()["data"]}
    assert hashlib.sha256(tar.content).hexdigest() == listed["wandb-offline.tar"]["sha256"]

    # a revision the hub does not have: the validation's code, with what to do about it
    form = {**form, "base": "hf:acme/toy-base@no-such-branch", "push_to_hub": ""}
    form |= {"integrations": "", "honesty_file": job["honesty_file"], "task_file": job["task_file"]}
    failed = alice.post("/ui/jobs", data={**form, "csrf_token": token})
    assert failed.status_code == 200  # redirected to the job, which failed its validation
    page = ui.parse(failed.text)
    assert page.by_id("job-status").text == "failed"
    assert page.by_id("job-error").attrs["data-code"] == "revision_not_found"
    assert "after @" in page.by_id("job-error").text
    assert page.by_id("base-resolved").text.startswith("not pinned yet")


def _file_fields(ids: dict[str, str]) -> dict[str, str]:
    return {"honesty_file": ids["honesty"], "task_file": ids["task"]}
