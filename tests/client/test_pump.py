"""The sync embedded client's pump (client/_pump.py): items, errors, back-pressure and early stops.

A real blocking portal (an event loop on a thread, as ``LocalBackend`` uses) and real async generators; no
sandbox is needed to check how items cross between the threads.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal

from corral.client._pump import WINDOW, Pump


@pytest.fixture
def portal() -> Iterator[BlockingPortal]:
    with start_blocking_portal() as p:
        yield p


def test_items_arrive_in_order_then_the_iterator_ends(portal: BlockingPortal) -> None:
    async def numbers() -> AsyncIterator[int]:
        for i in range(500):
            yield i

    assert list(Pump(portal, numbers)) == list(range(500))


def test_an_error_is_raised_in_the_callers_thread_after_the_items_before_it(portal: BlockingPortal) -> None:
    async def failing() -> AsyncIterator[int]:
        yield 1
        raise KeyError("boom")

    it = iter(Pump(portal, failing))
    assert next(it) == 1
    with pytest.raises(KeyError, match="boom"):
        next(it)


def test_a_slow_reader_holds_back_the_producer_to_the_window(portal: BlockingPortal) -> None:
    produced = 0
    blocked = threading.Event()

    async def endless() -> AsyncIterator[int]:
        nonlocal produced
        while True:
            produced += 1
            if produced == WINDOW + 2:  # asked for one more than the window plus the one in hand
                blocked.set()
            yield produced

    it = Pump(portal, endless).__iter__()
    assert next(it) == 1
    assert blocked.wait(10)
    # the pump holds item WINDOW + 2 and waits for space; nothing beyond it is asked for
    assert portal.call(lambda: produced) == WINDOW + 2
    assert [next(it) for _ in range(WINDOW)] == list(range(2, WINDOW + 2))
    it.close()


def test_stopping_early_closes_the_async_iterator_before_returning(portal: BlockingPortal) -> None:
    closed = threading.Event()
    waiting = threading.Event()

    async def stream() -> AsyncIterator[int]:
        try:
            yield 1
            waiting.set()
            await anyio.sleep_forever()  # like a command that prints nothing more
            yield 2
        finally:
            closed.set()

    it = Pump(portal, stream).__iter__()
    assert next(it) == 1
    assert waiting.wait(10)
    it.close()  # the pump is cancelled while it waits on the async iterator
    assert closed.is_set()
