"""The code interpreter: stateful cells of Python (IPython), JavaScript (Node) and Bash in a sandbox.

Everything language-specific runs INSIDE the sandbox, in a driver script shipped with Corral
(``interpreter_driver/driver.py`` and ``node_driver.js``, see the driver's docstring), so the agent stays
standard-library only and every runtime gets the same interpreter. The core only moves bytes:

- Start: on first use, the driver files are written into the sandbox (``DRIVER_DIR``, as root, so the
  sandbox's default user cannot alter them) and the driver starts as an ordinary background process of the
  default user, with stdin kept open and tag ``TAG``. Any Corral process finds it again by that tag, so
  contexts outlive the client that made them. Two clients starting it at once: the driver holds a lock and
  the loser exits at once; the client then finds the winner.
- Each request is one JSON line written to the driver's stdin; its answer lines are read from an ``attach``
  of the driver opened (without replay) before the request is sent, and picked out by the request's random id.
  No background task and no state in the core: concurrent requests from any number of clients simply attach
  side by side.
- Everything the driver prints is untrusted (code in the sandbox can reach it): lines are bounded, must parse,
  must carry our id, and only known fields are read.

A cell whose caller stops listening before it ends is interrupted (E2B's semantics for a dropped
connection); a cell's ``timeout`` interrupts it inside the sandbox. Either way the context keeps its state.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import anyio

from corral.core import files as _files
from corral.core import processes as _processes
from corral.core.agent_client import AgentClient
from corral.errors import (
    AgentUnavailable,
    CorralError,
    InvalidRequest,
    NotFound,
    RuntimeFailure,
    Unsupported,
)
from corral.models import (
    CodeContext,
    CodeEvent,
    CodeEventKind,
    EventKind,
    ExecParams,
    ExecutionError,
    Result,
    RunCodeParams,
)
from corral.protocol import Event, Op

__all__ = [
    "create_context",
    "interrupt_context",
    "list_contexts",
    "normalize_language",
    "remove_context",
    "restart_context",
    "run_code",
]

TAG = "corral-interpreter"
DRIVER_DIR = "/var/lib/corral-interpreter"
DRIVER_FILES = ("driver.py", "node_driver.js")
MAX_CODE = 4 << 20  # bytes of one cell; the driver enforces the same
MAX_LINE = 64 << 20  # one answer line (a large figure as base64); longer lines are dropped
MAX_CELL_ENVS = 256
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
CONTROL_TIMEOUT = 180.0  # seconds for a context op (a kernel start under gVisor takes several)
LANGUAGES = {
    "python": "python",
    "python3": "python",
    "py": "python",
    "javascript": "javascript",
    "js": "javascript",
    "node": "javascript",
    "bash": "bash",
    "sh": "bash",
    "shell": "bash",
}
_ERRORS: dict[str, type[CorralError]] = {
    "not_found": NotFound,
    "invalid": InvalidRequest,
    "unsupported": Unsupported,
}
_TERMINAL = ("ok", "fail", "end")


class _DriverGone(Exception):
    """The driver exited while we waited for an answer (it lost a start race, or was killed)."""


def normalize_language(language: str | None) -> str:
    lang = LANGUAGES.get((language or "python").lower())
    if lang is None:
        raise InvalidRequest(f"unknown language {language!r}; choose one of: python, javascript, bash")
    return lang


def _check_id(context_id: object) -> str:
    if not isinstance(context_id, str) or not context_id.startswith("ctx-") or len(context_id) > 64:
        raise NotFound(f"code context {context_id!r} not found (context ids look like ctx-…)")
    return context_id


async def _find_driver(client: AgentClient) -> str | None:
    for proc in await _processes.list_processes(client):
        if proc.tag == TAG and proc.running:
            return proc.process_id
    return None


async def _start_driver(client: AgentClient) -> str:
    package = resources.files("corral.core").joinpath("interpreter_driver")
    for name in DRIVER_FILES:
        data = package.joinpath(name).read_bytes()
        await _files.write(
            client, f"{DRIVER_DIR}/{name}", _once(data), max_bytes=len(data), user="root", mode=0o644
        )
    params = ExecParams(
        argv=["python3", "-u", f"{DRIVER_DIR}/driver.py"], stdin=True, background=True, tag=TAG
    )
    async for event in _processes.exec_stream(client, params):
        if event.kind is EventKind.STARTED and event.process_id:
            return event.process_id
    raise RuntimeFailure("the code interpreter did not start")


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _request(client: AgentClient, op: str, fields: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """Send one request to the sandbox's driver (starting it if needed) and yield its answer lines."""
    for attempt in range(3):
        process_id = await _find_driver(client) or await _start_driver(client)
        answered = False
        try:
            async for message in _exchange(client, process_id, op, fields):
                answered = True
                yield message
            return
        except _DriverGone:
            if answered:  # it died mid-answer: running the request again could run a cell twice
                raise AgentUnavailable("the sandbox's code interpreter exited while answering") from None
            if attempt == 2:
                raise AgentUnavailable("the sandbox's code interpreter keeps exiting") from None


