"""Every method is a job: RAIT and DPO through the API and the real runner, with the same
inputs, events, artifacts and report as an HCNR repair, and bit for bit what the library
writes; hyper-parameters are the method's own and checked before anything is queued."""

from __future__ import annotations

from pathlib import Path

import pytest

from hcnr_core.methods import METHODS, MethodInputs
from hcnr_core.registry import get_method
from tests.service.service_support import InProcess, Models, digests, job_body, outcome

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# A few steps of a rank-2 LoRA: seconds on the toy, and enough to change the weights.
SMALL = {
    "rait": {"steps": 3, "batch_size": 4, "lora_r": 2, "lora_alpha": 4.0},
    "dpo": {"steps": 3, "batch_size": 4, "lora_r": 2, "lora_alpha": 4.0, "max_new_tokens": 4},
}


@pytest.fixture(scope="module")
def files(inproc: InProcess, models: Models) -> dict[str, str]:
    return {
        purpose: inproc.upload("alice", path, purpose).json()["id"]
        for purpose, path in (("honesty", models.honesty), ("task", models.task))
    }


def error_code(response) -> str:
    return response.json()["error"]["code"]


@pytest.mark.parametrize("method", ["rait", "dpo"])
def test_a_baseline_job_publishes_what_the_library_writes(
    inproc: InProcess, files: dict[str, str], models: Models, tmp_path: Path, method: str
) -> None:
    client = inproc.clients["alice"]
    body = job_body(files, method=method, hyperparameters=SMALL[method])
    response = client.post("/v1/repair-jobs", json=body)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    assert response.json()["method"] == method
    assert response.json()["hyperparameters"]["steps"] == 3
    assert inproc.run_queued() == ["succeeded"]

    job = client.get(f"/v1/repair-jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["progress"] == 1.0
    assert {"load", "train", "merge", "save"} <= set(job["stage_seconds"])
    events = client.get(f"/v1/repair-jobs/{job_id}/events").json()["data"]
    stages = {e["stage"] for e in events if e["type"] == "stage"}
    assert {"load", "train", "save"} <= stages
    if method == "dpo":
        assert "generate_rejected" in stages

    # The library, run directly with the same inputs and config, writes the same bytes.
    spec = get_method(method)
    direct = tmp_path / "direct"
    spec.run(
        spec.make_config(SMALL[method]),
        MethodInputs(models.root / "base", models.root / "finetuned-adapter", models.honesty),
        direct,
    )
    artifacts = {
        a["name"]: a["sha256"]
        for a in client.get(f"/v1/repair-jobs/{job_id}/artifacts").json()["data"]
    }
    assert spec.report_name in artifacts
    weights = digests(direct, "*.safetensors")
    assert weights and weights.items() <= artifacts.items()


@pytest.mark.parametrize(
    ("method", "hyperparameters"),
    [
        ("rait", {"r_iw": 0.3}),  # an HCNR knob on a RAIT job
        ("hcnr", {"lr": 1e-3}),  # a training knob on an HCNR job
        ("dpo", {"steps": 0}),
        ("rait", {"steps": 10**9}),  # bounded: no job may train forever
        ("rait", {"device": "cuda"}),  # the worker's business
        ("auto", {"r_iw": 0.3}),  # candidates carry the HCNR knobs
        ("ensemble", {}),  # not a method
    ],
)
def test_hyperparameters_belong_to_the_method(
    inproc: InProcess, files: dict[str, str], method: str, hyperparameters: dict
) -> None:
    client = inproc.clients["alice"]
    before = client.get("/v1/repair-jobs").json()["data"]
    body = job_body(files, method=method, hyperparameters=hyperparameters)
    response = client.post("/v1/repair-jobs", json=body)
    assert response.status_code == 422, response.text
    assert error_code(response) == "invalid_request"
    assert inproc.queued == []
    assert client.get("/v1/repair-jobs").json()["data"] == before


def test_a_job_without_a_method_runs_auto(inproc: InProcess, files: dict[str, str]) -> None:
    """The default method is auto (hcnr_core.config.DEFAULT_METHOD; README, "Why auto is the
    default"), with auto's defaults; a client still sending HCNR knobs without a method is
    told to name it, and nothing is queued."""
    client = inproc.clients["alice"]
    body = {k: v for k, v in job_body(files).items() if k != "method"}
    response = client.post("/v1/repair-jobs", json=body)
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["method"] == "auto"
    assert job["hyperparameters"]["max_domain_drop"] == 2.0
    assert job["hyperparameters"]["require_improvement"] is True
    client.post(f"/v1/repair-jobs/{job['id']}/cancel")
    inproc.queued.clear()

    response = client.post("/v1/repair-jobs", json={**body, "hyperparameters": {"r_iw": 0.3}})
    assert response.status_code == 422, response.text
    (detail,) = response.json()["error"]["details"]
    assert '"method": "hcnr"' in detail["message"] and "r_iw" in detail["message"]
    assert inproc.queued == []


def test_steps_and_epochs_together_are_refused(inproc: InProcess, files: dict[str, str]) -> None:
    body = job_body(files, method="rait", hyperparameters={"steps": 5, "epochs": 1.0})
    response = inproc.clients["alice"].post("/v1/repair-jobs", json=body)
    assert response.status_code == 422 and "not both" in response.text
    assert inproc.queued == []


def test_epochs_alone_is_recorded_without_the_default_steps(
    inproc: InProcess, files: dict[str, str]
) -> None:
    body = job_body(files, method="rait", hyperparameters={"epochs": 0.5, "batch_size": 8})
    response = inproc.clients["alice"].post("/v1/repair-jobs", json=body)
    assert response.status_code == 201, response.text
    recorded = response.json()["hyperparameters"]
    assert recorded["epochs"] == 0.5 and recorded["steps"] is None
    assert "device" not in recorded and "threads" not in recorded
    # The worker rebuilds the same config from the row.
    assert get_method("rait").make_config(recorded).total_steps(16) == 1
    inproc.clients["alice"].post(f"/v1/repair-jobs/{response.json()['id']}/cancel")
    inproc.queued.clear()


def test_dpo_needs_labelled_samples_before_anything_is_queued(
    inproc: InProcess, files: dict[str, str], models: Models, tmp_path: Path
) -> None:
    import json

    rows = [json.loads(line) for line in models.honesty.read_text().splitlines()]
    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k != "answerable"}) + "\n" for r in rows)
    )
    upload = inproc.upload("alice", unlabelled, "honesty").json()["id"]
    body = job_body({**files, "honesty": upload}, method="dpo", hyperparameters=SMALL["dpo"])
    client = inproc.clients["alice"]
    response = client.post("/v1/repair-jobs", json=body)
    # The file is read by the validation task: the job fails with the data's code.
    assert outcome(client, response) == ("failed", "invalid_data")
    job = client.get(f"/v1/repair-jobs/{response.json()['id']}").json()
    assert "answerable" in job["error"]["message"]
    assert inproc.queued == []


