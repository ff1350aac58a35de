"""AgentClient's shared reading: a frame handed to a waiting request wakes it, whoever reads next.

The agent here is a script on the other end of a socket pair (the client only needs a byte stream): it answers
what the test tells it to, so the order of frames, the thing under test, is exact.
"""

from __future__ import annotations

import socket

import anyio
import pytest
from anyio.abc import SocketStream

from corral.core.agent_client import AgentClient
from corral.protocol import PROTOCOL_VERSION, Decoder, encode

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _pair() -> tuple[SocketStream, SocketStream]:
    a, b = socket.socketpair()
    return await SocketStream.from_socket(a), await SocketStream.from_socket(b)


async def test_an_answer_routed_by_one_reader_is_not_stranded_behind_the_next() -> None:
    """Three requests at once: two long streams (A, B) and a call (C). A reads and routes C's answer, then
    steps down; B becomes the reader and waits for data that never comes. C must still get its answer (it
    used to wait for B's read to end: a read lock held across a receive that had nothing to receive)."""
    ours, agent = await _pair()
    decoder = Decoder()
    await agent.send(encode({"ev": "hello", "version": PROTOCOL_VERSION}))
    async with agent:
        client = await AgentClient.open(ours, sandbox_id="sb-test")
        ids: dict[str, str] = {}

        async def agent_reads(n: int) -> None:
            while len(ids) < n:
                for frame in decoder.feed(await agent.receive()):
                    ids[frame.get("op")] = frame.get("id")

        async def stream(op: str, started: anyio.Event) -> None:
            async with client.request(op) as req:
                async for frame in req:
                    if frame.get("ev") == "started":
                        started.set()

        a_started, b_started = anyio.Event(), anyio.Event()
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(stream, "a", a_started)
                await agent_reads(1)
                await agent.send(encode({"id": ids["a"], "ev": "started"}))
                await a_started.wait()  # A is now the reader, blocked in receive
                tg.start_soon(stream, "b", b_started)
                await agent_reads(2)
                await agent.send(encode({"id": ids["b"], "ev": "started"}))
                await b_started.wait()
                answered: dict[str, object] = {}
                done = anyio.Event()

                async def call() -> None:
                    answered.update(await client.call("c", timeout=None))
                    done.set()

                tg.start_soon(call)
                await agent_reads(3)
                await agent.send(encode({"id": ids["c"], "ev": "ok", "value": 42}))
                await done.wait()  # bounded by fail_after: the call returns or the test fails
                assert answered["value"] == 42
                tg.cancel_scope.cancel()
        await client.aclose()
