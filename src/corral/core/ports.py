"""Ports of a sandbox as byte streams: the host end of the agent's ``port.connect`` (spec §4b).

:func:`open_port` returns a :class:`PortStream`, an ``anyio.abc.ByteStream``, so an adapter relays it with
ordinary anyio code: the server's HTTP/WebSocket proxy, the SDK's local port forward. Stream semantics are
anyio's: ``receive`` raises ``anyio.EndOfStream`` once the server inside finished sending, ``send_eof``
half-closes, a connection lost midway (server reset, sandbox gone) raises ``anyio.BrokenResourceError``
chained to the Corral error, and use after ``aclose`` raises ``anyio.ClosedResourceError``. Opening raises
Corral errors: :class:`~corral.errors.PortClosed` when nothing listens.

There is no background task. Whoever needs a frame (``receive`` waiting for data, ``send`` waiting for
window) takes the pump lock and reads the request's next frame, routing it: data to a buffer bounded by the
agent's window (it sends no more until we acknowledge), acks to the send window. Acknowledgements go out as
the consumer takes data, so a consumer that stops reading stops the server inside, through the agent and TCP.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Callable
from contextlib import AsyncExitStack

import anyio
from anyio.abc import ByteStream

from corral.core.agent_client import AgentClient, Request
from corral.errors import AgentUnavailable, CorralError, PortClosed, Timeout
from corral.models import check_port
from corral.protocol import Event, Op
from corral.protocol.messages import PORT_WINDOW_BYTES, PORT_WINDOW_FRAMES

__all__ = ["CONNECT_TIMEOUT", "PortStream", "check_port", "open_port"]

CONNECT_TIMEOUT = 30.0  # the agent itself gives up after 10 s; this also covers a wedged agent connection
SEND_CHUNK = 64 * 1024  # bytes per data frame towards the agent (16 of them fill the window)
ACK_BYTES = PORT_WINDOW_BYTES // 4  # acknowledge in batches: a quarter window keeps the agent streaming
ACK_FRAMES = PORT_WINDOW_FRAMES // 4


async def open_port(
    client: AgentClient, port: int, *, sandbox_id: str, timeout: float = CONNECT_TIMEOUT
) -> PortStream:
    """Connect to ``port`` on the sandbox's loopback; returns once the server inside accepted."""
    check_port(port)
    stack = AsyncExitStack()
    try:
        req = await stack.enter_async_context(client.request(Op.PORT_CONNECT, {"port": port}))
        with anyio.fail_after(timeout if timeout is not None else math.inf):
            first = await req.__anext__()
        if first.get("ev") != Event.STARTED:
            raise AgentUnavailable("the sandbox agent answered port.connect without a connection")
    except PortClosed as exc:
        await stack.aclose()
        raise PortClosed(
            f"port {port} is not open in sandbox {sandbox_id}: nothing listens on it", details=exc.details
        ) from exc
    except TimeoutError as exc:
        await stack.aclose()
        raise Timeout(f"port {port} in sandbox {sandbox_id} did not accept a connection in time") from exc
    except BaseException:
        await stack.aclose()
        raise
    return PortStream(req, stack, port=port, sandbox_id=sandbox_id)


