"""Processes in a sandbox, as Corral models, over one :class:`AgentClient`.

Translates agent frames into :class:`ProcessEvent` values (the same event names all the way to the CLI) and
makes sure a foreground command whose caller stops listening is killed rather than left running unseen.
"""

from __future__ import annotations

import contextlib
import signal as _signal
from collections.abc import AsyncIterator
from typing import Any

import anyio

from corral.core.agent_client import AgentClient
from corral.errors import CorralError
from corral.models import EventKind, ExecParams, ProcessEvent, ProcessInfo
from corral.protocol import Event, Frame, Op

__all__ = ["attach", "exec_stream", "list_processes", "send_signal", "send_stdin"]

_KINDS = {
    Event.STARTED: EventKind.STARTED,
    Event.STDOUT: EventKind.STDOUT,
    Event.STDERR: EventKind.STDERR,
    Event.PTY: EventKind.PTY,
    Event.EXIT: EventKind.EXIT,
    Event.OK: EventKind.DETACHED,
}


def _event(frame: Frame, process_id: str | None) -> ProcessEvent | None:
    kind = _KINDS.get(frame.get("ev"))
    if kind is None:
        return None
    return ProcessEvent(
        kind=kind,
        data=frame.payload,
        process_id=frame.get("process_id") or process_id,
        pid=frame.get("pid"),
        exit_code=frame.get("exit_code"),
        signal=frame.get("signal"),
        timed_out=bool(frame.get("timed_out", False)),
        oom_killed=bool(frame.get("oom_killed", False)),
    )


async def _stream(
    client: AgentClient, op: Op, fields: dict[str, Any], *, kill_if_abandoned: bool
) -> AsyncIterator[ProcessEvent]:
    process_id: str | None = fields.get("process_id")
    finished = False
    try:
        async with client.request(op, fields) as req:
            async for frame in req:
                event = _event(frame, process_id)
                if event is None:
                    continue
                if event.kind is EventKind.STARTED:
                    process_id = event.process_id
                finished = event.kind in (EventKind.EXIT, EventKind.DETACHED)
                yield event
    finally:
        if kill_if_abandoned and process_id and not finished and not client.closed:
            # A connection that closes meanwhile takes the process with it (the shim kills the orphans of a
            # client that goes away), so failing to say so here is not an error.
            with anyio.CancelScope(shield=True), anyio.move_on_after(5), contextlib.suppress(CorralError):
                await client.call(Op.SIGNAL, {"process_id": process_id, "signal": int(_signal.SIGKILL)})


def exec_stream(client: AgentClient, params: ExecParams) -> AsyncIterator[ProcessEvent]:
    """Run a command; yields ``started``, output events, then ``exit`` (or ``detached`` for background)."""
    return _stream(client, Op.EXEC, params.agent_fields(), kill_if_abandoned=not params.background)


def attach(client: AgentClient, process_id: str, *, replay: bool = True) -> AsyncIterator[ProcessEvent]:
    """Re-attach to a process: kept output first (``replay``), then live output until it exits."""
    return _stream(client, Op.ATTACH, {"process_id": process_id, "replay": replay}, kill_if_abandoned=False)


async def list_processes(client: AgentClient) -> list[ProcessInfo]:
    answer = await client.call(Op.LIST_PROCESSES)
    return [ProcessInfo.from_wire(p) for p in answer.get("processes", [])]


async def send_stdin(client: AgentClient, process_id: str, data: bytes, *, eof: bool = False) -> None:
    await client.call(Op.STDIN, {"process_id": process_id, "eof": eof}, data)


async def send_signal(client: AgentClient, process_id: str, signal: int) -> None:
    await client.call(Op.SIGNAL, {"process_id": process_id, "signal": signal})
