"""Fault injection for the reliability tests (tests/reliability, bench/reliability.py).

OFF unless the worker's *environment* sets `HCNR_FAULT_INJECTION` and `HCNR_ENV=test`:
nothing a user sends through the API can switch it on. It is read from `os.environ`, not
from `Settings`, so it is no documented setting and production ignores it.

    HCNR_FAULT_INJECTION="crash_on_label=KEY:VALUE"

makes the pool child that claims a job whose metadata has KEY=VALUE SIGKILL itself right
after the claim, on every attempt: a poison job that kills its worker each time.

    HCNR_FAULT_INJECTION="slow_on_label=KEY:VALUE:SECONDS"

makes every progress event of such a job sleep SECONDS (at most 1): a job long enough to
cancel mid-run on any machine, however fast. Parts combine with commas.
"""

from __future__ import annotations

import logging
import os
import signal

ENV = "HCNR_FAULT_INJECTION"

log = logging.getLogger("hcnr.faults")


def enabled() -> bool:
    return bool(os.environ.get(ENV)) and os.environ.get("HCNR_ENV") == "test"


def _argument(fault: str) -> str | None:
    if not enabled():
        return None
    for part in os.environ[ENV].split(","):
        name, _, argument = part.strip().partition("=")
        if name == fault:
            return argument
    return None


def poison_label() -> tuple[str, str] | None:
    """The (key, value) of `crash_on_label=KEY:VALUE`, when injection is enabled."""
    argument = _argument("crash_on_label")
    if argument is None or ":" not in argument:
        return None
    key, value = argument.split(":", 1)
    return key, value


def progress_delay(labels: dict[str, str]) -> float:
    """Seconds each progress event of this job sleeps (`slow_on_label`); 0 normally."""
    argument = _argument("slow_on_label")
    parts = argument.split(":") if argument else []
    if len(parts) != 3 or labels.get(parts[0]) != parts[1]:
        return 0.0
    try:
        return min(max(float(parts[2]), 0.0), 1.0)
    except ValueError:
        return 0.0


def crash_if_poisoned(job_id: str, labels: dict[str, str]) -> None:
    """Die as hard as a process can (SIGKILL: no cleanup, no ack) for a poison job."""
    label = poison_label()
    if label is not None and labels.get(label[0]) == label[1]:
        log.error("fault injection: job %s is poison; SIGKILL pid %d", job_id, os.getpid())
        os.kill(os.getpid(), signal.SIGKILL)
