"""JSON errors with a stable `code`: {"error": {"code", "message", "details"}}."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.schemas import ErrorResponse
from hcnr_core.errors import DataValidationError, HCNRError, LimitExceededError

log = logging.getLogger("hcnr.api")

# HCNRError codes that are the client's fault map to 422; everything else is ours (500).
CLIENT_ERROR_CODES = {
    "invalid_data",
    "invalid_checkpoint",
    "unsafe_checkpoint",
    "incompatible_checkpoints",
    "unsupported_architecture",
    "invalid_reference",
    "reference_not_found",
    "invalid_hyperparameters",
    "checkpoint_config_mismatch",
    # the limits of hcnr_core.limits (issue 14)
    "limit_exceeded",
    "checkpoint_too_large",
    "too_many_samples",
    "too_many_tokens",
    "data_too_large",
    "validation_timeout",
    "validation_out_of_memory",
}
HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    416: "range_not_satisfiable",
}


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str, details: Any = None):
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details


def not_found(what: str, ident: str) -> APIError:
    return APIError(404, "not_found", f"{what} {ident!r} not found")


def error_response(status: int, code: str, message: str, details: Any = None, headers=None):
    body = {"error": {"code": code, "message": message, "details": details}}
    return JSONResponse(body, status_code=status, headers=headers)


def hcnr_error_details(exc: HCNRError) -> Any:
    if isinstance(exc, DataValidationError):
        return {
            "source": exc.source,
            "problems": [{"line": line, "message": message} for line, message in exc.problems],
        }
    if isinstance(exc, LimitExceededError):
        return exc.details()
    return None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.details)

    @app.exception_handler(HCNRError)
    async def _hcnr_error(_: Request, exc: HCNRError) -> JSONResponse:
        status = 422 if exc.code in CLIENT_ERROR_CODES else 500
        return error_response(status, exc.code, str(exc), hcnr_error_details(exc))

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
