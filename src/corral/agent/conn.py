"""One protocol connection: frame decoding in, a bounded frame queue out, and producers pumped on demand.

Output is *pulled*, not pushed. Anything that streams to the client (a process's output, a file being read, a
long listing) is a :class:`Producer` that emits at most one frame per :meth:`Producer.produce` call. The
connection calls producers only while its queue holds less than ``HIGH_WATER`` bytes and calls them again when
the peer has drained it below ``LOW_WATER``. So a slow client costs at most ~1 MiB here per connection, and the
cost of slowness moves to the source: a process whose output nobody consumes stops being read (see
``process``), a file read simply pauses.

Answers that are not produced on demand (``ok``, ``error``, ``started``) are always queued; if a client sends
requests without reading their answers and the queue passes ``INPUT_PAUSE``, the connection stops reading
requests until it drains, so that client cannot grow the agent's memory either.

Frames are written whole by this one object, so frames of concurrent requests interleave but never tear. A frame
is written at once when the queue is empty (no extra loop iteration on the latency path), and otherwise queued
and flushed with ``writev`` when the fd becomes writable.

Any ``OSError`` on the connection's fds (EPIPE, ECONNRESET, ECONNABORTED after a gVisor restore, ...) closes this
connection only.

A peer that relays several clients over one connection (the host's shim) tags each client's frames with a
channel name (header ``ch``); each channel is a :class:`Channel`, a virtual connection that owns what its
client started exactly as a connection would (foreground processes, uploads, attaches, watches, ports), so
the agent applies its connection rules per client. ``channel.close`` from the peer ends one channel as if
that client's connection had closed; closing the real connection closes its channels first.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from corral.agent.loop import Loop, log
from corral.protocol.frames import Decoder, Frame, ProtocolError, encode

__all__ = ["HIGH_WATER", "LOW_WATER", "MAX_CHANNELS", "Channel", "Connection", "Producer"]

HIGH_WATER = 1024 * 1024  # queued bytes above which producers stop: ~8 chunks, enough to keep a pipe full
LOW_WATER = 256 * 1024  # resume producers once the peer took most of it, so wake-ups are not per-frame
INPUT_PAUSE = 4 * 1024 * 1024  # answers queued (beyond what producers add) before we stop reading requests
READ_SIZE = 256 * 1024
IOV_MAX = 64
MAX_CHANNELS = 1024  # virtual connections open at once on one connection (the shim opens one per client)


class Producer(Protocol):
    def produce(self) -> bool:
        """Emit at most one frame; return whether more may be ready right away."""

    def cancel(self) -> None:
        """The connection closed; release resources (called once, instead of further ``produce`` calls)."""


class Connection:
    def __init__(
        self,
        loop: Loop,
        rfd: int,
        wfd: int,
        name: str,
        on_frame: Callable[[Connection, Frame], None],
        on_close: Callable[[Connection], None],
        on_channel_close: Callable[[Connection], None] | None = None,
    ) -> None:
        self.loop = loop
        self.rfd = rfd
        self.wfd = wfd
        self.name = name
        self._on_frame = on_frame
        self._on_close = on_close
        self._decoder = Decoder()
        self._out: deque[memoryview] = deque()
        self.queued = 0
        self._ready: dict[Producer, None] = {}  # insertion-ordered set of producers with output ready
        self._producers: set[Producer] = set()
        self._pumping = False
        self._read_pauses = 0
        self._paused_for_output = False
        self.inflight: set[str] = set()
        self.closed = False
        self.channels: dict[str, Channel] = {}
        self._on_channel_close = on_channel_close
        try:
            os.set_blocking(rfd, False)
            os.set_blocking(wfd, False)
            loop.add_reader(rfd, self._on_readable)
        except OSError as exc:  # e.g. stdin is a regular file or /dev/null, which epoll refuses
            reason = f"cannot watch the connection: {exc}"
            loop.call_soon(lambda: self.close(reason))

    # --- input -----------------------------------------------------------------------------------------------
    def _on_readable(self) -> None:
        try:
            data = os.read(self.rfd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(f"read failed: {exc}")
            return
        if not data:
            self.close("peer closed the connection")
            return
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as exc:
            self.close(f"protocol error: {exc}")
            return
        for frame in frames:
            if self.closed:
                return
            self._on_frame(self, frame)

    def pause_reading(self) -> None:
        self._read_pauses += 1
        if self._read_pauses == 1 and not self.closed:
            self.loop.remove_reader(self.rfd)

    def resume_reading(self) -> None:
        self._read_pauses -= 1
        if self._read_pauses == 0 and not self.closed:
            self.loop.add_reader(self.rfd, self._on_readable)

    # --- output ----------------------------------------------------------------------------------------------
    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        if self.closed:
            return
        try:
            data = encode(header, payload)
        except ProtocolError as exc:  # a bug, or a value the client chose that made the header too long
            log(f"dropping an oversized {header.get('ev')!r} frame: {exc}")
            if header.get("ev") not in ("ok", "exit", "error"):
                return
            data = encode(
                {
                    "id": header.get("id"),
                    "ev": "error",
                    "code": "too_large",
                    "message": "the answer does not fit in one frame",
                }
            )
        if not self._out:
            try:
                n = os.write(self.wfd, data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self.close(f"write failed: {exc}")
                return
            if n == len(data):
                return
            self._out.append(memoryview(data)[n:])
            self.queued += len(data) - n
            self.loop.add_writer(self.wfd, self._on_writable)
            return
        self._out.append(memoryview(data))
        self.queued += len(data)
        if self.queued > INPUT_PAUSE and not self._paused_for_output:
            # A client that sends requests but does not read the answers: stop reading its requests.
            self._paused_for_output = True
            self.pause_reading()

    def finish(self, rid: str, header: dict[str, Any], payload: bytes = b"") -> None:
        """Send the terminal frame of request ``rid``."""
        self.inflight.discard(rid)
        self.send({"id": rid, **header}, payload)

    def error(self, rid: str, code: str, message: str) -> None:
        self.finish(rid, {"ev": "error", "code": str(code), "message": message})

    @property
    def has_room(self) -> bool:
        return self.queued < HIGH_WATER and not self.closed

    def _on_writable(self) -> None:
        bufs = [self._out[i] for i in range(min(IOV_MAX, len(self._out)))]
        try:
            n = os.writev(self.wfd, bufs)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(f"write failed: {exc}")
            return
        self.queued -= n
        while n:
            head = self._out[0]
            if n >= len(head):
                n -= len(head)
                self._out.popleft()
            else:
                self._out[0] = head[n:]
                n = 0
        if not self._out:
            self.loop.remove_writer(self.wfd)
        if self.queued < LOW_WATER:
            if self._paused_for_output:
                self._paused_for_output = False
                self.resume_reading()
            if self._ready:
                self.pump()

    # --- producers -------------------------------------------------------------------------------------------
    def add_producer(self, producer: Producer) -> None:
        self._producers.add(producer)
        self.wake(producer)

    def remove_producer(self, producer: Producer) -> None:
        self._producers.discard(producer)
        self._ready.pop(producer, None)

    def wake(self, producer: Producer) -> None:
        """``producer`` has output ready; it will be asked for it as soon as there is room."""
        if self.closed or producer not in self._producers:
            return
        self._ready[producer] = None
        if self.queued < HIGH_WATER:
            self.pump()

    def pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._ready and self.queued < HIGH_WATER and not self.closed:
                producer = next(iter(self._ready))
                del self._ready[producer]
                if producer.produce() and producer in self._producers:
                    self._ready[producer] = None
        finally:
            self._pumping = False

    # --- channels --------------------------------------------------------------------------------------------
    def channel(self, name: str) -> Connection:
        """The channel ``name`` of this connection, opened on its first frame."""
        chan = self.channels.get(name)
        if chan is None:
            if len(self.channels) >= MAX_CHANNELS:
                raise OverflowError(f"more than {MAX_CHANNELS} channels on one connection")
            chan = self.channels[name] = Channel(self, name, self._on_channel_close)
        return chan

    def close_channel(self, name: str) -> None:
        chan = self.channels.pop(name, None)
        if chan is not None:
            chan.close("its client left")

    # --- closing ---------------------------------------------------------------------------------------------
    def close(self, reason: str = "closed") -> None:
        if self.closed:
            return
        for name in list(self.channels):  # their clients are gone with this connection
            self.close_channel(name)
        self.closed = True
        log(f"connection {self.name} closed: {reason}")
        self.loop.forget(self.rfd)
        self.loop.forget(self.wfd)
        self._out.clear()
        self.queued = 0
        producers, self._producers = self._producers, set()
        self._ready.clear()
        for producer in producers:
            try:
                producer.cancel()
            except Exception as exc:  # keep cancelling the others
                log(f"cancelling a producer failed: {exc!r}")
        for fd in {self.rfd, self.wfd}:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._on_close(self)


class Channel(Connection):
    """A virtual connection: one relayed client's share of a real connection (see the module docstring).

    Frames go out through the parent (ids are the peer's own, so the peer routes them); producers are pumped
    by the parent but owned here, so closing the channel cancels only this client's streams.
    """

    def __init__(
        self, parent: Connection, name: str, on_close: Callable[[Connection], None] | None
    ) -> None:  # no fds of its own: Connection.__init__ is not called
        self.parent = parent
        self.key = name
        self.loop = parent.loop
        self.name = f"{parent.name}/{name}"
        self._channel_on_close = on_close
        self._producers = set()
        self.inflight = set()
        self.closed = False
        self.channels = {}

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        if not self.closed:
            self.parent.send(header, payload)

    @property
    def has_room(self) -> bool:
        return self.parent.has_room and not self.closed

    @property
    def queued(self) -> int:  # type: ignore[override]
        return self.parent.queued

    def pause_reading(self) -> None:
        self.parent.pause_reading()

    def resume_reading(self) -> None:
        self.parent.resume_reading()

    def add_producer(self, producer: Producer) -> None:
        if not self.closed:
            self._producers.add(producer)
            self.parent.add_producer(producer)

    def remove_producer(self, producer: Producer) -> None:
        self._producers.discard(producer)
        self.parent.remove_producer(producer)

    def wake(self, producer: Producer) -> None:
        if not self.closed and producer in self._producers:
            self.parent.wake(producer)

    def pump(self) -> None:
        self.parent.pump()

    def channel(self, name: str) -> Connection:
        raise OverflowError("channels do not nest")

    def close(self, reason: str = "closed") -> None:
        if self.closed:
            return
        self.closed = True
        log(f"channel {self.name} closed: {reason}")
        producers, self._producers = self._producers, set()
        for producer in producers:
            self.parent.remove_producer(producer)
            try:
                producer.cancel()
            except Exception as exc:  # keep cancelling the others
                log(f"cancelling a producer failed: {exc!r}")
        self.parent.channels.pop(self.key, None)
        if self._channel_on_close is not None:
            self._channel_on_close(self)
