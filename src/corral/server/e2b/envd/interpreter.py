"""The code interpreter's HTTP API on port 49999 (``e2b-code-interpreter``), over Corral's interpreter.

``POST /execute`` runs a cell with ``SandboxService.run_code`` and streams its events as E2B's NDJSON lines
(``stdout``/``stderr`` with a timestamp, ``result`` with one field per MIME type, ``error`` with the
traceback, ``number_of_executions``, then ``end_of_execution``), with ``keepalive`` lines while a cell is
quiet. Contexts are Corral's code contexts: ``POST``/``GET /contexts``, ``POST /contexts/{id}/restart``,
``DELETE /contexts/{id}``. A client that disconnects mid-cell interrupts it (Corral's rule, and E2B's).
Errors are FastAPI-style ``{"detail"}`` bodies with the statuses the SDK maps (404 for an unknown context).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from corral.errors import CorralError, InvalidRequest
from corral.models import CodeContext, CodeEvent, CodeEventKind, RunCodeParams
from corral.server.e2b.envd._access import SandboxCall
from corral.server.e2b.envd._connect import with_keepalive

__all__ = ["handle"]

KEEPALIVE_EVERY = 30.0  # seconds between keepalive lines while a cell prints nothing
_CONTEXT = re.compile(r"/contexts/([^/]{1,128})(/restart)?")
_LANGUAGES = {"js": "javascript", "ts": "typescript"}


def _stamp(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat().replace("+00:00", "Z")


def _line(event: CodeEvent) -> dict[str, Any] | None:
    if event.kind in (CodeEventKind.STDOUT, CodeEventKind.STDERR):
        return {"type": event.kind.value, "text": event.text, "timestamp": _stamp(event.timestamp)}
    if event.kind is CodeEventKind.RESULT and event.result is not None:
        fields = {k: v for k, v in event.result.to_wire().items() if v is not None and k != "extra"}
        if event.result.extra:
            fields["extra"] = event.result.extra
        return {"type": "result", **fields}
    if event.kind is CodeEventKind.ERROR and event.error is not None:
        e = event.error
        return {"type": "error", "name": e.name, "value": e.value, "traceback": e.traceback}
    if event.kind is CodeEventKind.EXECUTION_COUNT and event.execution_count is not None:
        return {"type": "number_of_executions", "execution_count": event.execution_count}
    if event.kind is CodeEventKind.END:
        if event.timed_out:
            return {
                "type": "error",
                "name": "TimeoutError",
                "value": "the cell reached its timeout",
                "traceback": "",
            }
        return None
    return None


async def _ndjson(events: AsyncIterator[CodeEvent]) -> AsyncIterator[bytes]:
    async for event in with_keepalive(events, KEEPALIVE_EVERY, lambda: None):
        line = {"type": "keepalive"} if event is None else _line(event)
        if line is not None:
            yield json.dumps(line).encode() + b"\n"
    yield b'{"type": "end_of_execution"}\n'


def _context(ctx: CodeContext) -> dict[str, str]:
    return {"id": ctx.id, "language": ctx.language, "cwd": ctx.cwd}


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise InvalidRequest("the body must be a JSON object") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    return body


def _language(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest("language must be a string")
    return _LANGUAGES.get(value.lower(), value.lower())


async def _execute(call: SandboxCall, request: Request) -> Response:
    body = await _json(request)
    code, context_id, envs = body.get("code"), body.get("context_id"), body.get("env_vars") or {}
    if not isinstance(code, str):
        raise InvalidRequest("code must be a string")
    if context_id is not None and not isinstance(context_id, str):
        raise InvalidRequest("context_id must be a string")
    if not isinstance(envs, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in envs.items()
    ):
        raise InvalidRequest("env_vars must map strings to strings")
    params = RunCodeParams(
        code=code, language=_language(body.get("language")), context_id=context_id, envs=envs
    )
    events = await call.service.run_code(call.sandbox_id, params, tenant=call.tenant)
    first = await anext(events, None)  # a missing context or an unknown language fails before the 200
    return StreamingResponse(_ndjson(_prepend(first, events)), media_type="application/json")


async def _prepend(first: CodeEvent | None, rest: AsyncIterator[CodeEvent]) -> AsyncIterator[CodeEvent]:
    try:
        if first is not None:
            yield first
        async for event in rest:
            yield event
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


async def _route(call: SandboxCall, request: Request) -> Response:
    svc, sid, kw = call.service, call.sandbox_id, {"tenant": call.tenant}
    method, path = request.method, request.url.path
    if (method, path) == ("POST", "/execute"):
        return await _execute(call, request)
    if (method, path) == ("GET", "/health"):
        return JSONResponse("OK")
    if path == "/contexts":
        if method == "POST":
            body = await _json(request)
            cwd = body.get("cwd")
            if cwd is not None and not isinstance(cwd, str):
                raise InvalidRequest("cwd must be a string")
            ctx = await svc.create_code_context(sid, language=_language(body.get("language")), cwd=cwd, **kw)
            return JSONResponse(_context(ctx))
        if method == "GET":
            return JSONResponse([_context(c) for c in await svc.list_code_contexts(sid, **kw)])
    match = _CONTEXT.fullmatch(path)
    if match is not None:
        if match[2] and method == "POST":
            await svc.restart_code_context(sid, match[1], **kw)
            return JSONResponse(None)
        if not match[2] and method == "DELETE":
            await svc.remove_code_context(sid, match[1], **kw)
            return JSONResponse(None)
    return JSONResponse({"detail": "Not Found"}, status_code=404)


async def handle(call: SandboxCall, scope: Scope, receive: Receive, send: Send) -> None:
    request = Request(scope, receive)
    try:
        response = await _route(call, request)
    except CorralError as exc:
        response = JSONResponse({"detail": exc.message}, status_code=exc.status)
    except asyncio.CancelledError:
        raise
    await response(scope, receive, send)
