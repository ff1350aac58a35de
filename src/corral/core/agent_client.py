"""Host side of the agent protocol: one connection to one sandbox's agent, requests multiplexed by id.

There is no background reader task (so no task group has to own one, and a client may be used from any task):
whichever request needs a frame becomes the reader (if no other request is reading), reads once from the stream
and routes every frame it got to the queue of the request that owns its ``id``, waking that request; the others
wait for a frame of theirs or for the reader to step down, whichever comes first. Each queue is bounded: when a consumer is slow (a large
download written to a slow disk), the reader waits for it, so the shim stops reading from the agent and
back-pressure reaches the sandbox instead of memory growing here. Frames for abandoned requests are dropped.

This module is the boundary where agent failures become Corral errors (:func:`agent_error`), so nothing above
it sees protocol details or OSErrors.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio.abc import ByteStream

from corral.errors import (
    AgentUnavailable,
    Conflict,
    CorralError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    PortClosed,
    ResourceExhausted,
    RuntimeFailure,
    Timeout,
    Unsupported,
)
from corral.ids import new_request_id
from corral.protocol import PROTOCOL_VERSION, TERMINAL_EVENTS, AgentErrorCode, Decoder, Event, Frame, encode
from corral.protocol.frames import ProtocolError

__all__ = ["AgentClient", "agent_error"]

log = logging.getLogger("corral.core.agent")

QUEUE_FRAMES = 64  # per request: 64 x 128 KiB chunks = 8 MiB waiting at most
STALL_TIMEOUT = 60.0  # a consumer that leaves its full queue untouched this long has abandoned its request
HELLO_TIMEOUT = 30.0  # the shim replays the cached hello at once; this only guards a wedged shim

_ERRORS: dict[str, type[CorralError]] = {
    AgentErrorCode.INVALID: InvalidRequest,
    AgentErrorCode.UNKNOWN_OP: Unsupported,
    AgentErrorCode.NOT_FOUND: NotFound,
    AgentErrorCode.EXISTS: Conflict,
    AgentErrorCode.NOT_A_DIRECTORY: InvalidRequest,
    AgentErrorCode.IS_A_DIRECTORY: InvalidRequest,
    AgentErrorCode.PERMISSION_DENIED: PermissionDenied,
    AgentErrorCode.NO_SPACE: ResourceExhausted,
    AgentErrorCode.TOO_LARGE: ResourceExhausted,
    AgentErrorCode.TIMEOUT: Timeout,
    AgentErrorCode.BUSY: Conflict,
    AgentErrorCode.PORT_CLOSED: PortClosed,
}


def agent_error(frame: Frame) -> CorralError:
    code = str(frame.get("code", "internal"))
    message = str(frame.get("message") or "the sandbox agent reported an error")
    cls = _ERRORS.get(code, RuntimeFailure)
    return cls(message, details={"agent_code": code})


class _Queue:
    __slots__ = ("arrived", "frames", "space")

    def __init__(self) -> None:
        self.frames: deque[Frame] = deque()
        self.space = anyio.Event()
        self.arrived = anyio.Event()  # set when a frame is added, or when the reader steps down


class AgentClient:
    """A connected agent. Use :meth:`open` to get one (it reads the agent's hello first)."""

    def __init__(self, stream: ByteStream, *, sandbox_id: str) -> None:
        self._stream = stream
        self.sandbox_id = sandbox_id
        self._decoder = Decoder()
        self._queues: dict[str, _Queue] = {}
        self._reading = False  # one request at a time reads the stream, for all (see _next_frame)
        self._send_lock = anyio.Lock()
        self._closed: CorralError | None = None
        self.hello: Mapping[str, Any] = {}

    @classmethod
    async def open(cls, stream: ByteStream, *, sandbox_id: str) -> AgentClient:
        client = cls(stream, sandbox_id=sandbox_id)
        try:
            with anyio.fail_after(HELLO_TIMEOUT):
                hello = await client._read_hello()
            version = hello.get("version")
            if version != PROTOCOL_VERSION:
                raise AgentUnavailable(
                    f"the sandbox agent speaks protocol version {version}, "
                    f"this Corral speaks {PROTOCOL_VERSION}"
                )
        except BaseException:
            await stream.aclose()
            raise
        client.hello = hello
        return client

    @property
    def closed(self) -> bool:
        return self._closed is not None

    async def aclose(self) -> None:
        self._fail(AgentUnavailable("the connection to the sandbox agent was closed"))
        await self._stream.aclose()

    # -- reading ---------------------------------------------------------------------------------------------
    async def _read_hello(self) -> Mapping[str, Any]:
        frames: list[Frame] = []
        while not frames:
            try:
                data = await self._stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
                raise AgentUnavailable("the sandbox agent closed the connection before saying hello") from exc
            frames = self._decoder.feed(data)
        if frames[0].get("ev") != Event.HELLO:
            raise AgentUnavailable("the sandbox agent did not start the conversation with hello")
        return frames[0].header  # frames after hello in the same read belong to no request yet: none exist

    async def _next_frame(self, rid: str) -> Frame:
        queue = self._queues[rid]
        while True:
            if queue.frames:
                frame = queue.frames.popleft()
                if len(queue.frames) < QUEUE_FRAMES:
                    queue.space.set()
                return frame
            if self._closed is not None:
                raise self._closed
            if self._reading:
                # Another request is reading: it hands our frames over as they come (``arrived``). Waiting on
                # a lock instead would strand a frame already delivered to us behind the next reader's wait.
                queue.arrived = anyio.Event()
                await queue.arrived.wait()
                continue
            self._reading = True
            try:
                await self._read_once()
            finally:
                self._reading = False
                for other in self._queues.values():  # someone still waiting takes over the reading
                    other.arrived.set()

    async def _read_once(self) -> None:
        try:
            data = await self._stream.receive()
            frames = self._decoder.feed(data)
        except (
            anyio.EndOfStream,
            anyio.ClosedResourceError,
            anyio.BrokenResourceError,
            OSError,
            ProtocolError,
        ) as exc:
            log.info("sandbox %s: agent connection ended: %r", self.sandbox_id, exc)
            self._fail(
                AgentUnavailable(
                    "the sandbox's agent stopped responding (the sandbox may have been killed, timed out, "
                    "or run out of memory)"
                )
            )
            return
        for frame in frames:
            rid = frame.get("id")
            queue = self._queues.get(rid) if isinstance(rid, str) else None
            if queue is None:
                continue  # abandoned, or from before a reconnect
            while len(queue.frames) >= QUEUE_FRAMES:
                queue.space = anyio.Event()
                with anyio.move_on_after(STALL_TIMEOUT) as scope:
                    await queue.space.wait()
                if scope.cancel_called:
                    log.warning("sandbox %s: request %s stalled; dropping its frames", self.sandbox_id, rid)
                    queue.frames.clear()
            if rid in self._queues:
                queue.frames.append(frame)
                queue.arrived.set()

    def _fail(self, error: CorralError) -> None:
        if self._closed is None:
            self._closed = error
        for queue in self._queues.values():
            queue.space.set()
            queue.arrived.set()

    # -- requests --------------------------------------------------------------------------------------------
    async def send_frame(self, header: Mapping[str, Any], payload: bytes = b"") -> None:
        if self._closed is not None:
            raise self._closed
        data = encode(dict(header), payload)
        async with self._send_lock:
            try:
                await self._stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                self._fail(AgentUnavailable("the sandbox's agent connection broke"))
                raise AgentUnavailable("the sandbox's agent connection broke") from exc

    @asynccontextmanager
    async def request(
        self, op: str, fields: Mapping[str, Any] | None = None, payload: bytes = b""
    ) -> AsyncIterator[Request]:
        """Start a request; iterate the returned :class:`Request` for its frames.

        Leaving the block abandons the request (later frames for it are dropped).
        """
        if self._closed is not None:
            raise self._closed
        rid = new_request_id()
        self._queues[rid] = _Queue()
        try:
            await self.send_frame({**(fields or {}), "id": rid, "op": op}, payload)
            yield Request(self, rid)
        finally:
            queue = self._queues.pop(rid, None)
            if queue is not None:
                queue.space.set()

    async def call(
        self,
        op: str,
        fields: Mapping[str, Any] | None = None,
        payload: bytes = b"",
        *,
        timeout: float | None = 60.0,
    ) -> dict[str, Any]:
        """A request whose answer is a single terminal frame; returns that frame's header."""
        with anyio.fail_after(timeout if timeout is not None else math.inf):
            async with self.request(op, fields, payload) as req:
                async for frame in req:
                    if frame.get("ev") in TERMINAL_EVENTS:
                        return dict(frame.header)
        raise AgentUnavailable("the sandbox agent ended a request without an answer")


class Request:
    """One request in flight. Iterating yields its frames; an ``error`` terminal frame is raised."""

    def __init__(self, client: AgentClient, rid: str) -> None:
        self._client = client
        self.id = rid
        self.done = False

    def __aiter__(self) -> Request:
        return self

    async def __anext__(self) -> Frame:
        if self.done:
            raise StopAsyncIteration
        frame = await self._client._next_frame(self.id)
        ev = frame.get("ev")
        if ev in TERMINAL_EVENTS:
            self.done = True
            if ev == Event.ERROR:
                raise agent_error(frame)
        return frame

    async def send(self, header: Mapping[str, Any], payload: bytes = b"") -> None:
        """Send a follow-up frame of this request (``data`` chunks of an upload)."""
        await self._client.send_frame({**header, "id": self.id}, payload)
