"""Templates: every tenant may list them; importing from host paths and deleting are admin actions (templates
are shared by all tenants, and an import reads the server's own file system)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response
from pydantic import Field

from corral.core.records import TemplateRecord
from corral.errors import InvalidRequest
from corral.server.app import Caller, State, _principal
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
    }


@router.get("", summary="Templates sandboxes can start from", dependencies=[Depends(_principal)])
async def list_templates(state: State) -> dict[str, Any]:
    return {"templates": [template_wire(t) for t in await state.service.templates.list()]}


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


@router.delete("/{name}", status_code=204, summary="Delete a template (admin)")
async def delete_template(name: str, state: State, _: Caller) -> Response:
    await state.service.templates.delete(name)
    return Response(status_code=204)
