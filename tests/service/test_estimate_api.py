"""POST /v1/repair-jobs/estimate in-process: the estimate of the toy job (figures from the
files' sizes and the checkpoint headers), nothing created, the quick checks of job
creation, another tenant's files 404, and the no_worker_fits refusal."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from hcnr_core import estimate as est
from hcnr_core.limits import GIB
from tests.service.service_support import InProcess, Models, job_body, make_inprocess

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
URL = "/v1/repair-jobs/estimate"


def upload_pair(env: InProcess, models: Models, tenant: str = "alice") -> dict[str, str]:
    return {
        purpose: env.upload(tenant, path, purpose).json()["id"]
        for purpose, path in (("honesty", models.honesty), ("task", models.task))
    }


@pytest.fixture(scope="module")
def files(inproc: InProcess, models: Models) -> dict[str, str]:
    return upload_pair(inproc, models)


def test_estimate_of_the_toy_job(inproc: InProcess, models: Models, files):
    client = inproc.clients["alice"]
    jobs_before = client.get("/v1/repair-jobs").json()["data"]
    response = client.post(URL, json=job_body(files))
    assert response.status_code == 200, response.text
    e = response.json()
    assert e["object"] == "repair_job.estimate" and e["method"] == "hcnr"
    assert (e["parameters"], e["adapter_parameters"], e["total_parameters"]) == (
        22432,
        2432,
        24864,
    )
    assert e["finetuned_kind"] == "adapter" and e["devices"] == ["cpu"]
    for name, path in (("honesty", models.honesty), ("task", models.task)):
        size = path.stat().st_size  # the uploaded file's bytes: ~4 per token, <= 16 x 512
        assert e["tokens"][name] == {
            "samples": 16,
            "tokens": math.ceil(size / 4),
            "tokens_upper": 16 * 512,
            "longest": 512,
            "basis": "file_bytes",
        }
    # The whole-model fit at 22 432 parameters (the Hessians add ~60 KiB).
    fit = (est.WHOLE_RSS_INTERCEPT + est.WHOLE_RSS_PER_PARAM * 22432) / GIB
    assert e["memory_whole"]["host_gib"] == pytest.approx(fit, abs=0.001)
    assert e["memory_whole"]["device_gib"] is None
    assert e["memory_layerwise"]["host_gib"] > 0 and e["layerwise_needed"] is False
    assert 0 < e["wall_seconds_low"] <= e["wall_seconds"] <= e["wall_seconds_high"]
    assert "cpu-measured" in e["wall_basis"]
    assert e["workers"] == [
        {
            "name": "worker",
            "device": "cpu",
            "host_memory_gib": round(est.host_memory_bytes() / GIB, 3),
            "device_memory_gib": None,
            "layerwise": False,
            "source": "detected",
        }
    ]
    assert e["runnable"] is True
    # No job, nothing queued.
    assert client.get("/v1/repair-jobs").json()["data"] == jobs_before
    assert inproc.queued == []


def test_estimate_applies_the_quick_checks_of_job_creation(inproc: InProcess, files):
    client = inproc.clients["alice"]
    swapped = job_body({"honesty": files["task"], "task": files["honesty"]})
    assert client.post(URL, json=swapped).json()["error"]["code"] == "invalid_file_purpose"
    bad = job_body(files, hyperparameters={"r_iw": 2})
    assert client.post(URL, json=bad).status_code == 422
    escape = job_body(files, base="path:../outside")
    assert client.post(URL, json=escape).json()["error"]["code"] == "invalid_reference"
    missing = job_body(files, finetuned="path:nope")
    assert client.post(URL, json=missing).json()["error"]["code"] == "reference_not_found"


def test_other_tenants_files_are_404(inproc: InProcess, files):
    response = inproc.clients["bob"].post(URL, json=job_body(files))
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_rait_has_no_layerwise_mode(inproc: InProcess, files):
    e = inproc.clients["alice"].post(URL, json=job_body(files, method="rait")).json()
    assert e["method"] == "rait" and e["memory_layerwise"] is None


@pytest.mark.parametrize(
    ("settings", "needed"),
    [
        ({"worker_memory_gib": 0.1}, False),  # not even layer by layer fits 0.1 GiB
        ({"worker_device": "cuda:0", "worker_device_memory_gib": 0.0001}, False),
    ],
)
def test_no_worker_fits_is_a_422_carrying_the_estimate(
    models: Models, tmp_path: Path, settings: dict, needed: bool
):
    env = make_inprocess(tmp_path, models, **settings)
    response = env.clients["alice"].post(URL, json=job_body(upload_pair(env, models)))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "no_worker_fits"
    assert "no worker has the memory" in error["message"]
    assert error["details"]["runnable"] is False
    assert error["details"]["parameters"] == 22432
    assert error["details"]["layerwise_needed"] is needed
    assert error["details"]["workers"][0]["source"] == "settings"
    assert env.queued == []
