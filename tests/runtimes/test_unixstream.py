"""The shim connection's stream (runtimes/_unixstream.py) can be abandoned mid-read without asyncio errors.

The race it avoids: the reading task is cancelled in the same event-loop iteration in which the socket becomes
readable. ``loop.call_soon(scope.cancel)`` followed by making the socket readable puts both in one iteration,
the cancel first, every time.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest

from corral.runtimes._unixstream import UnixStream

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the race is in anyio's asyncio backend


async def abandon_a_read_as_data_arrives(
    receive: Callable[[], Awaitable[bytes]], peer: socket.socket
) -> list[Any]:
    loop = asyncio.get_running_loop()
    errors: list[Any] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    scope = anyio.CancelScope()

    async def reader() -> None:
        with scope:
            await receive()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            await anyio.wait_all_tasks_blocked()  # the reader waits for the socket to become readable
            loop.call_soon(scope.cancel)
            peer.send(b"x")
        for _ in range(3):
            await anyio.lowlevel.checkpoint()
    finally:
        loop.set_exception_handler(previous)
    return errors


async def test_a_read_abandoned_as_data_arrives_logs_nothing_and_loses_nothing() -> None:
    mine, peer = socket.socketpair()
    stream = UnixStream(mine)
    try:
        assert await abandon_a_read_as_data_arrives(stream.receive, peer) == []
        assert await stream.receive() == b"x"  # the byte is still there for the next read
    finally:
        await stream.aclose()
        peer.close()


async def test_closing_wakes_a_waiting_reader() -> None:
    mine, peer = socket.socketpair()
    stream = UnixStream(mine)
    raised: list[BaseException] = []

    async def read() -> None:
        try:
            await stream.receive()
        except anyio.ClosedResourceError as exc:
            raised.append(exc)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            await anyio.wait_all_tasks_blocked()
            await stream.aclose()
    finally:
        peer.close()
    assert len(raised) == 1


async def test_large_sends_wait_for_room_and_eof_ends_reads() -> None:
    mine, peer = socket.socketpair()
    stream = UnixStream(mine)
    data = b"hello " * 100_000  # more than the socket buffers hold: send waits for the peer to read
    got = bytearray()

    def drain() -> None:
        while len(got) < len(data):
            got.extend(peer.recv(1 << 20))

    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, drain)
        await stream.send(data)
    assert bytes(got) == data
    peer.close()
    with pytest.raises(anyio.EndOfStream):
        await stream.receive()
    await stream.aclose()