class PortStream(ByteStream):
    """A TCP connection to a port inside a sandbox. Use it from at most one sender and one receiver task."""

    def __init__(self, req: Request, stack: AsyncExitStack, *, port: int, sandbox_id: str) -> None:
        self._req = req
        self._stack = stack
        self.port = port
        self.sandbox_id = sandbox_id
        self._pump_lock = anyio.Lock()
        self._send_lock = anyio.Lock()  # keeps concurrent send() calls whole and in order
        # agent -> us
        self._chunks: deque[bytes] = deque()
        self._peer_eof = False
        self._ack_bytes = 0
        self._ack_frames = 0
        # us -> agent
        self._unacked_bytes = 0
        self._unacked_frames = 0
        self._eof_sent = False
        # both
        self._ended = False  # the request's terminal frame arrived (or the connection failed)
        self._error: BaseException | None = None
        self._closed = False

    # -- the pump ------------------------------------------------------------------------------------------
    async def _pump(self, satisfied: Callable[[], bool]) -> None:
        """Read and route one frame of the request, unless ``satisfied()`` already holds."""
        async with self._pump_lock:
            if satisfied() or self._ended:
                return
            try:
                frame = await self._req.__anext__()
            except StopAsyncIteration:
                self._end(None)
                return
            except CorralError as exc:
                self._end(exc)
                return
            ev = frame.get("ev")
            if ev == Event.DATA:
                if frame.payload:
                    self._chunks.append(frame.payload)
                if frame.get("eof"):
                    self._peer_eof = True
            elif ev == Event.ACK:
                self._unacked_bytes = max(0, self._unacked_bytes - int(frame.get("bytes", 0)))
                self._unacked_frames = max(0, self._unacked_frames - int(frame.get("frames", 0)))
            elif ev == Event.OK:
                self._end(None)

    def _end(self, error: CorralError | None) -> None:
        self._ended = True
        self._peer_eof = True
        if error is not None and self._error is None:
            self._error = error

    def _broken(self) -> anyio.BrokenResourceError:
        exc = anyio.BrokenResourceError(
            f"the connection to port {self.port} in sandbox {self.sandbox_id} was lost"
        )
        exc.__cause__ = self._error
        return exc

    # -- ByteStream ----------------------------------------------------------------------------------------
    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self._closed:
            raise anyio.ClosedResourceError
        while not self._chunks:
            if self._error is not None:
                raise self._broken()
            if self._peer_eof:
                raise anyio.EndOfStream
            await self._pump(lambda: bool(self._chunks) or self._peer_eof or self._error is not None)
        head = self._chunks[0]
        if len(head) <= max_bytes:
            self._chunks.popleft()
            self._ack_frames += 1
            data = head
        else:
            data, self._chunks[0] = head[:max_bytes], head[max_bytes:]
        self._ack_bytes += len(data)
        if (self._ack_bytes >= ACK_BYTES or self._ack_frames >= ACK_FRAMES) and not self._ended:
            ack = {"op": Op.DATA, "ack_bytes": self._ack_bytes, "ack_frames": self._ack_frames}
            self._ack_bytes = self._ack_frames = 0
            try:  # not under _send_lock: a send waiting for window must not hold up the acks
                await self._req.send(ack)
            except CorralError as exc:
                self._end(exc)
        return data

    async def send(self, item: bytes) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        async with self._send_lock:
            if self._eof_sent:
                raise anyio.ClosedResourceError("send_eof() was called on this port stream")
            view = memoryview(item)
            for start in range(0, len(view), SEND_CHUNK):
                piece = bytes(view[start : start + SEND_CHUNK])

                def window_open(n: int = len(piece)) -> bool:
                    return (
                        self._unacked_bytes + n <= PORT_WINDOW_BYTES
                        and self._unacked_frames < PORT_WINDOW_FRAMES
                    )

                while not window_open():
                    if self._ended:
                        raise self._broken()
                    await self._pump(lambda: window_open() or self._ended)
                if self._ended:
                    raise self._broken()
                try:
                    await self._req.send({"op": Op.DATA}, piece)
                except CorralError as exc:
                    self._end(exc)
                    raise self._broken() from exc
                self._unacked_bytes += len(piece)
                self._unacked_frames += 1

    async def send_eof(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        async with self._send_lock:
            if self._eof_sent or self._ended:
                return
            self._eof_sent = True
            try:
                await self._req.send({"op": Op.DATA, "eof": True})
            except CorralError as exc:
                self._end(exc)
                raise self._broken() from exc

    async def aclose(self) -> None:
        """Close the connection (the server inside sees it end) and forget the request."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            if not self._ended:
                with contextlib.suppress(CorralError):
                    await self._req.send({"op": Op.DATA, "abort": True})
            await self._stack.aclose()
