"""/v1/files: JSONL uploads (honesty, task, eval)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, UploadFile

from api import services
from api.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from api.errors import ERROR_RESPONSES
from api.routing import ReleasingRoute
from api.schemas import ErrorResponse, FileDeleted, FileList, FilePublic, FilePurpose
from store.models import File

router = APIRouter(
    prefix="/v1/files", tags=["files"], responses=ERROR_RESPONSES, route_class=ReleasingRoute
)


def file_public(file: File) -> FilePublic:
    return FilePublic.model_validate(file, from_attributes=True)


@router.post(
    "",
    status_code=201,
    response_model=FilePublic,
    responses={413: {"model": ErrorResponse, "description": "File over the size limit"}},
)
def upload_file(
    tenant: TenantDep,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    file: UploadFile,
    purpose: Annotated[FilePurpose, Form()],
) -> FilePublic:
    """Upload a JSONL file; it is validated at once (line-numbered errors)."""
    stored = services.store_upload(session, storage, settings, tenant, file, purpose)
    return file_public(stored)


@router.get("/{file_id}", response_model=FilePublic)
def get_file(file_id: str, tenant: TenantDep, session: SessionDep) -> FilePublic:
    return file_public(services.get_file(session, tenant, file_id))


@router.get("", response_model=FileList)
def list_files(
    tenant: TenantDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(description="last_id of the previous page")] = None,
    purpose: FilePurpose | None = None,
) -> FileList:
    """The tenant's files, newest first (`after`, `limit`, `has_more` as in OpenAI's API)."""
    files, has_more = services.list_files(session, tenant, limit, purpose, after)
    return FileList(
        data=[file_public(f) for f in files],
        has_more=has_more,
        last_id=files[-1].id if files else None,
    )


@router.delete(
    "/{file_id}",
    response_model=FileDeleted,
    responses={409: {"model": ErrorResponse, "description": "Read by an unfinished job"}},
)
def delete_file(
    file_id: str, tenant: TenantDep, session: SessionDep, storage: StorageDep
) -> FileDeleted:
    """Delete a file: its stored data goes at once; it is then unknown to every route.
    Refused (409 `file_in_use`) while a job that has not finished reads it."""
    file = services.delete_file(session, storage, tenant, file_id)
    return FileDeleted(id=file.id, deleted=True)
