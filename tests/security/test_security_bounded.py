"""Issue 14: hostile or heavy inputs cannot stall anything.

Every hostile-work case of `hostile_work` (an enormous config over tiny weights, tensors
over the size limits, a looping or quadratic chat template, a tokenizer regex that
backtracks exponentially, too many samples / tokens / bytes) is refused with its code
within its limit, through the HTTP API (validation in a child process) and through
`hcnr repair`; nothing is queued or written. A job past `job_timeout_seconds` fails with
code `timeout`, even when it is stuck; `hcnr serve` stops on SIGTERM within seconds with
a hostile validation in flight.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

from tests.security import hostile_work as hw
from tests.security.hostile import error_code
from tests.service.service_support import outcome

pytestmark = [pytest.mark.security, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> hw.WorkWorld:
    from hcnr_core.toy import build_toy

    top = tmp_path_factory.mktemp("bounded")
    toy = build_toy(top / "models", seed=0)
    return hw.build_work_world(top / "models", toy)


@pytest.fixture(scope="module")
def api(work: hw.WorkWorld, tmp_path_factory: pytest.TempPathFactory):
    from tests.service.service_support import Models, make_inprocess

    toy = work.toy
    models = Models(work.models, toy["honesty"], toy["task"], toy["honesty"], toy["task"])
    inproc = make_inprocess(tmp_path_factory.mktemp("app"), models, **hw.WORK_LIMITS)
    for tenant, client in list(inproc.clients.items()):
        inproc.clients[tenant] = type(client)(
            inproc.app, headers=dict(client.headers), raise_server_exceptions=False
        )
    return inproc


def _job_ids(api) -> list[str]:
    page = api.clients["alice"].get("/v1/repair-jobs", params={"limit": 100}).json()
    assert not page["has_more"]  # one page holds them all
    return [j["id"] for j in page["data"]]


def _post(api, work: hw.WorkWorld, case: hw.WorkCase | None, files: dict[str, str]):
    body = {
        "method": "hcnr",
        "base": case.ref if case and case.ref else "path:base",
        "finetuned": "path:finetuned-adapter",
        "honesty_file": files["honesty"],
        "task_file": files["task"],
        "hyperparameters": {"check_adapter_base_name": False},
    }
    return api.clients["alice"].post("/v1/repair-jobs", json=body)


@pytest.fixture(scope="module")
def api_results(api, work: hw.WorkWorld) -> dict[str, dict]:
    from hcnr_core.bounded import warm_up

    warm_up()
    toy_files = {
        purpose: api.upload("alice", work.toy[purpose], purpose).json()["id"]
        for purpose in ("honesty", "task")
    }
    results = {}
    for case in [None, *work.cases]:  # None: the toy itself, the positive control
        name = case.name if case else "control"
        files = dict(toy_files)
        if case and case.honesty:
            upload = api.upload("alice", work.honesty(case), "honesty")
            if upload.status_code != 201:
                results[name] = {"stage": "upload", "code": error_code(upload), "seconds": 0}
                continue
            files["honesty"] = upload.json()["id"]
        before = _job_ids(api)
        started = time.monotonic()
        response = _post(api, work, case, files)  # in-process: validated before it returns
        seconds = time.monotonic() - started
        queued = list(api.queued)
        status, code = outcome(api.clients["alice"], response)
        if status == "queued":
            api.clients["alice"].post(f"/v1/repair-jobs/{response.json()['id']}/cancel")
            api.queued.clear()
        results[name] = {
            "stage": "job",
            "status": status,
            "code": code,
            "details": _details(api, response),
            "seconds": seconds,
            "queued": queued,
            "jobs_added": len(_job_ids(api)) - len(before),
        }
    return results


def _details(api, response) -> dict | None:
    if response.status_code != 201:
        return (response.json().get("error") or {}).get("details")
    job = api.clients["alice"].get(f"/v1/repair-jobs/{response.json()['id']}").json()
    return (job.get("error") or {}).get("details")


def test_the_control_job_is_accepted_under_the_same_limits(api_results):
    assert api_results["control"]["status"] == "queued"


def test_api_refuses_every_hostile_work_case_with_its_code(api_results, work):
    expected = {c.name: c.code for c in work.cases}
    got = {name: r["code"] for name, r in api_results.items() if name != "control"}
    assert got == expected
    # The inputs are read by the validation task: the job is recorded, then failed.
    assert all(
        r["status"] == "failed"
        for r in api_results.values()
        if r.get("stage") == "job" and r["code"]
    )


def test_api_refuses_each_within_its_limit(api_results, work):
    for case in work.cases:
        result = api_results[case.name]
        limit = hw.VALIDATION_TIMEOUT + hw.MARGIN if case.timed else hw.MARGIN
        assert result["seconds"] <= limit, (case.name, result["seconds"])
        if case.timed:  # it really ran into the wall clock, it did not fail early
            assert result["seconds"] >= hw.VALIDATION_TIMEOUT * 0.9, case.name
            assert result["details"]["limit"] == "validation_timeout_seconds"


def test_api_queues_nothing_for_a_refused_case_and_records_only_its_failure(api_results):
    refused = {n: r for n, r in api_results.items() if n != "control" and r["stage"] == "job"}
    assert refused
    assert not [n for n, r in refused.items() if r["queued"]]  # no GPU time
    assert {r["jobs_added"] for r in refused.values()} == {1}  # the failed job, to poll


def test_limit_errors_say_which_limit(api_results):
    result = api_results["job-over-token-limit"]
    assert result["details"]["limit"] == "max_tokens_per_job"
    assert result["details"]["allowed"] == hw.WORK_LIMITS["max_tokens_per_job"]
    assert result["details"]["value"] > result["details"]["allowed"]


def test_no_validation_child_is_left_running(api_results):
    from hcnr_core import bounded

    time.sleep(0.5)
    assert not [p for p in bounded._children if p.is_alive()]


def test_a_running_validation_holds_no_database_connection(api, work: hw.WorkWorld):
    """A validation may run for validation_timeout_seconds (or wait that long for a
    slot): its request gives its pooled connection back first, or 20 of them hold the
    pool and every other request waits (bench/reliability.py --only hostile_work)."""
    from hcnr_core.bounded import warm_up

    warm_up()  # the forkserver's start is not what is measured
    engine = api.app.state.session_factory.kw["bind"]
    toy_files = {p: api.upload("alice", work.toy[p], p).json()["id"] for p in ("honesty", "task")}
    loop = next(c for c in work.cases if c.name == "chat-template-loops")
    idle = engine.pool.checkedout()
    answer: list = []
    thread = threading.Thread(target=lambda: answer.append(_post(api, work, loop, toy_files)))
    started = time.monotonic()
    thread.start()
    time.sleep(3)  # validating now (it takes VALIDATION_TIMEOUT)
    assert thread.is_alive()
    held = engine.pool.checkedout()
    thread.join(60)
    assert outcome(api.clients["alice"], answer[0]) == ("failed", "validation_timeout")
    assert time.monotonic() - started <= hw.VALIDATION_TIMEOUT + hw.MARGIN
    assert held == idle, (held, idle)


def test_validation_without_isolation_runs_in_this_process_under_the_same_limits(
    work: hw.WorkWorld, tmp_path_factory: pytest.TempPathFactory
):
    """`validation_isolation` off: no child process, the check runs here, under the
    limits given (not the environment's) and refuses with the same codes; with it on,
    the same call runs in another process."""
    from hcnr_core import bounded
    from hcnr_core.limits import Limits, current_limits
    from tests.service.service_support import Models, make_inprocess

    off = Limits(validation_isolation=False, max_tokens_per_sample=123)
    assert bounded.run_bounded(os.getpid, (), off) == os.getpid()
    assert bounded.run_bounded(current_limits, (), off).max_tokens_per_sample == 123
    on = Limits(max_tokens_per_sample=123, validation_timeout_seconds=60)
    assert bounded.run_bounded(os.getpid, (), on) != os.getpid()

    toy = work.toy
    models = Models(work.models, toy["honesty"], toy["task"], toy["honesty"], toy["task"])
    limits = {**hw.WORK_LIMITS, "validation_isolation": False}
    inproc = make_inprocess(tmp_path_factory.mktemp("in-process"), models, **limits)
    toy_files = {
        purpose: inproc.upload("alice", toy[purpose], purpose).json()["id"]
        for purpose in ("honesty", "task")
    }
    got = {}
    for name in ("control", "huge-hidden-size", "sample-over-token-limit", "job-over-token-limit"):
        case = next((c for c in work.cases if c.name == name), None)
        files = dict(toy_files)
        if case and case.honesty:
            files["honesty"] = inproc.upload("alice", work.honesty(case), "honesty").json()["id"]
        response = _post(inproc, work, case, files)
        got[name] = outcome(inproc.clients["alice"], response)
    assert got == {
        "control": ("queued", None),
        "huge-hidden-size": ("failed", "checkpoint_too_large"),
        "sample-over-token-limit": ("failed", "too_many_tokens"),  # 2048 here, 32768 default
        "job-over-token-limit": ("failed", "too_many_tokens"),
    }


# --- the CLI -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_results(work: hw.WorkWorld, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("cli-out")
    cases = []
    for case in [None, *work.cases]:
        name = case.name if case else "control"
        argv = [
            "repair",
            "--method", "hcnr",
            "--base", str(work.base(case) if case else work.toy["base"]),
            "--finetuned", str(work.toy["adapter"]),
            "--honesty", str(work.honesty(case) if case else work.toy["honesty"]),
            "--task", str(work.toy["task"]),
            "--out", str(out / name),
            "--no-progress",
            "--set", "check_adapter_base_name=false",
        ]  # fmt: skip
        cases.append({"name": name, "argv": argv})
    env = {k: v for k, v in os.environ.items() if not k.startswith("HCNR_")}
    env.update({f"HCNR_{k.upper()}": str(v) for k, v in hw.WORK_LIMITS.items()})
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")
    process = subprocess.run(
        [sys.executable, str(HERE / "bounded_cli.py"), json.dumps(cases)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    results = {r["name"]: r for r in json.loads(process.stdout.strip().splitlines()[-1])}
    for name, result in results.items():
        result["wrote"] = (out / name).exists() and any((out / name).iterdir())
    return results


def test_cli_control_repairs(cli_results):
    assert cli_results["control"]["exit_code"] == 0, cli_results["control"]["stderr"]


def test_cli_refuses_every_hostile_work_case_with_its_code(cli_results, work):
    wrong = {
        c.name: cli_results[c.name]["stderr"][-300:]
        for c in work.cases
        if cli_results[c.name]["exit_code"] != 2
        or f"[{c.code}]" not in cli_results[c.name]["stderr"]
    }
    assert not wrong


def test_cli_refuses_each_within_its_limit_and_writes_nothing(cli_results, work):
    for case in work.cases:
        result = cli_results[case.name]
        limit = hw.VALIDATION_TIMEOUT + hw.MARGIN if case.timed else hw.MARGIN
        assert result["seconds"] <= limit, (case.name, result["seconds"])
        assert not result["wrote"], case.name


# --- the library: config vs weights --------------------------------------------------------


def test_config_that_does_not_match_its_weights(work: hw.WorkWorld, tmp_path: Path):
    """Within the default limits, a config describing far more than the safetensors
    hold (the meta model would be built from it) is refused before any model exists."""
    import shutil

    from hcnr_core.checkpoint import inspect_checkpoint
    from hcnr_core.errors import CheckpointMismatchError
    from hcnr_core.limits import Limits, use_limits

    with use_limits(Limits()):
        for name, changes in (
            ("wide", {"hidden_size": 4096, "num_hidden_layers": 6}),
            ("deep", {"num_hidden_layers": 4}),  # the weights hold 2 layers
        ):
            target = tmp_path / name
            shutil.copytree(work.toy["base"], target)
            hw._edit_json(target / "config.json", **changes)
            with pytest.raises(CheckpointMismatchError) as caught:
                inspect_checkpoint(target)
            assert caught.value.code == "checkpoint_config_mismatch"
        assert inspect_checkpoint(work.toy["base"]).kind == "full"


# --- the job-level time limit ----------------------------------------------------------------


@pytest.fixture
def timed_api(work: hw.WorkWorld, tmp_path: Path):
    from tests.service.service_support import Models, make_inprocess

    toy = work.toy
    models = Models(work.models, toy["honesty"], toy["task"], toy["honesty"], toy["task"])
    return make_inprocess(
        tmp_path,
        models,
        job_timeout_seconds=1.5,
        job_timeout_grace_seconds=1.0,
        heartbeat_seconds=0.25,
        lease_seconds=5,
    )


def _create_job(inproc, work: hw.WorkWorld, **metadata: str) -> str:
    files = {p: inproc.upload("alice", work.toy[p], p).json()["id"] for p in ("honesty", "task")}
    body = {
        "method": "hcnr",
        "base": "path:base",
        "finetuned": "path:finetuned-adapter",
        "honesty_file": files["honesty"],
        "task_file": files["task"],
        "metadata": metadata,
    }
    response = inproc.clients["alice"].post("/v1/repair-jobs", json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_slow_job_fails_with_timeout(timed_api, work, monkeypatch):
    """Each progress event sleeps 1 s (fault injection): past 1.5 s the job stops at its
    next cancellation check and is failed (timeout), not cancelled, not retried."""
    monkeypatch.setenv("HCNR_ENV", "test")
    monkeypatch.setenv("HCNR_FAULT_INJECTION", "slow_on_label=speed:slow:1")
    job_id = _create_job(timed_api, work, speed="slow")
    started = time.monotonic()
    assert timed_api.run_queued() == ["failed"]
    assert time.monotonic() - started < 1.5 + 1.0 + 5
    job = timed_api.clients["alice"].get(f"/v1/repair-jobs/{job_id}").json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "timeout", job


def test_stuck_job_is_failed_by_its_lease_and_not_renewed(timed_api, work, monkeypatch):
    """A repair stuck where no cancellation check runs (simulated: `_repair` sleeps, deaf
    to cancellation): the lease thread records failed (timeout) after the grace and
    stops renewing; the late result is not recorded over it."""
    from store import repositories
    from store.db import session_scope
    from worker import runner

    def stuck(*_args, **_kwargs):  # whatever `_repair` takes
        time.sleep(5)
        raise RuntimeError("the stuck step returned at last")

    monkeypatch.setattr(runner, "_repair", stuck)
    job_id = _create_job(timed_api, work)
    thread = threading.Thread(target=timed_api.run_queued)
    thread.start()
    time.sleep(1.5 + 1.0 + 1.0)
    factory = timed_api.app.state.session_factory
    with session_scope(factory) as session:
        job = repositories.get_job_by_id(session, job_id)
        status, code, lease = job.status, job.error_code, job.lease_expires_at
    assert thread.is_alive()  # still stuck...
    assert (status, code) == ("failed", "timeout")  # ...but already failed, for good
    time.sleep(0.6)
    with session_scope(factory) as session:  # and the lease is renewed no more
        assert repositories.get_job_by_id(session, job_id).lease_expires_at == lease
    thread.join(10)
    with session_scope(factory) as session:
        job = repositories.get_job_by_id(session, job_id)
        assert (job.status, job.error_code) == ("failed", "timeout")


def test_reconciler_fails_a_lost_job_past_its_limit_instead_of_requeueing(timed_api, work):
    from store import job_state, repositories
    from store.db import session_scope
    from store.models import utcnow
    from worker.reconciler import reconcile_once

    job_id = _create_job(timed_api, work)
    factory = timed_api.app.state.session_factory
    with session_scope(factory) as session:
        assert job_state.claim(session, job_id, "gone:1", 5)
        job = repositories.get_job_by_id(session, job_id)
        job.started_at = utcnow() - timedelta(seconds=10)  # ran past 1.5 s + 1 s grace
        job.lease_expires_at = utcnow() - timedelta(seconds=1)  # and its worker is gone
    changed = reconcile_once(factory, timed_api.settings, lambda _: None)
    assert changed == {job_id: "failed"}
    with session_scope(factory) as session:
        job = repositories.get_job_by_id(session, job_id)
        assert (job.status, job.error_code) == ("failed", "timeout")


# --- hcnr serve and SIGTERM --------------------------------------------------------------------


def test_serve_stops_on_sigterm_within_seconds_with_a_validation_in_flight(work, tmp_path):
    import httpx

    from tests.service import service_procs as procs

    env = procs.service_env(
        env="test",
        data_dir=tmp_path / "data",
        models_root=work.models,
        validation_timeout_seconds=120,  # the in-flight validation would run for minutes
        shutdown_grace_seconds=2,
    )
    key = procs.create_key(env, "alice")
    process, url = procs.start_api(env, tmp_path / "serve.log", worker=True)
    try:
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=url, headers=headers, timeout=180) as client:
            files = {}
            for purpose in ("honesty", "task"):
                path = work.toy[purpose]
                upload = {"file": (path.name, path.read_bytes(), "application/jsonl")}
                files[purpose] = client.post(
                    "/v1/files", files=upload, data={"purpose": purpose}
                ).json()["id"]
            loop = next(c for c in work.cases if c.name == "chat-template-loops")
            body = {
                "method": "hcnr",
                "base": loop.ref,
                "finetuned": "path:finetuned-adapter",
                "honesty_file": files["honesty"],
                "task_file": files["task"],
                "hyperparameters": {"check_adapter_base_name": False},
            }
            created = client.post("/v1/repair-jobs", json=body)  # answers at once...
            assert created.status_code == 201 and created.json()["status"] == "validating"
            time.sleep(3)  # ...and its validation runs now, in serve's validation worker
            job = client.get(f"/v1/repair-jobs/{created.json()['id']}").json()
            assert job["status"] == "validating"  # it would take minutes
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)  # serve only: it must stop the rest
            process.wait(30)
            stopped = time.monotonic() - started
    finally:
        procs.kill_group(process)
    assert stopped < 2 + 5, stopped
