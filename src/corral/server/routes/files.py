"""Files: streamed download and upload (the body goes straight to the agent in chunks), list, stat, mkdir,
remove, rename. Paths are paths inside the sandbox; ``user`` picks whose permissions apply."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse

from corral.server.app import State, TenantCaller
from corral.server.routes._stream import prefetched
from corral.server.schemas import MakeDirBody, RenameBody

router = APIRouter(prefix="/v1/sandboxes/{sandbox_id}/files", tags=["files"])

PathQ = Annotated[str, Query(min_length=1, max_length=4096, description="a path inside the sandbox")]
UserQ = Annotated[str | None, Query(max_length=64)]


@router.get(
    "",
    summary="Download a file (streamed)",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def download(
    sandbox_id: str, path: PathQ, state: State, tenant: TenantCaller, user: UserQ = None
) -> StreamingResponse:
    chunks = await prefetched(await state.service.read_file(sandbox_id, path, user=user, tenant=tenant))
    return StreamingResponse(chunks, media_type="application/octet-stream")


@router.put(
    "",
    summary="Upload a file: the raw request body, streamed; replaces the file atomically",
    openapi_extra={
        "requestBody": {
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
        }
    },
)
async def upload(
    sandbox_id: str, path: PathQ, request: Request, state: State, tenant: TenantCaller, user: UserQ = None
) -> dict[str, Any]:
    async def body() -> AsyncIterator[bytes]:
        async for chunk in request.stream():
            if chunk:
                yield chunk

    written = await state.service.write_file(sandbox_id, path, body(), user=user, tenant=tenant)
    return {"path": path, "bytes": written}


@router.get("/list", summary="List a directory, down to depth levels")
async def list_dir(
    sandbox_id: str,
    path: PathQ,
    state: State,
    tenant: TenantCaller,
    depth: Annotated[int, Query(ge=1, le=32)] = 1,
    user: UserQ = None,
) -> dict[str, Any]:
    entries = await state.service.list_dir(sandbox_id, path, depth=depth, user=user, tenant=tenant)
    return {"entries": [e.to_wire() for e in entries]}


@router.get("/stat", summary="Stat one path")
async def stat(
    sandbox_id: str, path: PathQ, state: State, tenant: TenantCaller, user: UserQ = None
) -> dict[str, Any]:
    return (await state.service.stat(sandbox_id, path, user=user, tenant=tenant)).to_wire()


@router.post("/mkdir", summary="Make a directory and its parents")
async def make_dir(sandbox_id: str, body: MakeDirBody, state: State, tenant: TenantCaller) -> dict[str, Any]:
    created = await state.service.make_dir(sandbox_id, body.path, user=body.user, tenant=tenant)
    return {"path": body.path, "created": created}


@router.delete("", status_code=204, summary="Remove a file, or a directory with recursive=true")
async def remove(
    sandbox_id: str,
    path: PathQ,
    state: State,
    tenant: TenantCaller,
    recursive: bool = False,
    user: UserQ = None,
) -> Response:
    await state.service.remove(sandbox_id, path, recursive=recursive, user=user, tenant=tenant)
    return Response(status_code=204)


@router.post("/rename", status_code=204, summary="Rename or move a path")
async def rename(sandbox_id: str, body: RenameBody, state: State, tenant: TenantCaller) -> Response:
    await state.service.rename(
        sandbox_id, body.src, body.dst, overwrite=body.overwrite, user=body.user, tenant=tenant
    )
    return Response(status_code=204)