# --- the seam itself ------------------------------------------------------------------------


def test_every_method_reports_monotone_progress_to_one(models: Models, tmp_path: Path) -> None:
    for name, method in METHODS.items():
        config = method.make_config(SMALL.get(name, {}))
        fractions: list[float] = []
        method.run(
            config,
            MethodInputs(
                models.root / "base",
                models.root / "finetuned-adapter",
                models.honesty,
                models.task,
            ),
            tmp_path / name,
            progress=lambda event, seen=fractions: seen.append(event.fraction),
        )
        assert fractions == sorted(fractions), name
        assert fractions[-1] == pytest.approx(1.0), name
        assert (tmp_path / name / method.report_name).is_file(), name


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_cancelled_method_writes_nothing(name: str, models: Models, tmp_path: Path) -> None:
    from hcnr_core.errors import RepairCancelled

    method = get_method(name)
    calls = []

    def cancel_on_third_check() -> bool:
        calls.append(1)
        return len(calls) >= 3

    out = tmp_path / "out"
    with pytest.raises(RepairCancelled):
        method.run(
            method.make_config(SMALL.get(name, {})),
            MethodInputs(
                models.root / "base", models.root / "finetuned-adapter", models.honesty, models.task
            ),
            out,
            should_cancel=cancel_on_third_check,
        )
    assert not out.exists() or not any(out.iterdir())


