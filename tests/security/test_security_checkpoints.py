"""Figure 5: malicious checkpoints under the models root, referenced by a job through the
HTTP API. Each is refused with a stable code before anything is queued; no pickle payload
or remote code ever runs (a sentinel file would appear); nothing outside the models root
is read (audit hook)."""

from __future__ import annotations

import json
import os
import pickle

import pytest

from tests.security import hostile
from tests.security.hostile import (
    AppEnv,
    CheckpointCase,
    FileAudit,
    python_roots,
    violations,
)
from tests.service.service_support import outcome, refusal_message

pytestmark = [pytest.mark.security, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def app_env(world: hostile.World, tmp_path_factory: pytest.TempPathFactory) -> AppEnv:
    """Validation in this process: the audit hook sees this process only. The same cases
    through the isolated validation (a child process): test_security_bounded.py."""
    return hostile.make_app_env(world, tmp_path_factory.mktemp("app"), validation_isolation=False)


def post_case(env: AppEnv, case: CheckpointCase, role: str):
    if role == "base":  # with the adapter (it has no tokenizer: the base's is used)
        hyper = {"check_adapter_base_name": False}  # it names models/base, not this copy
        body = env.job_body(base=case.ref, hyperparameters=hyper)
    else:
        body = env.job_body(finetuned=case.ref)
    return env.alice.post("/v1/repair-jobs", json=body)


def checkpoint_results(env: AppEnv) -> list[dict]:
    """Every case in every role it applies to, with what the API answered and what the
    process touched meanwhile."""
    results = []
    roots = [str(env.world.models), str(env.data_dir), *python_roots()]
    audit = FileAudit.get()
    for case in env.world.checkpoint_cases:
        for role in case.roles:
            before = env.job_ids()
            with audit.recording() as records:
                response = post_case(env, case, role)
                # In-process, the validation task has run by now (inside the records).
                status, code = outcome(env.alice, response)
            queued = list(env.inproc.queued)
            if status == "queued":  # accepted: never run it here
                env.alice.post(f"/v1/repair-jobs/{response.json()['id']}/cancel")
                env.inproc.queued.clear()
            results.append(
                {
                    "case": case.name,
                    "role": role,
                    "expected": case.code,
                    "status": status,
                    "code": code,
                    "message": refusal_message(env.alice, response),
                    "queued": queued if case.code else [],
                    "jobs_added": len(env.job_ids()) - len(before) if case.code else 0,
                    "outside_reads": violations(list(records), roots),
                    "sentinel": env.world.sentinel.exists(),
                }
            )
    return results


@pytest.fixture(scope="module")
def results(app_env: AppEnv) -> list[dict]:
    return checkpoint_results(app_env)


def test_every_malicious_checkpoint_is_refused_with_its_code(results):
    wrong = [
        (r["case"], r["role"], r["status"], r["code"], r["message"][:200])
        for r in results
        if r["expected"] and (r["status"] not in (422, "failed") or r["code"] != r["expected"])
    ]
    assert not wrong
    assert len([r for r in results if r["expected"]]) >= 40


def test_nothing_is_queued_for_a_refused_checkpoint(results):
    """Never sent to a GPU worker; a job the validation task refused is recorded, failed
    (what the user polls), one refused at once is not recorded at all."""
    assert not [r["case"] for r in results if r["queued"]]
    recorded = {(r["case"], r["role"]): r["jobs_added"] for r in results if r["expected"]}
    assert recorded == {
        (r["case"], r["role"]): int(r["status"] == "failed") for r in results if r["expected"]
    }


def test_harmless_oddities_are_accepted(results):
    accepted = {(r["case"], r["role"]): r["status"] for r in results if r["expected"] is None}
    assert accepted and set(accepted.values()) == {"queued"}, accepted


def test_no_payload_ever_runs_and_the_bait_is_live(results, app_env: AppEnv):
    sentinel = app_env.world.sentinel
    assert not [r["case"] for r in results if r["sentinel"]]
    assert not sentinel.exists()
    # Positive control: the payload is real; unpickling it does create the sentinel.
    payload = app_env.world.models / "hostile" / "pickle-only" / "pytorch_model.bin"
    with payload.open("rb") as handle:
        pickle.load(handle)  # the point: it runs
    assert sentinel.exists()
    sentinel.unlink()


def test_no_read_outside_the_models_root(results):
    """Python-level opens/listings (audit hook) while each case was validated."""
    assert not [
        (r["case"], r["role"], r["outside_reads"][:3]) for r in results if r["outside_reads"]
    ]


def test_audit_hook_sees_checkpoint_reads(app_env: AppEnv):
    """The instrument works: a valid job's validation shows reads of base/config.json."""
    with FileAudit.get().recording() as records:
        response = app_env.alice.post("/v1/repair-jobs", json=app_env.job_body())
    assert response.status_code == 201
    app_env.alice.post(f"/v1/repair-jobs/{response.json()['id']}/cancel")
    app_env.inproc.queued.clear()
    opened = {path for event, path in records if event == "open"}
    assert str(app_env.world.models / "base" / "config.json") in opened


def test_pickle_beside_safetensors_runs_without_unpickling(app_env: AppEnv):
    """Accepted (the safetensors are used); the whole repair runs; the pickle never loads."""
    body = app_env.job_body(
        base="path:hostile/pickle-beside-safetensors", finetuned="path:finetuned"
    )
    response = app_env.alice.post("/v1/repair-jobs", json=body)
    assert response.status_code == 201, response.text
    assert app_env.inproc.run_queued() == ["succeeded"]
    assert not app_env.world.sentinel.exists()
    assert os.path.exists(app_env.world.models / "hostile" / "pickle-beside-safetensors")


def test_template_refusing_a_sample_is_invalid_data(app_env: AppEnv, tmp_path):
    """A valid template may still refuse some samples (here: a system message): 422."""
    rows = [
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "i do not know ."},
            ]
        }
    ] * 8
    path = tmp_path / "system.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    honesty = app_env.inproc.upload("alice", path, "honesty").json()["id"]
    body = app_env.job_body(
        base="path:hostile/chat-template-strict",
        honesty_file=honesty,
        hyperparameters={"check_adapter_base_name": False},
    )
    response = app_env.alice.post("/v1/repair-jobs", json=body)
    assert outcome(app_env.alice, response) == ("failed", "invalid_data"), response.text
    assert "only user and assistant roles" in refusal_message(app_env.alice, response)
    assert app_env.inproc.queued == []
