"""Templates: every tenant may list them; importing from host paths and deleting shared templates are admin
actions (they serve all tenants, and an import reads the server's own file system). A tenant deletes its own
snapshots."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response
from fastapi.responses import StreamingResponse
from pydantic import Field

from corral.core.auth import Principal
from corral.core.records import TemplateRecord
from corral.errors import InvalidRequest
from corral.models import BuildParams
from corral.server.app import Caller, State, _principal
from corral.server.routes._stream import NDJSON, ndjson_response
from corral.server.schemas import _Strict

router = APIRouter(prefix="/v1/templates", tags=["templates"])


class ImportBody(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=63)]
    directory: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    tarball: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    description: Annotated[str, Field(max_length=1024)] = ""


def template_wire(record: TemplateRecord) -> dict[str, Any]:
    return {
        "name": record.name,
        "kind": record.kind,
        "description": record.description,
        "created_at": record.created_at,
        "memory": record.memory is not None,
    }


@router.get("", summary="Templates the caller can start sandboxes from (admins see all)")
async def list_templates(
    state: State, principal: Annotated[Principal, Depends(_principal)]
) -> dict[str, Any]:
    if principal.tenant_id is None:
        records = await state.service.templates.list()
    else:
        records = await state.service.list_templates(tenant=principal.tenant_id)
    return {"templates": [template_wire(t) for t in records]}


@router.post("", status_code=201, summary="Import a directory or tarball on the server host (admin)")
async def import_template(body: ImportBody, state: State, _: Caller) -> dict[str, Any]:
    from pathlib import Path

    if (body.directory is None) == (body.tarball is None):
        raise InvalidRequest("give exactly one of directory and tarball")
    registry = state.service.templates
    if body.directory is not None:
        record = await registry.import_directory(
            body.name, Path(body.directory), description=body.description
        )
    else:
        assert body.tarball is not None
        record = await registry.import_tarball(body.name, Path(body.tarball), description=body.description)
    return template_wire(record)


class BuildBody(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=63)]
    source: Annotated[str, Field(min_length=1, max_length=4096)]
    steps: Annotated[list[Annotated[str, Field(max_length=131072)]], Field(max_length=256)] = Field(
        default_factory=list
    )
    env: dict[Annotated[str, Field(max_length=256)], Annotated[str, Field(max_length=32768)]] = Field(
        default_factory=dict
    )
    workdir: Annotated[str, Field(max_length=4096)] | None = None
    user: Annotated[str, Field(max_length=64)] | None = None
    start_cmd: Annotated[str, Field(max_length=131072)] | None = None
    ready_cmd: Annotated[str, Field(max_length=131072)] | None = None
    registry_username: Annotated[str, Field(max_length=256)] | None = None
    registry_password: Annotated[str, Field(max_length=4096)] | None = None
    registry_token: Annotated[str, Field(max_length=16384)] | None = None
    insecure_registry: bool = False
    isolation: Annotated[str, Field(max_length=64)] | None = None
    description: Annotated[str, Field(max_length=1024)] = ""


@router.post(
    "/build",
    summary="Build a template from an image, directory, tarball or debootstrap, plus steps (admin); "
    "progress streams as NDJSON",
    responses={200: {"content": {NDJSON: {}}}},
)
async def build_template(body: BuildBody, state: State, _: Caller) -> StreamingResponse:
    # Admin only: a source may be a path on the server host, and templates are shared by every tenant.
    # not prefetched: the build's generator holds a task group, so it runs wholly in the response's task
    # (prefetching entered it in this one and left it in that one: the stream broke off after "done")
    events = await state.service.build_template(BuildParams(**body.model_dump()))
    return ndjson_response(events, lambda e: e.to_wire())


@router.delete("/{name}", status_code=204, summary="Delete a template: your own snapshot, or any (admin)")
async def delete_template(
    name: str, state: State, principal: Annotated[Principal, Depends(_principal)]
) -> Response:
    if principal.admin or principal.tenant_id is None:
        await state.service.templates.delete(name)
    else:
        await state.service.delete_own_template(name, tenant=principal.tenant_id)
    return Response(status_code=204)
