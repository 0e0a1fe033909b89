"""A job's checkpoint carries a Hub model card (README.md) built with huggingface_hub:
base_model, tags, the method and hyper-parameters, and a model-index with the job's
before/after honesty metrics; every digest the job publishes stays true after the card
replaces the method's README."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.service.service_support import InProcess, Models, job_body
from worker import hub_card


@pytest.fixture(scope="module")
def carded(inproc: InProcess, models: Models, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An HCNR job on the toy with an eval set of unanswerable and domain rows."""
    tasks = [json.loads(line) for line in models.task.read_text().splitlines()]
    rows = [
        *(json.loads(line) for line in models.honesty.read_text().splitlines()),
        *({**t, "answers": [t["response"].rstrip(" .")]} for t in tasks),
    ]
    eval_path = tmp_path_factory.mktemp("card") / "eval.jsonl"
    eval_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = {
        purpose: inproc.upload("alice", path, purpose).json()["id"]
        for purpose, path in (
            ("honesty", models.honesty),
            ("task", models.task),
            ("eval", eval_path),
        )
    }
    body = job_body(files, eval_file=files["eval"], hyperparameters={"r_iw": 0.3})
    client = inproc.clients["alice"]
    response = client.post("/v1/repair-jobs", json=body)
    assert response.status_code == 201, response.text
    assert inproc.run_queued() == ["succeeded"]
    job_id = response.json()["id"]
    artifacts = client.get(f"/v1/repair-jobs/{job_id}/artifacts").json()["data"]

    def download(name: str) -> bytes:
        return client.get(f"/v1/repair-jobs/{job_id}/artifacts/{name}").content

    return {
        "job": client.get(f"/v1/repair-jobs/{job_id}").json(),
        "listed": {a["name"]: a["sha256"] for a in artifacts},
        "card": download("README.md").decode(),
        "report": json.loads(download("hcnr_report.json")),
    }


def test_the_card_is_a_hub_model_card_with_the_jobs_metrics(carded: dict) -> None:
    from huggingface_hub import ModelCard

    job, card = carded["job"], ModelCard(carded["card"])
    data = card.data
    assert data.base_model is None  # path: references are not Hub ids
    assert data.library_name == "transformers"
    assert {"hcnr", "honesty", "model-repair"} <= set(data.tags)
    assert data.hcnr["method"] == "hcnr"
    assert data.hcnr["hyperparameters"] == job["hyperparameters"]
    assert data.hcnr["hyperparameters"]["r_iw"] == 0.3
    # model-index: every honesty metric of every model, equal to the job's metrics.
    results = {r.metric_type: r.metric_value for r in data.eval_results}
    expected = {}
    for role, suffix in (("repaired", ""), ("finetuned", "_finetuned"), ("base", "_base")):
        for key, _ in hub_card.METRICS:
            value = job["metrics"][role][key]
            if value is not None:
                expected[key + suffix] = round(value, 6)
    if job["metrics"]["recovery"] is not None:
        expected["refusal_f1_recovery"] = round(job["metrics"]["recovery"], 6)
    assert "domain_accuracy_finetuned" in expected  # the eval set has domain rows
    assert results == expected
    names = {r.metric_type: r.metric_name for r in data.eval_results}
    assert names["refusal_f1"] == "Refusal F1"
    assert names["refusal_f1_finetuned"] == "Refusal F1 (fine-tuned, before repair)"
    assert names["refusal_f1_base"] == "Refusal F1 (base)"
    assert {r.dataset_name for r in data.eval_results} == {job["eval_file"]}
    assert "## Honesty before and after" in card.text


def test_the_cards_digest_is_true_everywhere(carded: dict) -> None:
    digest = hashlib.sha256(carded["card"].encode()).hexdigest()
    assert carded["listed"]["README.md"] == digest
    assert carded["report"]["files"]["README.md"]["sha256"] == digest


def test_an_auto_checkpoints_reports_list_the_cards_digest(tmp_path: Path) -> None:
    """auto: the card's digest goes into the chosen method's report, whose own new digest
    goes into auto_report.json and the job's report."""
    out = tmp_path
    (out / "README.md").write_text("the method's card\n")
    (out / "model.safetensors").write_bytes(b"weights")

    def digest(name: str) -> dict:
        data = (out / name).read_bytes()
        return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    inner = {"files": {n: digest(n) for n in ("README.md", "model.safetensors")}}
    (out / "hcnr_report.json").write_text(json.dumps(inner))
    outer = {"files": {n: digest(n) for n in ("README.md", "hcnr_report.json")}}
    (out / "auto_report.json").write_text(json.dumps(outer))
    report = {
        "report_name": "auto_report.json",
        "chosen_report": "hcnr_report.json",
        "chosen": "paper",
        "reason": "the most honest",
        "files": dict(outer["files"]),
    }
    job = SimpleNamespace(
        id="job_1",
        method="auto",
        base_ref="hf:org/base@main",
        finetuned_ref="path:ft",
        hyperparameters={"max_domain_drop": 2.0},  # Job.hyperparameters: config less private keys
    )
    hub_card.publish(job, report, out)

    assert "the method's card" not in (out / "README.md").read_text()
    inner = json.loads((out / "hcnr_report.json").read_text())
    outer = json.loads((out / "auto_report.json").read_text())
    assert inner["files"]["README.md"] == digest("README.md")
    assert inner["files"]["model.safetensors"] == digest("model.safetensors")
    assert outer["files"] == {n: digest(n) for n in ("README.md", "hcnr_report.json")}
    assert report["files"] == outer["files"]

    from huggingface_hub import ModelCard

    card = ModelCard((out / "README.md").read_text())
    assert card.data.base_model == "org/base"  # an hf: reference is the Hub's base_model
    assert card.data.eval_results is None  # no eval set: no model-index
    assert "`auto` chose **paper**" in card.text
