"""Port forwarding on this machine (``kubectl port-forward`` style): a TCP listener whose every connection is
relayed to a port inside a sandbox.

Backend-neutral: the forward gets ``open_stream``, a function that opens one byte stream to the sandbox port
(an ``anyio.abc.ByteStream``: the core's port stream in embedded mode, a WebSocket in remote mode), and relays
each accepted connection through its own stream, both directions at once, half-closes passed on. The listener
and every relay are tasks of the forward's own task group, so leaving the ``async with`` block closes them all.

A connection that cannot be relayed (nothing listens in the sandbox, the sandbox is gone) is closed at once and
logged on the ``corral.client.forward`` logger; the forward keeps listening.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
from anyio.abc import ByteStream, SocketStream

from corral.errors import Conflict, CorralError, InvalidRequest
from corral.models import PortForward, check_port

__all__ = ["forward"]

log = logging.getLogger("corral.client.forward")

_GONE = (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError)


@asynccontextmanager
async def forward(
    open_stream: Callable[[], Awaitable[ByteStream]],
    *,
    sandbox_id: str,
    port: int,
    host: str = "127.0.0.1",
    local_port: int = 0,
) -> AsyncIterator[PortForward]:
    """Listen on ``host:local_port`` (0: any free port) while the block runs; yields where it listens."""
    check_port(port)
    check_port(local_port, name="local_port", allow_zero=True)
    try:
        listener = await anyio.create_tcp_listener(local_host=host, local_port=local_port, reuse_port=False)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise Conflict(f"local port {local_port} on {host} is already in use; pick another") from exc
        raise InvalidRequest(f"cannot listen on {host}:{local_port}: {exc.strerror}") from exc
    bound = listener.extra(anyio.abc.SocketAttribute.local_address)  # noqa: S610 - anyio, not Django
    info = PortForward(sandbox_id=sandbox_id, port=port, host=str(bound[0]), local_port=int(bound[1]))

    async def relay(local: SocketStream) -> None:
        async with local:
            try:
                remote = await open_stream()
            except CorralError as exc:
                log.warning("%s:%d -> %s port %d: %s", info.host, info.local_port, sandbox_id, port, exc)
                return
            async with remote, anyio.create_task_group() as tg:
                tg.start_soon(_pipe, local, remote, tg.cancel_scope)
                tg.start_soon(_pipe, remote, local, tg.cancel_scope)

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, relay, tg)
        try:
            yield info
        finally:
            tg.cancel_scope.cancel()


async def _pipe(source: ByteStream, sink: ByteStream, scope: anyio.CancelScope) -> None:
    """Copy ``source`` to ``sink`` and pass its end on as a half-close; a broken side ends both directions."""
    try:
        async for chunk in source:
            await sink.send(chunk)
        await sink.send_eof()
    except _GONE:
        scope.cancel()
    except CorralError as exc:
        log.warning("port forward connection ended: %s", exc)
        scope.cancel()
