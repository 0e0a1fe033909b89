"""client.webhook_secret: the tenant's webhook signing secret (read it, rotate it).

Verify deliveries with `hcnr_client.webhooks.verify(secret, headers, body)`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hcnr_client._base import NOT_GIVEN, NotGiven, Timeout
from hcnr_client.types import WebhookSecret

if TYPE_CHECKING:
    from hcnr_client._client import AsyncHCNRClient, HCNRClient

PATH = "/v1/webhook-secret"


class WebhookSecrets:
    def __init__(self, client: HCNRClient) -> None:
        self._client = client

    def retrieve(self, *, timeout: Timeout | NotGiven = NOT_GIVEN) -> WebhookSecret:
        """The secret that signs this tenant's webhooks (the same until rotated)."""
        return self._client._get(PATH, WebhookSecret, timeout=timeout)

    def rotate(self, *, timeout: Timeout | NotGiven = NOT_GIVEN) -> WebhookSecret:
        """A new secret; deliveries from now on are signed with it."""
        return self._client._post(f"{PATH}/rotate", WebhookSecret, timeout=timeout)


class AsyncWebhookSecrets:
    def __init__(self, client: AsyncHCNRClient) -> None:
        self._client = client

    async def retrieve(self, *, timeout: Timeout | NotGiven = NOT_GIVEN) -> WebhookSecret:
        return await self._client._get(PATH, WebhookSecret, timeout=timeout)

    async def rotate(self, *, timeout: Timeout | NotGiven = NOT_GIVEN) -> WebhookSecret:
        return await self._client._post(f"{PATH}/rotate", WebhookSecret, timeout=timeout)
