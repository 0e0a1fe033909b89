"""Artifacts of a succeeded job: list, single files (HTTP Range), a tar of all, the report."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Header
from fastapi.responses import StreamingResponse

from api import services
from api.deps import SessionDep, StorageDep, TenantDep
from api.errors import ERROR_RESPONSES, APIError
from api.routing import ReleasingRoute
from api.schemas import ArtifactList, ArtifactPublic
from store import repositories

router = APIRouter(
    prefix="/v1/repair-jobs",
    tags=["artifacts"],
    responses=ERROR_RESPONSES,
    route_class=ReleasingRoute,
)
RANGE = re.compile(r"bytes=(\d*)-(\d*)")
NOT_READY = {409: {"description": "The job has not succeeded (code artifacts_not_ready)"}}


@router.get("/{job_id}/artifacts", response_model=ArtifactList, responses=NOT_READY)
def list_artifacts(job_id: str, tenant: TenantDep, session: SessionDep) -> ArtifactList:
    """Every file of the repaired checkpoint, with its size and sha256."""
    job = services.job_with_artifacts(session, tenant, job_id)
    return ArtifactList(
        data=[
            ArtifactPublic(
                name=a.name,
                bytes=a.bytes,
                sha256=a.sha256,
                url=f"/v1/repair-jobs/{job.id}/artifacts/{a.name}",
            )
            for a in repositories.list_artifacts(session, job.id)
        ]
    )


def parse_range(header: str, size: int) -> tuple[int, int]:
    """One `bytes=a-b`, `bytes=a-` or `bytes=-n` range -> inclusive (start, end)."""
    match = RANGE.fullmatch(header.strip())
    if not match or match.groups() == ("", ""):
        raise APIError("range_not_satisfiable", f"unsupported Range {header!r}")
    first, last = match.groups()
    if first == "":
        start, end = max(0, size - int(last)), size - 1
    else:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        raise APIError("range_not_satisfiable", f"range outside the {size}-byte file")
    return start, end


@router.get(
    "/{job_id}/artifacts/{name}",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        206: {"description": "Partial content (Range)"},
        416: {"description": "Range not satisfiable"},
        **NOT_READY,
    },
)
def download_artifact(
    job_id: str,
    name: str,
    tenant: TenantDep,
    session: SessionDep,
    storage: StorageDep,
    range_header: Annotated[str | None, Header(alias="Range")] = None,
) -> StreamingResponse:
    """One file; honours a single HTTP Range."""
    artifact = services.get_artifact(session, tenant, job_id, name)
    headers = {"Accept-Ranges": "bytes", "ETag": f'"{artifact.sha256}"'}
    start, end, status = 0, artifact.bytes - 1, 200
    if range_header:
        try:
            start, end = parse_range(range_header, artifact.bytes)
        except APIError as exc:
            exc.details = {"size": artifact.bytes}
            raise
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{artifact.bytes}"
    headers["Content-Length"] = str(max(0, end - start + 1))
    headers["Content-Disposition"] = f'attachment; filename="{artifact.name}"'
    return StreamingResponse(
        services.read_range(storage, artifact.storage_key, start, end),
        status_code=status,
        media_type="application/octet-stream",
        headers=headers,
    )


@router.get(
    "/{job_id}/checkpoint.tar",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-tar": {}}}, **NOT_READY},
)
def download_checkpoint(
    job_id: str, tenant: TenantDep, session: SessionDep, storage: StorageDep
) -> StreamingResponse:
    """The whole repaired checkpoint as one streamed tar archive (`<job_id>/<file>`)."""
    job = services.job_with_artifacts(session, tenant, job_id)
    artifacts = repositories.list_artifacts(session, job.id)
    return StreamingResponse(
        services.tar_stream(storage, job.id, artifacts),
        media_type="application/x-tar",
        headers={"Content-Disposition": f'attachment; filename="{job.id}.tar"'},
    )


@router.get("/{job_id}/report", response_model=dict[str, Any], responses=NOT_READY)
def get_report(job_id: str, tenant: TenantDep, session: SessionDep) -> dict[str, Any]:
    """The repair report (hcnr_report.json)."""
    return services.succeeded_job(session, tenant, job_id).report or {}
