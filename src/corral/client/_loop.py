"""A private event loop on a daemon thread, reached through a blocking portal, that never outlives its use.

The sync embedded client runs the async core on such a loop. anyio's ``start_blocking_portal()`` is a
generator context manager: a client that is never closed (a script that ends without ``with`` or
``close()``) leaves the generator suspended, and the interpreter finalizes it while tearing down modules,
after it has already frozen every daemon thread, the loop's included. Its ``finally`` then asks the frozen
loop to stop and waits for an answer that never comes: the script prints its last line and hangs.

:class:`LoopThread` owns its thread explicitly instead, and its owner registers the stop with
``weakref.finalize``, which runs it when the owner is collected or else from ``atexit``: after
``threading._shutdown`` has joined the caller's own (non-daemon) threads, so those can still use the
client, and before daemon threads are frozen, so the loop still answers. Every wait here is bounded.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import anyio
from anyio.from_thread import BlockingPortal

__all__ = ["LoopThread"]

STOP_TIMEOUT = 10.0  # seconds for the owner's last coroutine (closing connections), then for the loop to end


class LoopThread:
    """An anyio event loop on its own daemon thread; ``portal`` reaches it from any other thread."""

    def __init__(self, name: str = "corral-loop") -> None:
        started: Future[BlockingPortal] = Future()
        self._thread = threading.Thread(target=self._run, args=(started,), name=name, daemon=True)
        self._thread.start()
        self.portal = started.result()

    @staticmethod
    def _run(started: Future[BlockingPortal]) -> None:
        async def serve() -> None:
            async with BlockingPortal() as portal:
                started.set_result(portal)
                await portal.sleep_until_stopped()

        try:
            anyio.run(serve)
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)

    def stop(
        self, last: Callable[[], Awaitable[object]] | None = None, timeout: float = STOP_TIMEOUT
    ) -> None:
        """Run ``last()`` on the loop (its error is raised here), then stop the loop and join its thread.

        Idempotent. Called on the loop's own thread (the owner's last reference dropped there), it hands the
        work to a short-lived thread instead of waiting on itself.
        """
        if threading.current_thread() is self._thread:
            threading.Thread(target=self._stop_quietly, args=(last, timeout), daemon=True).start()
            return
        if not self._thread.is_alive():
            return
        try:
            if last is not None:
                with contextlib.suppress(FutureTimeout):  # cancelled: stopping the loop must not wait on it
                    self._bounded(self.portal.start_task_soon(last), timeout)
        finally:
            with contextlib.suppress(RuntimeError, FutureTimeout):  # RuntimeError: it already stopped
                self._bounded(self.portal.start_task_soon(self.portal.stop, True), timeout)
            self._thread.join(timeout)

    def _stop_quietly(self, last: Callable[[], Awaitable[object]] | None, timeout: float) -> None:
        with contextlib.suppress(Exception):
            self.stop(last, timeout)

    @staticmethod
    def _bounded(future: Future[object], timeout: float) -> None:
        try:
            future.result(timeout)
        except FutureTimeout:
            future.cancel()
            raise
