"""E2B's snapshots: a running sandbox captured as a template that only its tenant can start sandboxes from.

Corral's snapshot is exactly that (``SandboxService.snapshot``, files and, where the runtime can, memory), so an
E2B ``snapshotID`` is the Corral template name, a sandbox is created from it with ``templateID: <snapshotID>``,
and ``DELETE /templates/{id}`` deletes it (a tenant may delete only its own).
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import Query, Response
from fastapi.responses import JSONResponse
from pydantic import Field

from corral.ids import TenantId
from corral.server.app import State, TenantCaller
from corral.server.e2b._wire import (
    after_token,
    corral_template,
    e2b_router,
    page_token,
    visible,
)
from corral.server.e2b.sandboxes import MAX_PAGE, _Body

__all__ = ["router"]

router = e2b_router()


class NewSnapshot(_Body):
    name: Annotated[str, Field(min_length=1, max_length=63)] | None = None
    memory: bool | None = None  # Corral keeps memory exactly when the runtime can (TemplateInfo.memory)


def _snapshot(name: str) -> dict[str, Any]:
    return {"snapshotID": name, "names": [name]}


@router.post("/sandboxes/{sandbox_id}/snapshots", status_code=201, summary="E2B: snapshot a running sandbox")
async def create_snapshot(
    sandbox_id: str, state: State, tenant: TenantCaller, body: NewSnapshot | None = None
) -> dict[str, Any]:
    await visible_sandbox(state, sandbox_id, tenant)
    name = body.name if body is not None and body.name else f"snapshot-{secrets.token_hex(6)}"
    info = await state.service.snapshot(sandbox_id, name, tenant=tenant)
    return _snapshot(info.name)


async def visible_sandbox(state: State, sandbox_id: str, tenant: TenantId) -> None:
    visible(await state.service.get(sandbox_id, tenant=tenant))


@router.get("/snapshots", summary="E2B: the caller's snapshots, newest first, one page at a time")
async def list_snapshots(
    state: State,
    tenant: TenantCaller,
    sandbox_id: Annotated[str | None, Query(alias="sandboxID", max_length=64)] = None,
    name: Annotated[str | None, Query(max_length=128)] = None,
    next_token: Annotated[str | None, Query(alias="nextToken", max_length=512)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
) -> JSONResponse:
    found = [
        t
        for t in await state.service.list_templates(tenant=tenant)
        if t.kind == "snapshot" and t.owner == str(tenant)
    ]
    if sandbox_id:
        found = [t for t in found if t.source == sandbox_id]
    if name:
        found = [t for t in found if t.name == name]
    found.sort(key=lambda t: (t.created_at, t.name), reverse=True)
    if next_token:
        start = after_token(next_token)
        found = [t for t in found if (t.created_at, t.name) < start]
    page = found[:limit]
    headers = {"x-next-token": page_token((page[-1].created_at, page[-1].name))} if len(found) > limit else {}
    return JSONResponse([_snapshot(t.name) for t in page], headers=headers)


@router.delete(
    "/templates/{template_id}", status_code=204, summary="E2B: delete a snapshot (or own template)"
)
async def delete_template(template_id: str, state: State, tenant: TenantCaller) -> Response:
    await state.service.delete_own_template(corral_template(template_id), tenant=tenant)
    return Response(status_code=204)
