"""Sandbox change events: every write of a sandbox record, pushed to the subscribers allowed to see it.

The service's store is wrapped (:class:`ObservedStore`) so that every ``put_sandbox`` and ``delete_sandbox``,
whoever makes it (the service, the reaper, warm pools, forks), is published once it is stored: there is no
second place to remember. Subscribers are scoped when they subscribe: a tenant gets its own sandboxes, and
``None`` (an admin) gets the writes that change warm pools (members, :data:`POOL_TENANT`, which no tenant can
see, and sandboxes claimed out of a pool); the route turns those into pool numbers, never a tenant's data. Delivery is
in-process (one server); a slow subscriber that lets its buffer fill is dropped with a ``lagged`` marker
rather than slowing every write, and is expected to reconnect and list again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from corral.core.records import POOL_TENANT, SandboxRecord
from corral.core.store import Store
from corral.ids import SandboxId, TenantId

__all__ = ["SandboxChange", "SandboxEvents", "observed"]

BUFFER = 256  # changes a subscriber may fall behind by before it is dropped


@dataclass(frozen=True, kw_only=True)
class SandboxChange:
    """One stored change: the record as it now is, or ``removed`` (a create that failed and was undone)."""

    record: SandboxRecord
    removed: bool = False


def _pool_change(record: SandboxRecord) -> bool:
    """Does this write change a warm pool's numbers? (A member, or one just claimed out of a pool.)"""
    return record.tenant_id == POOL_TENANT or record.from_pool


class SandboxEvents:
    """In-process fan-out of :class:`SandboxChange` to scoped subscribers."""

    def __init__(self) -> None:
        self._subs: dict[int, tuple[TenantId | None, MemoryObjectSendStream[SandboxChange | None]]] = {}
        self._next = 0

    def publish(self, change: SandboxChange) -> None:
        tenant = change.record.tenant_id
        for key, (scope, send) in list(self._subs.items()):
            if scope != tenant and not (scope is None and _pool_change(change.record)):
                continue
            if send.statistics().current_buffer_used >= BUFFER:
                self._drop(key)  # the one place left in its buffer takes the "lagged" marker
                continue
            try:
                send.send_nowait(change)
            except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._subs.pop(key, None)

    def _drop(self, key: int) -> None:
        _, send = self._subs.pop(key)
        with contextlib.suppress(anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
            send.send_nowait(None)  # the receiver's marker: changes were lost
        send.close()

    @contextlib.contextmanager
    def subscribe(self, tenant: TenantId | None) -> Iterator[MemoryObjectReceiveStream[SandboxChange | None]]:
        """Changes for ``tenant`` (``None``: warm-pool members) from now on; ``None`` items mean "lagged"."""
        send, receive = anyio.create_memory_object_stream[SandboxChange | None](BUFFER + 1)
        key = self._next
        self._next += 1
        self._subs[key] = (tenant, send)
        try:
            with receive:
                yield receive
        finally:
            self._subs.pop(key, None)
            send.close()

    @property
    def subscribers(self) -> int:
        return len(self._subs)


class ObservedStore:
    """``store`` with its sandbox writes published to ``events``; everything else is passed through."""

    def __init__(self, store: Store, events: SandboxEvents) -> None:
        self._inner = store
        self._events = events

    @property
    def inner(self) -> Store:
        return self._inner

    async def put_sandbox(self, record: SandboxRecord, *, expect_version: int | None) -> SandboxRecord:
        stored = await self._inner.put_sandbox(record, expect_version=expect_version)
        self._events.publish(SandboxChange(record=stored))
        return stored

    async def delete_sandbox(self, sandbox_id: SandboxId) -> None:
        record = await self._inner.get_sandbox(sandbox_id)
        await self._inner.delete_sandbox(sandbox_id)
        if record is not None:
            self._events.publish(SandboxChange(record=record, removed=True))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def observed(store: Store, events: SandboxEvents) -> Store:
    """The store to use in place of ``store`` so that ``events`` sees every sandbox write."""
    wrapped: Any = ObservedStore(store, events)
    result: Store = wrapped
    return result
