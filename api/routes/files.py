"""/v1/files: JSONL uploads (honesty, task, eval)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, UploadFile

from api import services
from api.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from api.errors import ERROR_RESPONSES
from api.routing import ReleasingRoute
from api.schemas import ErrorResponse, FilePublic, FilePurpose
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