async def _exchange(
    client: AgentClient, process_id: str, op: str, fields: dict[str, Any]
) -> AsyncIterator[dict[str, Any]]:
    rid = secrets.token_hex(12)
    line = json.dumps({**fields, "id": rid, "op": op}).encode() + b"\n"
    marker = f'"id":"{rid}"'.encode()
    async with client.request(Op.ATTACH, {"process_id": process_id, "replay": False}) as req:
        async for frame in req:  # the first frame says the attach is live: only then send the request
            if frame.get("ev") == Event.STARTED:
                break
        try:
            await client.call(Op.STDIN, {"process_id": process_id}, line)
        except CorralError as exc:
            raise _DriverGone from exc
        buf = bytearray()
        skipping = False
        async for frame in req:
            ev = frame.get("ev")
            if ev != Event.STDOUT:
                if ev in (Event.EXIT, Event.OK):
                    raise _DriverGone
                continue
            buf += frame.payload
            while True:
                end = buf.find(b"\n")
                if end < 0:
                    if len(buf) > MAX_LINE:
                        buf.clear()
                        skipping = True
                    break
                raw = bytes(buf[:end])
                del buf[: end + 1]
                if skipping:
                    skipping = False
                    continue
                if marker not in raw:
                    continue
                message = _parse(raw, rid)
                if message is None:
                    continue
                yield message
                if message["ev"] in _TERMINAL:
                    return
    raise _DriverGone


def _parse(raw: bytes, rid: str) -> dict[str, Any] | None:
    try:
        message = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(message, dict) or message.get("id") != rid or not isinstance(message.get("ev"), str):
        return None
    return message


def _raise_failure(message: dict[str, Any]) -> None:
    code = str(message.get("code", ""))
    text = str(message.get("message", "the code interpreter failed"))[:2000]
    raise _ERRORS.get(code, RuntimeFailure)(text)


async def _control(client: AgentClient, op: str, fields: dict[str, Any]) -> dict[str, Any]:
    with anyio.fail_after(CONTROL_TIMEOUT):
        async for message in _request(client, op, fields):
            if message["ev"] == "fail":
                _raise_failure(message)
            if message["ev"] == "ok":
                return message
    raise AgentUnavailable("the code interpreter ended a request without an answer")


def _context(data: object) -> CodeContext:
    if not isinstance(data, dict):
        raise RuntimeFailure("the code interpreter sent a malformed context")
    return CodeContext(id=str(data.get("id")), language=str(data.get("language")), cwd=str(data.get("cwd")))


async def create_context(client: AgentClient, *, language: str | None, cwd: str | None) -> CodeContext:
    fields: dict[str, Any] = {"language": normalize_language(language)}
    if cwd is not None:
        fields["cwd"] = _files.check_path(cwd)
    return _context((await _control(client, "create_context", fields)).get("context"))


async def list_contexts(client: AgentClient) -> list[CodeContext]:
    contexts = (await _control(client, "list_contexts", {})).get("contexts")
    return [_context(c) for c in contexts] if isinstance(contexts, list) else []


