"""A minimal single-threaded event loop: fd readiness callbacks, timers, and signals as events.

Why not asyncio: the agent is latency-critical (every exec round trip passes through it) and must start fast;
asyncio costs ~10 ms of imports and a few layers of indirection per event. Why not threads: the agent forks
(processes, file workers), and forking a multi-threaded Python process is only safe if no other thread holds a
lock at that moment; with one thread the agent can fork at any time. One thread also gives the protocol its
"one writer per output stream" property for free.

Callbacks run to completion; an exception escaping one is logged and the loop goes on, because a bug in one
request must not take down every process in the sandbox.

Signals arrive through :func:`signal.set_wakeup_fd`: the C-level handler writes the signal number to a pipe the
loop watches, so SIGCHLD is handled as an ordinary event, between callbacks, never re-entrantly.
"""

from __future__ import annotations

import heapq
import os
import selectors
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Loop", "Timer", "log"]

Callback = Callable[[], None]


def log(message: str) -> None:
    """One line on stderr, which is the sandbox's agent log (no ``logging``: it costs startup time)."""
    try:
        sys.stderr.write(f"corral-agent[{os.getpid()}]: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


class Timer:
    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callback) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def __lt__(self, other: Timer) -> bool:
        return self.when < other.when

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._readers: dict[int, Callback] = {}
        self._writers: dict[int, Callback] = {}
        self._timers: list[Timer] = []
        self._soon: list[Callback] = []
        self._signal_handlers: dict[int, Callback] = {}
        self._wake_r = -1
        self.running = False

    # --- fds -------------------------------------------------------------------------------------------------
    def _update(self, fd: int) -> None:
        mask = (selectors.EVENT_READ if fd in self._readers else 0) | (
            selectors.EVENT_WRITE if fd in self._writers else 0
        )
        try:
            key: selectors.SelectorKey | None = self._sel.get_key(fd)
        except KeyError:
            key = None
        if key is None:
            if mask:
                self._sel.register(fd, mask)
        elif not mask:
            self._sel.unregister(fd)
        elif key.events != mask:
            self._sel.modify(fd, mask)

    def add_reader(self, fd: int, callback: Callback) -> None:
        self._readers[fd] = callback
        self._update(fd)

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            self._update(fd)

    def add_writer(self, fd: int, callback: Callback) -> None:
        self._writers[fd] = callback
        self._update(fd)

    def remove_writer(self, fd: int) -> None:
        if self._writers.pop(fd, None) is not None:
            self._update(fd)

    def forget(self, fd: int) -> None:
        """Stop watching ``fd`` at all; call before closing it (a reused fd number must not inherit interest)."""
        self._readers.pop(fd, None)
        self._writers.pop(fd, None)
        self._update(fd)

    # --- time ------------------------------------------------------------------------------------------------
    def call_later(self, delay: float, callback: Callback) -> Timer:
        timer = Timer(time.monotonic() + delay, callback)
        heapq.heappush(self._timers, timer)
        return timer

    def call_soon(self, callback: Callback) -> None:
        """Run ``callback`` after the current one, before waiting for I/O again."""
        self._soon.append(callback)

    # --- signals ---------------------------------------------------------------------------------------------
    def add_signal_handler(self, signum: int, callback: Callback) -> None:
        if self._wake_r < 0:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._wake_r = r
            signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            self.add_reader(r, self._on_wakeup)
        self._signal_handlers[signum] = callback
        signal.signal(signum, _ignore_in_python)

    def _on_wakeup(self) -> None:
        try:
            data = os.read(self._wake_r, 4096)
        except BlockingIOError:
            return
        for signum in set(data):
            handler = self._signal_handlers.get(signum)
            if handler is not None:
                self.run_callback(handler)
        # A full wake-up pipe drops signal numbers; SIGCHLD handling polls waitpid anyway, so run it regardless.
        chld = self._signal_handlers.get(signal.SIGCHLD)
        if chld is not None and signal.SIGCHLD not in data:
            self.run_callback(chld)

    # --- running ---------------------------------------------------------------------------------------------
    @staticmethod
    def run_callback(callback: Callable[..., None], *args: Any) -> None:
        """Call ``callback(*args)``; an exception is logged, not raised: it must not stop the agent."""
        try:
            callback(*args)
        except Exception:
            import traceback

            log("internal error:\n" + traceback.format_exc().rstrip())

    def run(self) -> None:
        self.running = True
        while self.running:
            if self._soon:
                timeout: float | None = 0
            elif self._timers:
                timeout = max(0.0, self._timers[0].when - time.monotonic())
            else:
                timeout = None
            for key, mask in self._sel.select(timeout):
                fd = key.fd
                if mask & selectors.EVENT_READ:
                    cb = self._readers.get(fd)
                    if cb is not None:
                        self.run_callback(cb)
                if mask & selectors.EVENT_WRITE:
                    cb = self._writers.get(fd)
                    if cb is not None:
                        self.run_callback(cb)
            if self._timers:
                now = time.monotonic()
                while self._timers and self._timers[0].when <= now:
                    timer = heapq.heappop(self._timers)
                    if not timer.cancelled:
                        self.run_callback(timer.callback)
            while self._soon:
                soon, self._soon = self._soon, []
                for cb in soon:
                    self.run_callback(cb)

    def stop(self) -> None:
        self.running = False


def _ignore_in_python(signum: int, frame: object) -> None:
    """The Python-level handler does nothing: the wake-up fd carries the signal to the loop."""
