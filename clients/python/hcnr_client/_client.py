"""HCNRClient and AsyncHCNRClient: options, the request loop with retries, resources."""

from __future__ import annotations

import asyncio
import time
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from hcnr_client._base import (
    DEFAULT_MAX_RETRIES,
    NOT_GIVEN,
    ClientOptions,
    NotGiven,
    Timeout,
    retry_delay,
    should_retry,
)
from hcnr_client._exceptions import (
    APIConnectionError,
    APIResponseValidationError,
    APITimeoutError,
    make_status_error,
)
from hcnr_client.resources.files import AsyncFiles, Files
from hcnr_client.resources.repair_jobs import AsyncRepairJobs, RepairJobs
from hcnr_client.resources.secrets import AsyncSecrets, Secrets
from hcnr_client.resources.webhook_secret import AsyncWebhookSecrets, WebhookSecrets

M = TypeVar("M", bound=BaseModel)


def _sleep(seconds: float) -> None:  # replaced in the retry tests
    time.sleep(seconds)


async def _asleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


def _parse(response: httpx.Response, model: type[M]) -> M:
    try:
        body = response.json()
    except ValueError as exc:
        raise APIResponseValidationError(response, response.text, "body is not JSON") from exc
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise APIResponseValidationError(response, body, str(exc)) from exc


class HCNRClient:
    """Client of the HCNR repair-job API.

    client = HCNRClient(base_url="http://127.0.0.1:8000", api_key="hcnr_...")
    api_key defaults to $HCNR_API_KEY, base_url to $HCNR_API_URL (else 127.0.0.1:8000);
    failed requests are retried `max_retries` times (408, 409, 429, 5xx, connection errors)
    with exponential backoff or the server's Retry-After.
    """

    files: Files
    webhook_secret: WebhookSecrets
    secrets: Secrets
    repair_jobs: RepairJobs

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | httpx.URL | None = None,
        timeout: Timeout | NotGiven = NOT_GIVEN,
        max_retries: int = DEFAULT_MAX_RETRIES,
        default_headers: dict[str, str] | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        self._options = ClientOptions(api_key, base_url, timeout, max_retries, default_headers)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=self._options.timeout)
        self.files = Files(self)
        self.repair_jobs = RepairJobs(self)
        self.webhook_secret = WebhookSecrets(self)
        self.secrets = Secrets(self)

    @property
    def api_key(self) -> str:
        return self._options.api_key

    @property
    def base_url(self) -> str:
        return self._options.base_url

    @property
    def timeout(self) -> Timeout:
        return self._options.timeout

    @property
    def max_retries(self) -> int:
        return self._options.max_retries

    def with_options(
        self,
        *,
        api_key: str | None = None,
        base_url: str | httpx.URL | None = None,
        timeout: Timeout | NotGiven = NOT_GIVEN,
        max_retries: int | None = None,
        default_headers: dict[str, str] | None = None,
    ) -> HCNRClient:
        """A copy with other options that shares this client's connection pool."""
        copy = HCNRClient(
            api_key=api_key or self.api_key,
            base_url=base_url or self.base_url,
            timeout=self.timeout if isinstance(timeout, NotGiven) else timeout,
            max_retries=self.max_retries if max_retries is None else max_retries,
            default_headers={**self._options.default_headers, **(default_headers or {})},
            http_client=self._http,
        )
        return copy

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> HCNRClient:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    # --- the request loop ---------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Any = None,
        json: Any = None,
        data: Any = None,
        files: Any = None,
        headers: dict[str, str] | None = None,
        timeout: Timeout | NotGiven = NOT_GIVEN,
        stream: bool = False,
    ) -> httpx.Response:
        """One API call with retries; returns the 2xx response (unread when `stream`) or
        raises the typed error. `files` is a callable building the multipart files."""
        retries = 0
        while True:
            request = self._http.build_request(
                method,
                self._options.url(path),
                params=params,
                json=json,
                data=data,
                files=files() if files else None,
                headers=self._options.headers(headers),
                timeout=self._options.timeout_of(timeout),
            )
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                if retries < self.max_retries:
                    _sleep(retry_delay(retries))
                    retries += 1
                    continue
                if isinstance(exc, httpx.TimeoutException):
                    raise APITimeoutError(request) from exc
                raise APIConnectionError(request) from exc
            if response.is_success:
                return response
            response.read()
            response.close()
            if retries < self.max_retries and should_retry(response):
                _sleep(retry_delay(retries, response.headers))
                retries += 1
                continue
            raise make_status_error(response)

    def _get(self, path: str, model: type[M], **kwargs: Any) -> M:
        return _parse(self.request("GET", path, **kwargs), model)

    def _post(self, path: str, model: type[M], **kwargs: Any) -> M:
        return _parse(self.request("POST", path, **kwargs), model)


