"""Terminals in a sandbox, over one :class:`AgentClient`.

A terminal is an agent process started with ``pty`` and ``background``: it outlives the request and the
connection that made it, until it exits, is killed, or its timeout passes. Its output is followed with the
ordinary ``attach`` (replaying the kept 1 MiB first), input is ``stdin``, and ``resize`` changes its size. So
re-attaching after a disconnect is just another ``attach``.
"""

from __future__ import annotations

from corral.core.agent_client import AgentClient
from corral.errors import InvalidRequest
from corral.models import EventKind, ProcessEvent, PtyParams
from corral.protocol import Op

__all__ = ["MAX_DIMENSION", "check_params", "check_size", "create", "resize"]

MAX_DIMENSION = 10_000  # columns or rows, as the agent accepts


def check_size(cols: object, rows: object) -> None:
    for name, value in (("cols", cols), ("rows", rows)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_DIMENSION:
            raise InvalidRequest(f"a terminal's {name} must be a whole number from 1 to {MAX_DIMENSION}")


def check_params(params: PtyParams, *, max_timeout: float) -> None:
    check_size(params.cols, params.rows)
    if params.cmd is not None and params.argv is not None:
        raise InvalidRequest("give at most one of cmd (a shell command) and argv (a list of arguments)")
    if params.argv is not None and (not params.argv or not all(isinstance(a, str) for a in params.argv)):
        raise InvalidRequest("argv must be a non-empty list of strings")
    if params.timeout is not None and not 0 < params.timeout <= max_timeout:
        raise InvalidRequest(f"a terminal timeout must be between 0 and {max_timeout:g} seconds")


async def create(client: AgentClient, params: PtyParams) -> ProcessEvent:
    """Start the terminal; returns its ``started`` event (process id and pid). Output: ``attach``."""
    answer = await client.call(Op.EXEC, params.agent_fields())
    return ProcessEvent(kind=EventKind.STARTED, process_id=answer.get("process_id"), pid=answer.get("pid"))


async def resize(client: AgentClient, process_id: str, cols: int, rows: int) -> None:
    check_size(cols, rows)
    await client.call(Op.RESIZE, {"process_id": process_id, "cols": cols, "rows": rows})
