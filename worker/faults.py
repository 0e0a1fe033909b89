"""Fault injection for the reliability tests (tests/reliability, bench/reliability.py).

OFF unless the worker's *environment* sets `HCNR_FAULT_INJECTION` and `HCNR_ENV=test`:
nothing a user sends through the API can switch it on. It is read from `os.environ`, not
from `Settings`, so it is no documented setting and production ignores it.

    HCNR_FAULT_INJECTION="crash_on_label=KEY:VALUE"

makes the pool child that claims a job whose metadata has KEY=VALUE SIGKILL itself right
after the claim, on every attempt: a poison job that kills its worker each time.
"""

from __future__ import annotations

import logging
import os
import signal

ENV = "HCNR_FAULT_INJECTION"

log = logging.getLogger("hcnr.faults")


def enabled() -> bool:
    return bool(os.environ.get(ENV)) and os.environ.get("HCNR_ENV") == "test"


def poison_label() -> tuple[str, str] | None:
    """The (key, value) of `crash_on_label=KEY:VALUE`, when injection is enabled."""
    if not enabled():
        return None
    for part in os.environ[ENV].split(","):
        name, _, argument = part.strip().partition("=")
        if name == "crash_on_label" and ":" in argument:
            key, value = argument.split(":", 1)
            return key, value
    return None


def crash_if_poisoned(job_id: str, labels: dict[str, str]) -> None:
    """Die as hard as a process can (SIGKILL: no cleanup, no ack) for a poison job."""
    label = poison_label()
    if label is not None and labels.get(label[0]) == label[1]:
        log.error("fault injection: job %s is poison; SIGKILL pid %d", job_id, os.getpid())
        os.kill(os.getpid(), signal.SIGKILL)