def test_hcnr_needs_a_base_and_a_task_set(models: Models) -> None:
    from hcnr_core.errors import HCNRError

    method = get_method("hcnr")
    inputs = MethodInputs(None, models.root / "finetuned", models.honesty, None)
    with pytest.raises(HCNRError, match="base and task"):
        method.check(method.make_config({}), inputs)
    with pytest.raises(HCNRError, match="unknown method"):
        get_method("ensemble")


# --- auto ------------------------------------------------------------------------------------

AUTO = {
    "candidates": [
        {"name": "paper"},
        {"name": "exact", "hyperparameters": {"compensation": "exact"}},
    ],
    "max_domain_drop": 100.0,
    "require_improvement": False,  # the toy never refuses: nothing could improve
    "max_new_tokens": 4,
}


def test_an_auto_job_publishes_its_choice_with_every_candidate_as_an_event(
    inproc: InProcess, files: dict[str, str]
) -> None:
    client = inproc.clients["alice"]
    response = client.post(
        "/v1/repair-jobs", json=job_body(files, method="auto", hyperparameters=AUTO)
    )
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    assert inproc.run_queued() == ["succeeded"]
    job = client.get(f"/v1/repair-jobs/{job_id}").json()
    assert job["method"] == "auto" and job["progress"] == 1.0
    # not {}; the refit (on by default) is a stage of the job like the candidates
    assert set(job["stage_seconds"]) == {"validate_reference", "c1", "c2", "refit"}
    events = client.get(f"/v1/repair-jobs/{job_id}/events").json()["data"]
    candidates = [e for e in events if e["type"] == "candidate"]
    assert [e["data"]["name"] for e in candidates] == ["paper", "exact"]
    assert all(e["data"]["status"] == "ok" and "refusal_f1" in e["data"] for e in candidates)
    assert any(e["stage"].startswith("c2/") for e in events if e["type"] == "stage")
    artifacts = {
        a["name"] for a in client.get(f"/v1/repair-jobs/{job_id}/artifacts").json()["data"]
    }
    assert {"auto_report.json", "auto_frontier.png", "hcnr_report.json"} <= artifacts
    report = client.get(f"/v1/repair-jobs/{job_id}/artifacts/auto_report.json").json()
    assert report["chosen"] in ("paper", "exact")
    assert [c["name"] for c in report["candidates"]] == ["paper", "exact"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"method": "hcnr", "validation_file": "honesty"}, "invalid_request"),
        (
            {"method": "auto", "hyperparameters": {"candidates": [
                {"name": "x", "hyperparameters": {"r_iw": 3}}]}},
            "invalid_hyperparameters",
        ),
        (
            {"method": "auto", "hyperparameters": {"candidates": [
                {"name": "x", "method": "auto"}]}},
            "invalid_request",
        ),
        ({"method": "auto", "validation_file": "task"}, "invalid_file_purpose"),
    ],
)  # fmt: skip
def test_bad_auto_jobs_are_refused_before_queueing(
    inproc: InProcess, files: dict[str, str], body: dict, code: str
) -> None:
    if "validation_file" in body:
        body = {**body, "validation_file": files[body["validation_file"]]}
    response = inproc.clients["alice"].post("/v1/repair-jobs", json=job_body(files, **body))
    assert response.status_code == 422, response.text
    assert error_code(response) == code
    assert inproc.queued == []
