"""Errors of the SDK. Every answer of the API with a non-2xx status becomes an
APIStatusError subclass chosen by the status, carrying the API's `code`, `message`,
`details` and the `param` it names (when the API names one)."""

from __future__ import annotations

from typing import Any

import httpx


class HCNRError(Exception):
    """Base of every error this package raises."""


class APIError(HCNRError):
    """The request reached (or tried to reach) the API and failed."""

    message: str
    request: httpx.Request
    body: object | None
    code: str | None
    param: str | None
    details: Any

    def __init__(
        self,
        message: str,
        request: httpx.Request,
        *,
        body: object | None = None,
        code: str | None = None,
        param: str | None = None,
        details: Any = None,
    ) -> None:
        super().__init__(message)
        self.message, self.request, self.body = message, request, body
        self.code, self.param, self.details = code, param, details


class APIConnectionError(APIError):
    def __init__(self, request: httpx.Request, message: str = "Connection error.") -> None:
        super().__init__(message, request, code="connection_error")


class APITimeoutError(APIConnectionError):
    def __init__(self, request: httpx.Request) -> None:
        super().__init__(request, "Request timed out.")
        self.code = "timeout"


class APIResponseValidationError(APIError):
    """A 2xx answer whose body does not have the documented shape."""

    def __init__(self, response: httpx.Response, body: object, message: str) -> None:
        super().__init__(message, response.request, body=body, code="invalid_response")
        self.response, self.status_code = response, response.status_code


class APIStatusError(APIError):
    """A 4xx or 5xx answer."""

    response: httpx.Response
    status_code: int

    def __init__(
        self,
        message: str,
        *,
        response: httpx.Response,
        body: object | None,
        code: str | None,
        param: str | None = None,
        details: Any = None,
    ) -> None:
        super().__init__(
            message, response.request, body=body, code=code, param=param, details=details
        )
        self.response, self.status_code = response, response.status_code

    def __str__(self) -> str:
        return f"Error code: {self.status_code} [{self.code}] {self.message}"


class BadRequestError(APIStatusError):  # 400
    pass


class AuthenticationError(APIStatusError):  # 401
    pass


class PermissionDeniedError(APIStatusError):  # 403
    pass


class NotFoundError(APIStatusError):  # 404 (also: owned by another tenant)
    pass


class ConflictError(APIStatusError):  # 409: job_not_cancellable, artifacts_not_ready
    pass


class PayloadTooLargeError(APIStatusError):  # 413
    pass


class RangeNotSatisfiableError(APIStatusError):  # 416
    pass


class UnprocessableEntityError(APIStatusError):  # 422: invalid_request, invalid_data, ...
    pass


class RateLimitError(APIStatusError):  # 429
    pass


class InternalServerError(APIStatusError):  # >= 500
    pass


class ChecksumMismatchError(HCNRError):
    """A downloaded artifact's sha256 differs from the one the artifact listing gives."""

    def __init__(self, name: str, expected: str, actual: str) -> None:
        super().__init__(f"{name}: sha256 {actual} differs from the listed {expected}")
        self.code = "checksum_mismatch"
        self.name, self.expected, self.actual = name, expected, actual


class WaitTimeoutError(HCNRError, TimeoutError):
    """`repair_jobs.wait` gave up before the job finished."""

    def __init__(self, job_id: str, status: str, timeout: float) -> None:
        super().__init__(f"job {job_id} is still {status} after {timeout}s")
        self.code = "wait_timeout"
        self.job_id, self.status = job_id, status


STATUS_ERRORS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    416: RangeNotSatisfiableError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}

LOCATIONS = frozenset({"body", "query", "path", "header", "cookie"})


def param_of(error: dict[str, Any]) -> str | None:
    """The request parameter an error names: `param` when the API sends one, else the
    first location of a request-validation error (["body", "honesty_file"] ->
    "honesty_file", ["body", "hyperparameters", "mu"] -> "hyperparameters.mu")."""
    if isinstance(error.get("param"), str):
        return error["param"]
    details = error.get("details")
    if isinstance(details, list) and details and isinstance(details[0], dict):
        loc = [str(part) for part in details[0].get("loc") or []]
        if loc and loc[0] in LOCATIONS:
            loc = loc[1:]
        return ".".join(loc) or None
    return None


def make_status_error(response: httpx.Response) -> APIStatusError:
    """The typed error of a non-2xx answer ({"error": {"code", "message", "details"}})."""
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text[:2000] or None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        code, message = error["code"], str(error.get("message", ""))
        param, details = param_of(error), error.get("details")
    else:
        code, message, param, details = (
            "http_error",
            str(body or response.reason_phrase),
            None,
            None,
        )
    status = response.status_code
    kind = STATUS_ERRORS.get(status) or (InternalServerError if status >= 500 else APIStatusError)
    return kind(message, response=response, body=body, code=code, param=param, details=details)


__all__ = [
    "APIConnectionError",
    "APIError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ChecksumMismatchError",
    "ConflictError",
    "HCNRError",
    "InternalServerError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RangeNotSatisfiableError",
    "RateLimitError",
    "UnprocessableEntityError",
    "WaitTimeoutError",
]
