"""Directory watches in a sandbox, over one :class:`AgentClient`.

The agent's ``watch`` request lives until cancelled. :func:`watch_dir` waits for the agent's ``started``
(from then on every change is reported; errors such as a missing path are raised here, before any event) and
then yields :class:`FilesystemEvent` values, the first being ``started``. When the caller stops iterating, a
``cancel`` frame ends the request in the agent (shielded, so a cancelled caller still releases the watch).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio

from corral.core.agent_client import AgentClient
from corral.core.files import check_path
from corral.errors import CorralError
from corral.models import FilesystemEvent, FilesystemEventType
from corral.protocol import Event, Op

__all__ = ["watch_dir"]

CANCEL_TIMEOUT = 5.0  # the agent answers a cancel at once; this only bounds a wedged connection


async def watch_dir(
    client: AgentClient, path: str, *, recursive: bool = False, user: str | None = None
) -> AsyncIterator[FilesystemEvent]:
    fields = {"path": check_path(path), "recursive": recursive, **({"user": user} if user else {})}
    async with client.request(Op.WATCH, fields) as req:
        try:
            async for frame in req:
                ev = frame.get("ev")
                if ev == Event.STARTED:
                    yield FilesystemEvent(name="", type=FilesystemEventType.STARTED)
                elif ev == Event.FS_EVENT:
                    for item in frame.get("events") or []:
                        yield FilesystemEvent.from_wire(item)
        finally:
            if not req.done and not client.closed:
                with (
                    anyio.CancelScope(shield=True),
                    anyio.move_on_after(CANCEL_TIMEOUT),
                    contextlib.suppress(CorralError),
                ):
                    await req.send({"op": Op.CANCEL})
                    async for _ in req:  # until the agent's ``ok``: the watch is gone
                        pass
