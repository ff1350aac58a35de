"""The host end of a shim's agent socket: a byte stream that may be abandoned in the middle of a read.

anyio's ``UNIXSocketStream`` (asyncio backend) waits for a readable socket on a future that the event loop's
reader callback completes (``loop.add_reader(sock, future.set_result, None)``). When the waiting task is
cancelled in the same loop iteration in which the socket becomes readable, the callback still runs on the
cancelled future and asyncio logs ``Exception in callback Future.set_result(None) … InvalidStateError``
(the data is not lost: nothing was read). Abandoning a request while its frames arrive is ordinary here: the
sync SDK cancels its pump when a caller stops iterating a command's output, and an async caller may cancel
too. This stream waits with ``anyio.wait_readable`` / ``wait_writable``, whose callbacks tolerate a cancelled
waiter, and otherwise behaves like anyio's: each call is a checkpoint, EOF is ``EndOfStream``, a broken
socket ``BrokenResourceError``, use after ``aclose`` ``ClosedResourceError``.
"""

from __future__ import annotations

import socket

import anyio
import anyio.lowlevel
from anyio.abc import ByteStream

__all__ = ["UnixStream", "connect_unix"]


class UnixStream(ByteStream):
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.lowlevel.checkpoint()
        while True:
            self._check_open()
            try:
                data = self._sock.recv(max_bytes)
            except (BlockingIOError, InterruptedError):
                await anyio.wait_readable(self._sock)
                continue
            except OSError as exc:
                self._check_open()
                raise anyio.BrokenResourceError from exc
            if not data:
                raise anyio.EndOfStream
            return data

    async def send(self, item: bytes) -> None:
        await anyio.lowlevel.checkpoint()
        view = memoryview(item)
        while view:
            self._check_open()
            try:
                sent = self._sock.send(view)
            except (BlockingIOError, InterruptedError):
                await anyio.wait_writable(self._sock)
                continue
            except OSError as exc:
                self._check_open()
                raise anyio.BrokenResourceError from exc
            view = view[sent:]

    async def send_eof(self) -> None:
        self._check_open()
        self._sock.shutdown(socket.SHUT_WR)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            anyio.notify_closing(self._sock)  # a task waiting to read or write gets ClosedResourceError
            self._sock.close()
        await anyio.lowlevel.checkpoint()


async def connect_unix(path: str) -> UnixStream:
    """Connect to the Unix socket ``path`` (OSError as ``socket.connect`` raises it)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        try:
            sock.connect(path)
        except (BlockingIOError, InterruptedError):  # the listener's backlog is full: wait for room
            await anyio.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, f"connect {path}") from None
    except BaseException:
        sock.close()
        raise
    return UnixStream(sock)