class AsyncHCNRClient:
    """The asyncio twin of HCNRClient (same options, same resources, awaitable)."""

    files: AsyncFiles
    webhook_secret: AsyncWebhookSecrets
    secrets: AsyncSecrets
    repair_jobs: AsyncRepairJobs

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | httpx.URL | None = None,
        timeout: Timeout | NotGiven = NOT_GIVEN,
        max_retries: int = DEFAULT_MAX_RETRIES,
        default_headers: dict[str, str] | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self._options = ClientOptions(api_key, base_url, timeout, max_retries, default_headers)
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=self._options.timeout)
        self.files = AsyncFiles(self)
        self.repair_jobs = AsyncRepairJobs(self)
        self.webhook_secret = AsyncWebhookSecrets(self)
        self.secrets = AsyncSecrets(self)

    @property
    def api_key(self) -> str:
        return self._options.api_key

    @property
    def base_url(self) -> str:
        return self._options.base_url

    @property
    def timeout(self) -> Timeout:
        return self._options.timeout

    @property
    def max_retries(self) -> int:
        return self._options.max_retries

    def with_options(
        self,
        *,
        api_key: str | None = None,
        base_url: str | httpx.URL | None = None,
        timeout: Timeout | NotGiven = NOT_GIVEN,
        max_retries: int | None = None,
        default_headers: dict[str, str] | None = None,
    ) -> AsyncHCNRClient:
        return AsyncHCNRClient(
            api_key=api_key or self.api_key,
            base_url=base_url or self.base_url,
            timeout=self.timeout if isinstance(timeout, NotGiven) else timeout,
            max_retries=self.max_retries if max_retries is None else max_retries,
            default_headers={**self._options.default_headers, **(default_headers or {})},
            http_client=self._http,
        )

    async def close(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncHCNRClient:
        return self

    async def __aexit__(self, *_: Any) -> None:
        await self.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Any = None,
        json: Any = None,
        data: Any = None,
        files: Any = None,
        headers: dict[str, str] | None = None,
        timeout: Timeout | NotGiven = NOT_GIVEN,
        stream: bool = False,
    ) -> httpx.Response:
        retries = 0
        while True:
            request = self._http.build_request(
                method,
                self._options.url(path),
                params=params,
                json=json,
                data=data,
                files=files() if files else None,
                headers=self._options.headers(headers),
                timeout=self._options.timeout_of(timeout),
            )
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                if retries < self.max_retries:
                    await _asleep(retry_delay(retries))
                    retries += 1
                    continue
                if isinstance(exc, httpx.TimeoutException):
                    raise APITimeoutError(request) from exc
                raise APIConnectionError(request) from exc
            if response.is_success:
                return response
            await response.aread()
            await response.aclose()
            if retries < self.max_retries and should_retry(response):
                await _asleep(retry_delay(retries, response.headers))
                retries += 1
                continue
            raise make_status_error(response)

    async def _get(self, path: str, model: type[M], **kwargs: Any) -> M:
        return _parse(await self.request("GET", path, **kwargs), model)

    async def _post(self, path: str, model: type[M], **kwargs: Any) -> M:
        return _parse(await self.request("POST", path, **kwargs), model)
