"""Server-side directory watches for the sync SDK's polling ``watch_dir``.

``CreateWatcher`` opens a Corral watch (``SandboxService.watch_dir``) that a task of :meth:`Watchers.run`
keeps reading into a bounded buffer; ``GetWatcherEvents`` takes what has gathered; ``RemoveWatcher`` ends the
watch in the sandbox. A watcher belongs to one sandbox and tenant: any other caller is told it does not exist.
Limits keep a client that forgets its watchers from costing the server without bound: a watcher nobody has
polled for ``IDLE_TIMEOUT`` seconds is removed, a sandbox has at most ``MAX_PER_SANDBOX``, and a buffer keeps
the newest ``MAX_EVENTS`` events. When the sandbox goes away the watch ends; the events it left are still
handed out once, then the watcher is gone.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import AsyncIterator

import anyio
import anyio.abc

from corral.errors import CorralError, NotFound, ResourceExhausted
from corral.server.e2b.envd._access import SandboxCall
from corral.server.e2b.envd._entries import plain_events, with_entries
from corral.server.e2b.envd._pb import filesystem_pb2 as pb

__all__ = ["Watchers"]

IDLE_TIMEOUT = 600.0
MAX_PER_SANDBOX = 32
MAX_EVENTS = 10_000
SWEEP_EVERY = 30.0


class _Watch:
    def __init__(self, call: SandboxCall) -> None:
        self.call = call
        self.events: deque[pb.FilesystemEvent] = deque(maxlen=MAX_EVENTS)
        self.ready = anyio.Event()
        self.error: CorralError | None = None
        self.ended = False
        self.scope = anyio.CancelScope()
        self.polled = time.monotonic()

    async def run(self, source: AsyncIterator[pb.FilesystemEvent | None]) -> None:
        with self.scope:
            try:
                async for event in source:
                    if event is None:  # the watch is live: CreateWatcher may answer
                        self.ready.set()
                    else:
                        self.events.append(event)
            except CorralError as exc:
                self.error = exc
            finally:
                self.ended = True
                self.ready.set()
                with anyio.CancelScope(shield=True):
                    await source.aclose()  # type: ignore[attr-defined]


class Watchers:
    def __init__(self) -> None:
        self._watches: dict[str, _Watch] = {}
        self._tg: anyio.abc.TaskGroup | None = None

    async def run(self) -> None:
        """Own the watch tasks (run it in the app's task group); sweeps idle watchers."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            try:
                while True:
                    await anyio.sleep(SWEEP_EVERY)
                    now = time.monotonic()
                    for wid, watch in list(self._watches.items()):
                        if now - watch.polled > IDLE_TIMEOUT:
                            self._drop(wid)
            finally:
                self._tg = None
                tg.cancel_scope.cancel()

    async def create(
        self, call: SandboxCall, path: str, *, recursive: bool, include_entry: bool, user: str | None
    ) -> str:
        if self._tg is None:
            raise CorralError("the server is not serving watchers (it is shutting down)")
        mine = [w for w in self._watches.values() if w.call.sandbox_id == call.sandbox_id]
        if len(mine) >= MAX_PER_SANDBOX:
            raise ResourceExhausted(
                f"sandbox {call.sandbox_id} has {MAX_PER_SANDBOX} watchers; remove some before adding more"
            )
        events = await call.service.watch_dir(
            call.sandbox_id, path, recursive=recursive, user=user, tenant=call.tenant
        )
        watch = _Watch(call)
        source = with_entries(call, path, events, user) if include_entry else plain_events(events)
        self._tg.start_soon(watch.run, source)
        await watch.ready.wait()
        if watch.error is not None:
            raise watch.error
        wid = "w-" + secrets.token_hex(8)
        self._watches[wid] = watch
        return wid

    def _get(self, call: SandboxCall, watcher_id: str) -> _Watch:
        watch = self._watches.get(watcher_id)
        if watch is None or watch.call.sandbox_id != call.sandbox_id or watch.call.tenant != call.tenant:
            raise NotFound(f"watcher {watcher_id[:64]!r} not found")
        return watch

    def take(self, call: SandboxCall, watcher_id: str) -> list[pb.FilesystemEvent]:
        watch = self._get(call, watcher_id)
        watch.polled = time.monotonic()
        events = list(watch.events)
        watch.events.clear()
        if watch.ended and not events:
            self._watches.pop(watcher_id, None)
            raise NotFound(f"watcher {watcher_id} ended: its sandbox stopped or the directory went away")
        return events

    def remove(self, call: SandboxCall, watcher_id: str) -> None:
        self._get(call, watcher_id)
        self._drop(watcher_id)

    def _drop(self, watcher_id: str) -> None:
        watch = self._watches.pop(watcher_id, None)
        if watch is not None:
            watch.scope.cancel()
