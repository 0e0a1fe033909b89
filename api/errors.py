"""JSON errors with a stable `code`: {"error": {"code", "message", "details"}}."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.schemas import ErrorResponse
from hcnr_core.errors import HCNRError

log = logging.getLogger("hcnr.api")

# The one table from error code to HTTP status. Services and routes raise
# `APIError(code, message)` or hcnr_core's `HCNRError` (domain errors, no status); the
# handlers below, the dashboard and the OpenAPI document all read the status from here.
# A code missing from the table is a server error (500).
CLIENT_ERROR_CODES = {  # hcnr_core's codes that are the client's fault (422)
    "invalid_data",
    "invalid_checkpoint",
    "unsafe_checkpoint",
    "incompatible_checkpoints",
    "unsupported_architecture",
    "invalid_reference",
    "reference_not_found",
    "invalid_hyperparameters",
    "checkpoint_config_mismatch",
    "no_worker_fits",  # POST /v1/repair-jobs/estimate: no worker has the memory
    # the limits of hcnr_core.limits (issue 14)
    "limit_exceeded",
    "checkpoint_too_large",
    "too_many_samples",
    "too_many_tokens",
    "data_too_large",
    "validation_timeout",
    "validation_out_of_memory",
    # hf: and s3:// models (store/remote_models.py; recorded on the failed job)
    "hub_access_denied",
    "revision_not_found",
}
STATUS_OF_CODE: dict[str, int] = {
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "job_not_cancellable": 409,
    "artifacts_not_ready": 409,
    "idempotency_conflict": 409,
    "file_in_use": 409,
    "job_not_finished": 409,
    "artifacts_expired": 410,
    "payload_too_large": 413,
    "range_not_satisfiable": 416,
    "invalid_request": 422,
    "invalid_cursor": 422,
    "invalid_file_purpose": 422,
    "invalid_webhook_url": 422,
    "hub_token_missing": 422,  # push_to_hub without the tenant's hf_token secret
    "invalid_integration": 422,  # a tracker integration the service refuses (file: URI, ...)
    **dict.fromkeys(CLIENT_ERROR_CODES, 422),
    "internal_error": 500,
    # the hub or S3 cannot be reached and the model is not cached: retry later
    "model_source_unavailable": 503,
}
# Starlette's own HTTP errors (routing, body parsing) by status.
HTTP_CODES = {
    STATUS_OF_CODE[code]: code
    for code in (
        "bad_request",
        "unauthorized",
        "forbidden",
        "not_found",
        "method_not_allowed",
        "payload_too_large",
        "range_not_satisfiable",
    )
}


def status_of(code: str) -> int:
    """The HTTP status of an error code (500 for a code the table does not know)."""
    return STATUS_OF_CODE.get(code, 500)


class APIError(Exception):
    """A refusal with a stable `code`; its HTTP status comes from `STATUS_OF_CODE`."""

    def __init__(self, code: str, message: str, details: Any = None):
        if code not in STATUS_OF_CODE:
            raise ValueError(f"error code {code!r} is not in api.errors.STATUS_OF_CODE")
        super().__init__(message)
        self.code, self.message, self.details = code, message, details

    @property
    def status(self) -> int:
        return STATUS_OF_CODE[self.code]


def not_found(what: str, ident: str) -> APIError:
    return APIError("not_found", f"{what} {ident!r} not found")


def error_response(status: int, code: str, message: str, details: Any = None, headers=None):
    body = {"error": {"code": code, "message": message, "details": details}}
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.details)

    @app.exception_handler(HCNRError)
    async def _hcnr_error(_: Request, exc: HCNRError) -> JSONResponse:
        return error_response(status_of(exc.code), exc.code, str(exc), exc.details())

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"loc": list(e.get("loc", ())), "message": e.get("msg", "")} for e in exc.errors()
        ]
        return error_response(422, "invalid_request", "the request is invalid", details)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal_error", "internal server error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Malformed request body (code bad_request)",
        401: "Missing or invalid API key",
        404: "Not found (or owned by another tenant)",
        422: "Invalid request or input (see error.code)",
    }.items()
}
