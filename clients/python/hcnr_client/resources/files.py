"""client.files: upload and retrieve JSONL files (honesty, task, eval).

The API has no route to list or delete files (GET /v1/files, DELETE /v1/files/{id}), so
there is no `files.list` or `files.delete` here yet."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hcnr_client._base import NOT_GIVEN, FileInput, NotGiven, Timeout, upload_files
from hcnr_client.types import FileObject, FilePurpose

if TYPE_CHECKING:
    from hcnr_client._client import AsyncHCNRClient, HCNRClient


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
