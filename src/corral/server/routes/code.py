"""The code interpreter: run a cell (events stream as NDJSON), and manage contexts (one kernel each)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Response
from fastapi.responses import StreamingResponse
from pydantic import Field

from corral.errors import InvalidRequest
from corral.models import CodeEvent, RunCodeParams
from corral.server.app import Caller, State, TenantCaller
from corral.server.routes._stream import NDJSON, ndjson_response, prefetched
from corral.server.schemas import _Strict

router = APIRouter(prefix="/v1/sandboxes/{sandbox_id}/code", tags=["code interpreter"])
templates_router = APIRouter(prefix="/v1/templates", tags=["templates"])


class RunCodeBody(_Strict):
    code: Annotated[str, Field(max_length=4 * 1024 * 1024)]
    language: Annotated[str, Field(max_length=32)] | None = None
    context_id: Annotated[str, Field(max_length=128)] | None = None
    envs: dict[Annotated[str, Field(max_length=256)], Annotated[str, Field(max_length=32768)]] = Field(
        default_factory=dict
    )
    timeout: Annotated[float, Field(gt=0)] | None = None


class ContextBody(_Strict):
    language: Annotated[str, Field(max_length=32)] | None = None
    cwd: Annotated[str, Field(max_length=4096)] | None = None


class CodeTemplateBody(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=63)] = "code-interpreter"


def _wire(event: CodeEvent) -> dict[str, Any]:
    return event.to_wire()


@router.post(
    "/execute",
    summary="Run a cell; stdout, stderr, results and errors stream as NDJSON",
    responses={200: {"content": {NDJSON: {}}}},
)
async def execute(
    sandbox_id: str, body: RunCodeBody, state: State, tenant: TenantCaller
) -> StreamingResponse:
    if body.envs:  # a request this server cannot honour is the caller's to change: 400, not 501
        raise InvalidRequest("per-cell environment variables are not supported; set envs on the sandbox")
    events = await state.service.run_code(sandbox_id, RunCodeParams(**body.model_dump()), tenant=tenant)
    return ndjson_response(await prefetched(events), _wire)


@router.post("/contexts", status_code=201, summary="Create an interpreter context (python, javascript, bash)")
async def create_context(
    sandbox_id: str, body: ContextBody, state: State, tenant: TenantCaller
) -> dict[str, Any]:
    ctx = await state.service.create_code_context(
        sandbox_id, language=body.language, cwd=body.cwd, tenant=tenant
    )
    return ctx.to_wire()


@router.get("/contexts", summary="Interpreter contexts of the sandbox")
async def list_contexts(sandbox_id: str, state: State, tenant: TenantCaller) -> dict[str, Any]:
    return {
        "contexts": [c.to_wire() for c in await state.service.list_code_contexts(sandbox_id, tenant=tenant)]
    }


@router.post(
    "/contexts/{context_id}/restart", status_code=204, summary="Restart a context (its state is lost)"
)
async def restart(sandbox_id: str, context_id: str, state: State, tenant: TenantCaller) -> Response:
    await state.service.restart_code_context(sandbox_id, context_id, tenant=tenant)
    return Response(status_code=204)


@router.post("/contexts/{context_id}/interrupt", status_code=204, summary="Interrupt the running cell")
async def interrupt(sandbox_id: str, context_id: str, state: State, tenant: TenantCaller) -> Response:
    await state.service.interrupt_code_context(sandbox_id, context_id, tenant=tenant)
    return Response(status_code=204)


@router.delete("/contexts/{context_id}", status_code=204, summary="Remove a context and its kernel")
async def remove(sandbox_id: str, context_id: str, state: State, tenant: TenantCaller) -> Response:
    await state.service.remove_code_context(sandbox_id, context_id, tenant=tenant)
    return Response(status_code=204)


@templates_router.post(
    "/code-interpreter", status_code=201, summary="Build the code-interpreter template (admin)"
)
async def build_code_template(body: CodeTemplateBody, state: State, _: Caller) -> dict[str, Any]:
    from corral.core.code_template import build_code_interpreter_template
    from corral.server.routes.templates import template_wire

    record = await build_code_interpreter_template(
        state.service.templates, state.service.settings.cache_root, name=body.name
    )
    return template_wire(record)
