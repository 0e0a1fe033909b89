"""client.secrets: the tenant's named secrets (`hf_token`: private or gated `hf:` models).
Values go in and never come back: reads return the name and dates only."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import quote

from hcnr_client._base import NOT_GIVEN, NotGiven, Timeout
from hcnr_client.types import Secret, SecretDeleted, SecretList

if TYPE_CHECKING:
    from hcnr_client._client import AsyncHCNRClient, HCNRClient

PATH = "/v1/secrets"


def _path(name: str) -> str:
    return f"{PATH}/{quote(name, safe='')}"


class Secrets:
    def __init__(self, client: HCNRClient) -> None:
        self._client = client

    def set(self, name: str, value: str, *, timeout: Timeout | NotGiven = NOT_GIVEN) -> Secret:
        """Create or replace a secret (stored encrypted), e.g. `set("hf_token", "hf_...")`."""
        response = self._client.request("PUT", _path(name), json={"value": value}, timeout=timeout)
        return Secret.model_validate(response.json())

    def retrieve(self, name: str, *, timeout: Timeout | NotGiven = NOT_GIVEN) -> Secret:
        """Whether it is set and since when; NotFoundError when it is not."""
        return self._client._get(_path(name), Secret, timeout=timeout)

    def list(self, *, timeout: Timeout | NotGiven = NOT_GIVEN) -> SecretList:
        return self._client._get(PATH, SecretList, timeout=timeout)

    def delete(self, name: str, *, timeout: Timeout | NotGiven = NOT_GIVEN) -> SecretDeleted:
        response = self._client.request("DELETE", _path(name), timeout=timeout)
        return SecretDeleted.model_validate(response.json())


class AsyncSecrets:
    def __init__(self, client: AsyncHCNRClient) -> None:
        self._client = client

    async def set(
        self, name: str, value: str, *, timeout: Timeout | NotGiven = NOT_GIVEN
    ) -> Secret:
        response = await self._client.request(
            "PUT", _path(name), json={"value": value}, timeout=timeout
        )
        return Secret.model_validate(response.json())

    async def retrieve(self, name: str, *, timeout: Timeout | NotGiven = NOT_GIVEN) -> Secret:
        return await self._client._get(_path(name), Secret, timeout=timeout)

    async def list(self, *, timeout: Timeout | NotGiven = NOT_GIVEN) -> SecretList:
        return await self._client._get(PATH, SecretList, timeout=timeout)

    async def delete(self, name: str, *, timeout: Timeout | NotGiven = NOT_GIVEN) -> SecretDeleted:
        response = await self._client.request("DELETE", _path(name), timeout=timeout)
        return SecretDeleted.model_validate(response.json())
