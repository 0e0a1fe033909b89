"""client.files: upload, retrieve, list and delete JSONL files (honesty, task, eval)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hcnr_client._base import NOT_GIVEN, FileInput, NotGiven, Timeout, upload_files
from hcnr_client.pagination import AsyncPage, AsyncPaginator, SyncPage
from hcnr_client.types import FileDeleted, FileObject, FilePurpose

if TYPE_CHECKING:
    from hcnr_client._client import AsyncHCNRClient, HCNRClient


def _list_params(after: str | None, limit: int | None, purpose: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if after is not None:
        params["after"] = after
    if limit is not None:
        params["limit"] = limit
    if purpose is not None:
        params["purpose"] = purpose
    return params


def _file_path(file_id: str) -> str:
    from urllib.parse import quote

    return f"/v1/files/{quote(file_id, safe='')}"


class Files:
    def __init__(self, client: HCNRClient) -> None:
        self._client = client

    def create(
        self, *, file: FileInput, purpose: FilePurpose, timeout: Timeout | NotGiven = NOT_GIVEN
    ) -> FileObject:
        """Upload a JSONL file (a path, bytes, a binary file object or (name, content)); the
        API validates it at once (UnprocessableEntityError code invalid_data, with
        line-numbered problems in `details`)."""
        return self._client._post(
            "/v1/files",
            FileObject,
            files=upload_files(file),
            data={"purpose": purpose},
            timeout=timeout,
        )

    def retrieve(self, file_id: str, *, timeout: Timeout | NotGiven = NOT_GIVEN) -> FileObject:
        return self._client._get(_file_path(file_id), FileObject, timeout=timeout)

    def list(
        self,
        *,
        after: str | None = None,
        limit: int | None = None,
        purpose: FilePurpose | None = None,
        timeout: Timeout | NotGiven = NOT_GIVEN,
    ) -> SyncPage[FileObject]:
        """Files, newest first; iterating the page walks every later page (`after` is the
        id of the last file of a previous page)."""
        response = self._client.request(
            "GET", "/v1/files", params=_list_params(after, limit, purpose), timeout=timeout
        )
        body = response.json()
        return SyncPage(
            data=[FileObject.model_validate(item) for item in body["data"]],
            has_more=body["has_more"],
            next_cursor=body.get("last_id"),
            fetch=lambda last: self.list(after=last, limit=limit, purpose=purpose, timeout=timeout),
        )

    def delete(self, file_id: str, *, timeout: Timeout | NotGiven = NOT_GIVEN) -> FileDeleted:
        """Delete a file (its data goes at once); ConflictError (file_in_use) while an
        unfinished job reads it."""
        response = self._client.request("DELETE", _file_path(file_id), timeout=timeout)
        return FileDeleted.model_validate(response.json())


class AsyncFiles:
    def __init__(self, client: AsyncHCNRClient) -> None:
        self._client = client

    async def create(
        self, *, file: FileInput, purpose: FilePurpose, timeout: Timeout | NotGiven = NOT_GIVEN
    ) -> FileObject:
        return await self._client._post(
            "/v1/files",
            FileObject,
            files=upload_files(file),
            data={"purpose": purpose},
            timeout=timeout,
        )

    async def retrieve(
        self, file_id: str, *, timeout: Timeout | NotGiven = NOT_GIVEN
    ) -> FileObject:
        return await self._client._get(_file_path(file_id), FileObject, timeout=timeout)

    def list(
        self,
        *,
        after: str | None = None,
        limit: int | None = None,
        purpose: FilePurpose | None = None,
        timeout: Timeout | NotGiven = NOT_GIVEN,
    ) -> AsyncPaginator[FileObject]:
        """`await` it for one page, or `async for file in ...` for every file."""

        async def page(last: str | None) -> AsyncPage[FileObject]:
            response = await self._client.request(
                "GET", "/v1/files", params=_list_params(last, limit, purpose), timeout=timeout
            )
            body = response.json()
            return AsyncPage(
                data=[FileObject.model_validate(item) for item in body["data"]],
                has_more=body["has_more"],
                next_cursor=body.get("last_id"),
                fetch=page,
            )

        return AsyncPaginator(lambda: page(after))

    async def delete(self, file_id: str, *, timeout: Timeout | NotGiven = NOT_GIVEN) -> FileDeleted:
        response = await self._client.request("DELETE", _file_path(file_id), timeout=timeout)
        return FileDeleted.model_validate(response.json())