async def restart_context(client: AgentClient, context_id: str) -> None:
    await _control(client, "restart_context", {"context_id": _check_id(context_id)})


async def remove_context(client: AgentClient, context_id: str) -> None:
    await _control(client, "remove_context", {"context_id": _check_id(context_id)})


async def interrupt_context(client: AgentClient, context_id: str) -> None:
    await _control(client, "interrupt_context", {"context_id": _check_id(context_id)})


def check_run_params(params: RunCodeParams, *, max_timeout: float) -> dict[str, Any]:
    """The driver's ``execute`` fields, after validating what a caller sent."""
    if not isinstance(params.code, str) or len(params.code.encode()) > MAX_CODE:
        raise InvalidRequest("code must be a string of at most 4 MiB")
    if params.context_id is not None and params.language is not None:
        raise InvalidRequest("give a context or a language, not both (a context has its language)")
    envs = params.envs or {}
    if (
        not isinstance(envs, dict)
        or len(envs) > MAX_CELL_ENVS
        or not all(
            isinstance(k, str) and _ENV_NAME.fullmatch(k) and isinstance(v, str) for k, v in envs.items()
        )
    ):
        raise InvalidRequest(
            f"envs must map at most {MAX_CELL_ENVS} variable names (letters, digits, _; not starting with a "
            "digit) to strings"
        )
    if params.timeout is not None and not 0 < params.timeout <= max_timeout:
        raise InvalidRequest(f"a code timeout must be between 0 and {max_timeout:g} seconds")
    fields: dict[str, Any] = {"code": params.code}
    if params.context_id is not None:
        fields["context_id"] = _check_id(params.context_id)
    else:
        fields["language"] = normalize_language(params.language)
    if params.timeout is not None:
        fields["timeout"] = float(params.timeout)
    if envs:
        fields["envs"] = dict(envs)  # set for this cell only, then restored
    return fields


async def run_code(client: AgentClient, fields: dict[str, Any]) -> AsyncIterator[CodeEvent]:
    """Run one cell (fields from :func:`check_run_params`); yields its events, ending with ``end``."""
    context_id: str | None = fields.get("context_id")
    finished = False
    try:
        async for message in _request(client, "execute", fields):
            ev = message["ev"]
            if ev == "fail":
                finished = True
                _raise_failure(message)
            if ev == "context":
                ctx = message.get("context")
                context_id = str(ctx.get("id")) if isinstance(ctx, dict) else context_id
                continue
            event = _event(message)
            if event is None:
                continue
            finished = event.kind is CodeEventKind.END
            yield event
    finally:
        if not finished and context_id is not None and not client.closed:
            # a context or sandbox that is gone needs no interrupt
            with anyio.CancelScope(shield=True), anyio.move_on_after(10), contextlib.suppress(CorralError):
                await interrupt_context(client, context_id)


def _event(message: dict[str, Any]) -> CodeEvent | None:
    ev = message["ev"]
    now = time.time()
    if ev in ("stdout", "stderr"):
        return CodeEvent(kind=CodeEventKind(ev), text=str(message.get("text", "")), timestamp=now)
    if ev == "result" and isinstance(message.get("result"), dict):
        return CodeEvent(kind=CodeEventKind.RESULT, result=Result.from_wire(message["result"]), timestamp=now)
    if ev == "error":
        error = ExecutionError(
            name=str(message.get("name", "")),
            value=str(message.get("value", "")),
            traceback=str(message.get("traceback", "")),
        )
        return CodeEvent(kind=CodeEventKind.ERROR, error=error, timestamp=now)
    if ev == "execution_count":
        count = message.get("execution_count")
        return CodeEvent(
            kind=CodeEventKind.EXECUTION_COUNT, execution_count=count if isinstance(count, int) else None
        )
    if ev == "end":
        return CodeEvent(kind=CodeEventKind.END, timed_out=bool(message.get("timed_out")), timestamp=now)
    return None
