"""client.repair_jobs.estimate (sync and async) against the in-process API."""

from __future__ import annotations

import asyncio

import hcnr_client
import httpx
import pytest
from hcnr_client import types

from tests.service.service_support import InProcess, Models, make_inprocess

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
BASE_URL = "http://testserver"


def key(env: InProcess, tenant: str) -> str:
    return env.clients[tenant].headers["Authorization"].removeprefix("Bearer ")


def test_estimate_sync_and_async(inproc: InProcess, models: Models):
    client = hcnr_client.HCNRClient(
        api_key=key(inproc, "alice"), base_url=BASE_URL, http_client=inproc.clients["alice"]
    )
    honesty = client.files.create(file=models.honesty, purpose="honesty")
    task = client.files.create(file=models.task, purpose="task")
    args = dict(base="path:base", finetuned="path:finetuned-adapter", task_file=task.id)
    estimate = client.repair_jobs.estimate(honesty_file=honesty, method="hcnr", **args)
    assert isinstance(estimate, types.RepairJobEstimate)
    assert (estimate.parameters, estimate.adapter_parameters) == (22432, 2432)
    assert estimate.tokens["honesty"].basis == "file_bytes" and estimate.runnable
    rait = client.repair_jobs.estimate(honesty_file=honesty, method="rait", **args)
    assert rait.method == "rait" and rait.memory_layerwise is None
    bob = client.with_options(api_key=key(inproc, "bob"))
    with pytest.raises(hcnr_client.NotFoundError):
        bob.repair_jobs.estimate(honesty_file=honesty, method="hcnr", **args)

    async def main() -> types.RepairJobEstimate:
        transport = httpx.ASGITransport(app=inproc.app)
        async with httpx.AsyncClient(transport=transport) as http:
            aclient = hcnr_client.AsyncHCNRClient(
                api_key=key(inproc, "alice"), base_url=BASE_URL, http_client=http
            )
            return await aclient.repair_jobs.estimate(
                honesty_file=honesty.id, method="hcnr", **args
            )

    assert asyncio.run(main()) == estimate


def test_estimate_refusal_is_typed_with_the_estimate(models: Models, tmp_path):
    env = make_inprocess(tmp_path, models, worker_memory_gib=0.1)
    client = hcnr_client.HCNRClient(
        api_key=key(env, "alice"), base_url=BASE_URL, http_client=env.clients["alice"]
    )
    honesty = client.files.create(file=models.honesty, purpose="honesty")
    task = client.files.create(file=models.task, purpose="task")
    with pytest.raises(hcnr_client.UnprocessableEntityError) as caught:
        client.repair_jobs.estimate(
            method="hcnr",
            base="path:base",
            finetuned="path:finetuned-adapter",
            honesty_file=honesty,
            task_file=task,
        )
    assert caught.value.code == "no_worker_fits"
    refused = types.RepairJobEstimate.model_validate(caught.value.details)
    assert refused.runnable is False and refused.parameters == 22432
