"""One table maps every error code to its HTTP status (api.errors.STATUS_OF_CODE)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import hcnr_core.errors as core_errors
from api.errors import STATUS_OF_CODE, APIError, status_of

API = Path(__file__).resolve().parents[2] / "api"
# hcnr_core codes that never answer a request: raised while a job runs (its status says
# failed/cancelled/timeout) or by CLI-only commands. Anything else must be in the table.
NOT_REQUEST_ERRORS = {
    "hcnr_error",
    "cancelled",
    "timeout",
    "no_acceptable_candidate",
    "insufficient_data",
    "output_exists",
    "invalid_gguf",
    "model_not_installed",
}


def test_every_code_the_api_raises_is_in_the_table():
    raised = set()
    for path in API.rglob("*.py"):
        raised |= set(re.findall(r'APIError\(\s*"([a-z_]+)"', path.read_text(encoding="utf-8")))
    assert raised and raised <= set(STATUS_OF_CODE), raised - set(STATUS_OF_CODE)


def test_every_library_error_code_has_a_deliberate_status():
    codes = {
        cls.code
        for cls in vars(core_errors).values()
        if isinstance(cls, type) and issubclass(cls, core_errors.HCNRError)
    }
    undecided = codes - set(STATUS_OF_CODE) - NOT_REQUEST_ERRORS
    assert not undecided, (
        f"add these to api.errors.STATUS_OF_CODE (or NOT_REQUEST_ERRORS): {undecided}"
    )
    assert status_of("too_many_tokens") == 422 and status_of("cancelled") == 500


def test_an_unknown_code_is_a_programming_error():
    with pytest.raises(ValueError, match="STATUS_OF_CODE"):
        APIError("made_up_code", "x")
    assert APIError("job_not_cancellable", "x").status == 409
