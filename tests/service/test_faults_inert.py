"""Fault injection (worker/faults.py) is inert outside the test environment: with
HCNR_FAULT_INJECTION set but HCNR_ENV not `test`, or HCNR_ENV=test but no
HCNR_FAULT_INJECTION, a job carrying the poison and slow labels runs like any other: no
SIGKILL, no sleeps. A positive control (both set) shows the same checks see the faults."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.service.service_support import InProcess, job_body
from worker import faults

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SPEC = "crash_on_label=chaos:yes,slow_on_label=chaos:yes:1"
LABELS = {"chaos": "yes"}


@pytest.fixture
def kills(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """os.kill recorded instead of done when it targets this process: an active fault must
    not take the test run down with it."""
    recorded: list[tuple[int, int]] = []
    real = os.kill

    def kill(pid: int, sig: int) -> None:
        if pid == os.getpid():
            recorded.append((pid, sig))
            return
        real(pid, sig)

    monkeypatch.setattr(os, "kill", kill)
    return recorded


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Sleeps of a second or more (what slow_on_label asks for), recorded, not slept."""
    recorded: list[float] = []
    real = time.sleep

    def sleep(seconds: float) -> None:
        if seconds >= 1.0:
            recorded.append(seconds)
            return
        real(seconds)

    monkeypatch.setattr(time, "sleep", sleep)
    return recorded


ENVIRONMENTS = {
    "injection set, HCNR_ENV unset": {"HCNR_FAULT_INJECTION": SPEC, "HCNR_ENV": None},
    "injection set, HCNR_ENV=production": {"HCNR_FAULT_INJECTION": SPEC, "HCNR_ENV": "production"},
    "HCNR_ENV=test, injection unset": {"HCNR_FAULT_INJECTION": None, "HCNR_ENV": "test"},
    "injection empty, HCNR_ENV=test": {"HCNR_FAULT_INJECTION": "", "HCNR_ENV": "test"},
}


def set_environment(monkeypatch: pytest.MonkeyPatch, values: dict[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


@pytest.mark.parametrize("environment", list(ENVIRONMENTS))
def test_injection_is_inert_outside_the_test_environment(
    environment, monkeypatch, kills, sleeps, inproc: InProcess, alice_files
):
    set_environment(monkeypatch, ENVIRONMENTS[environment])
    assert not faults.enabled()
    assert faults.poison_label() is None
    assert faults.progress_delay(LABELS) == 0.0
    faults.crash_if_poisoned("job_x", LABELS)
    assert kills == []
    if ENVIRONMENTS[environment]["HCNR_FAULT_INJECTION"] != SPEC:
        return
    # The whole job path (where a deployment would have the switch set by mistake): a
    # labelled job runs to the end, without a kill or a sleep.
    body = job_body(alice_files, metadata=LABELS)
    response = inproc.clients["alice"].post("/v1/repair-jobs", json=body)
    assert response.status_code == 201, response.text
    assert inproc.run_queued() == ["succeeded"]
    assert kills == [] and sleeps == []


def test_positive_control_the_same_checks_see_active_faults(
    monkeypatch, kills, sleeps, inproc: InProcess, alice_files
):
    """Both switches on (the reliability tests' setting): the poison job is killed at
    its claim and every progress event of a slow job sleeps."""
    set_environment(monkeypatch, {"HCNR_FAULT_INJECTION": SPEC, "HCNR_ENV": "test"})
    assert faults.enabled() and faults.poison_label() == ("chaos", "yes")
    assert faults.progress_delay(LABELS) == 1.0 and faults.progress_delay({}) == 0.0
    body = job_body(alice_files, metadata=LABELS)
    job_id = inproc.clients["alice"].post("/v1/repair-jobs", json=body).json()["id"]
    inproc.run_queued()  # os.kill recorded, not done: the job then runs on, slowly
    assert kills == [(os.getpid(), signal.SIGKILL)]
    assert sleeps and set(sleeps) == {1.0}
    job = inproc.clients["alice"].get(f"/v1/repair-jobs/{job_id}").json()
    assert job["metadata"] == LABELS


@pytest.fixture(scope="module")
def alice_files(inproc: InProcess, models) -> dict[str, str]:
    return {
        purpose: inproc.upload("alice", path, purpose).json()["id"]
        for purpose, path in (("honesty", models.honesty), ("task", models.task))
    }
