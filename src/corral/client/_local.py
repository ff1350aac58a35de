"""Embedded mode: the SDK backed by the in-process core, with no server.

This is the one client module allowed to import the core, the store and the runtime registry (the
import-linter contract names it). ``AsyncLocalBackend`` calls :class:`SandboxService` directly in the caller's
event loop. ``LocalBackend`` gives the generated sync SDK the same thing: it runs an ``AsyncLocalBackend`` on an
event loop in a private thread (an anyio blocking portal) and forwards each call there.

Sandboxes outlive the process: state is in SQLite under the data directory and each sandbox has its own shim,
so ``Sandbox.connect(id)`` works from another process (another CLI call, say).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import queue
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import AbstractAsyncContextManager, AbstractContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import anyio.to_thread

from corral import ops
from corral.client._forward import forward
from corral.client._loop import LoopThread
from corral.client._pump import Pump
from corral.core.ports import PortStream
from corral.core.records import LOCAL_TENANT, TemplateRecord
from corral.core.service import SandboxService
from corral.core.settings import Settings
from corral.errors import InvalidRequest, InvalidState
from corral.ids import TenantId
from corral.models import (
    BuildEvent,
    BuildParams,
    CodeContext,
    CodeEvent,
    CreateParams,
    EntryInfo,
    ExecParams,
    FilesystemEvent,
    NetworkStatus,
    PoolInfo,
    PoolParams,
    PortForward,
    ProcessEvent,
    ProcessInfo,
    PtyParams,
    ResourceSample,
    RunCodeParams,
    SandboxInfo,
    SandboxState,
    TemplateInfo,
)
from corral.ops import Op
from corral.wiring import open_service

__all__ = ["AsyncLocalBackend", "LocalBackend", "open_service"]

T = TypeVar("T")


class AsyncLocalBackend:
    url: str | None = None  # embedded: no server, so no port proxy either

    def __init__(self, service: SandboxService, *, tenant: TenantId = LOCAL_TENANT) -> None:
        self.service = service
        self.tenant = tenant  # the principal of every call: below this class, no tenant is implied

    @classmethod
    def from_env(cls, **overrides: Any) -> AsyncLocalBackend:
        return cls(open_service(Settings.load(**overrides)))

    async def create_sandbox(self, params: CreateParams) -> SandboxInfo:
        return await self.service.create(params, tenant=self.tenant)

    async def call(self, op: Op[T], **args: Any) -> T:
        """One unary operation of the op table (corral/ops.py): the service function its row names."""
        return cast(T, await getattr(self.service, op.name)(**args, tenant=self.tenant))

    async def get_sandbox(self, sandbox_id: str) -> SandboxInfo:
        return await self.call(ops.GET, sandbox_id=sandbox_id)

    async def list_sandboxes(
        self, *, metadata: dict[str, str] | None = None, states: frozenset[SandboxState] | None = None
    ) -> list[SandboxInfo]:
        return await self.service.list_sandboxes(metadata=metadata, states=states, tenant=self.tenant)

    async def kill_sandbox(self, sandbox_id: str) -> SandboxInfo:
        return await self.call(ops.KILL, sandbox_id=sandbox_id)

    async def set_timeout(self, sandbox_id: str, seconds: float) -> SandboxInfo:
        return await self.call(ops.SET_TIMEOUT, sandbox_id=sandbox_id, seconds=seconds)

    async def update_network(self, sandbox_id: str, network: Any) -> SandboxInfo:
        return await self.call(ops.UPDATE_NETWORK, sandbox_id=sandbox_id, network=network)

    async def network_status(self, sandbox_id: str) -> NetworkStatus:
        return await self.call(ops.NETWORK_STATUS, sandbox_id=sandbox_id)

    async def sandbox_metrics(
        self, sandbox_id: str, start: float | None = None, end: float | None = None
    ) -> list[ResourceSample]:
        return await self.service.metrics(sandbox_id, tenant=self.tenant, start=start, end=end)

    async def snapshot_sandbox(self, sandbox_id: str, name: str, *, description: str = "") -> TemplateInfo:
        return await self.call(ops.SNAPSHOT, sandbox_id=sandbox_id, name=name, description=description)

    async def fork_sandbox(self, sandbox_id: str, count: int) -> list[SandboxInfo]:
        return await self.call(ops.FORK, sandbox_id=sandbox_id, count=count)

    async def pause_sandbox(self, sandbox_id: str) -> SandboxInfo:
        return await self.call(ops.PAUSE, sandbox_id=sandbox_id)

    async def resume_sandbox(self, sandbox_id: str) -> SandboxInfo:
        return await self.call(ops.RESUME, sandbox_id=sandbox_id)

    async def exec(self, sandbox_id: str, params: ExecParams) -> AsyncIterator[ProcessEvent]:
        events = await self.service.exec(sandbox_id, params, tenant=self.tenant)
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    async def attach(self, sandbox_id: str, process_id: str) -> AsyncIterator[ProcessEvent]:
        events = await self.service.attach(sandbox_id, process_id, tenant=self.tenant)
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    async def list_processes(self, sandbox_id: str) -> list[ProcessInfo]:
        return await self.service.list_processes(sandbox_id, tenant=self.tenant)

    async def send_stdin(self, sandbox_id: str, process_id: str, data: bytes, *, eof: bool = False) -> None:
        await self.service.send_stdin(sandbox_id, process_id, data, eof=eof, tenant=self.tenant)

    async def signal(self, sandbox_id: str, process_id: str, signal: int) -> None:
        await self.service.signal(sandbox_id, process_id, signal, tenant=self.tenant)

    async def read_file(self, sandbox_id: str, path: str, *, user: str | None = None) -> AsyncIterator[bytes]:
        chunks = await self.service.read_file(sandbox_id, path, user=user, tenant=self.tenant)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    async def write_file(
        self, sandbox_id: str, path: str, chunks: AsyncIterable[bytes], *, user: str | None = None
    ) -> int:
        return await self.service.write_file(sandbox_id, path, chunks, user=user, tenant=self.tenant)

    async def list_dir(
        self, sandbox_id: str, path: str, *, depth: int = 1, user: str | None = None
    ) -> list[EntryInfo]:
        return await self.service.list_dir(sandbox_id, path, depth=depth, user=user, tenant=self.tenant)

    async def stat(self, sandbox_id: str, path: str, *, user: str | None = None) -> EntryInfo:
        return await self.service.stat(sandbox_id, path, user=user, tenant=self.tenant)

    async def make_dir(self, sandbox_id: str, path: str, *, user: str | None = None) -> bool:
        return await self.service.make_dir(sandbox_id, path, user=user, tenant=self.tenant)

    async def remove(
        self, sandbox_id: str, path: str, *, recursive: bool = False, user: str | None = None
    ) -> None:
        await self.service.remove(sandbox_id, path, recursive=recursive, user=user, tenant=self.tenant)

    async def rename(
        self, sandbox_id: str, src: str, dst: str, *, overwrite: bool = False, user: str | None = None
    ) -> None:
        await self.service.rename(sandbox_id, src, dst, overwrite=overwrite, user=user, tenant=self.tenant)

    async def list_templates(self) -> list[TemplateInfo]:
        return [_template_info(t) for t in await self.service.list_templates(tenant=self.tenant)]

    async def import_template(
        self, name: str, *, directory: str | None = None, tarball: str | None = None, description: str = ""
    ) -> TemplateInfo:
        if (directory is None) == (tarball is None):
            raise InvalidRequest("give exactly one of a directory or a tarball to import")
        if directory is not None:
            record = await self.service.templates.import_directory(
                name, Path(directory), description=description
            )
        else:
            assert tarball is not None
            record = await self.service.templates.import_tarball(name, Path(tarball), description=description)
        return _template_info(record)

    async def delete_template(self, name: str) -> None:
        await self.service.templates.delete(name)

    async def build_template(self, params: BuildParams) -> AsyncIterator[BuildEvent]:
        events = await self.service.build_template(params)
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    async def create_pty(self, sandbox_id: str, params: PtyParams) -> ProcessEvent:
        return await self.service.create_pty(sandbox_id, params, tenant=self.tenant)

    async def resize_pty(self, sandbox_id: str, process_id: str, cols: int, rows: int) -> None:
        await self.service.resize_pty(sandbox_id, process_id, cols, rows, tenant=self.tenant)

    async def watch_dir(
        self, sandbox_id: str, path: str, *, recursive: bool = False, user: str | None = None
    ) -> AsyncIterator[FilesystemEvent]:
        events = await self.service.watch_dir(
            sandbox_id, path, recursive=recursive, user=user, tenant=self.tenant
        )
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    async def run_code(self, sandbox_id: str, params: RunCodeParams) -> AsyncIterator[CodeEvent]:
        events = await self.service.run_code(sandbox_id, params, tenant=self.tenant)
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    async def create_code_context(
        self, sandbox_id: str, *, language: str | None = None, cwd: str | None = None
    ) -> CodeContext:
        return await self.service.create_code_context(
            sandbox_id, language=language, cwd=cwd, tenant=self.tenant
        )

    async def list_code_contexts(self, sandbox_id: str) -> list[CodeContext]:
        return await self.service.list_code_contexts(sandbox_id, tenant=self.tenant)

    async def restart_code_context(self, sandbox_id: str, context_id: str) -> None:
        await self.service.restart_code_context(sandbox_id, context_id, tenant=self.tenant)

    async def remove_code_context(self, sandbox_id: str, context_id: str) -> None:
        await self.service.remove_code_context(sandbox_id, context_id, tenant=self.tenant)

    async def interrupt_code_context(self, sandbox_id: str, context_id: str) -> None:
        await self.service.interrupt_code_context(sandbox_id, context_id, tenant=self.tenant)

    async def build_code_interpreter_template(self, name: str = "code-interpreter") -> TemplateInfo:
        from corral.core.code_template import build_code_interpreter_template

        record = await build_code_interpreter_template(
            self.service.templates, self.service.settings.cache_root, name=name
        )
        return _template_info(record)

    def forward_port(
        self, sandbox_id: str, port: int, *, host: str = "127.0.0.1", local_port: int = 0
    ) -> AbstractAsyncContextManager[PortForward]:
        return self._forward_port(sandbox_id, port, host=host, local_port=local_port)

    @asynccontextmanager
    async def _forward_port(
        self, sandbox_id: str, port: int, *, host: str, local_port: int
    ) -> AsyncIterator[PortForward]:
        info = await self.service.get(
            sandbox_id, tenant=self.tenant
        )  # a missing or stopped sandbox fails here, not per connection
        if info.state is not SandboxState.RUNNING:
            raise InvalidState(f"cannot forward a port of sandbox {sandbox_id}: it is {info.state.value}")

        async def open_stream() -> PortStream:
            return await self.service.open_port(sandbox_id, port, tenant=self.tenant)

        async with forward(
            open_stream, sandbox_id=sandbox_id, port=port, host=host, local_port=local_port
        ) as fwd:
            yield fwd

    async def set_pool(self, params: PoolParams) -> PoolInfo:
        return await self.service.pools.set(params)

    async def list_pools(self) -> list[PoolInfo]:
        return await self.service.pools.list_pools()

    async def delete_pool(self, template: str, isolation: str | None = None) -> None:
        await self.service.pools.delete(template, isolation)

    async def fill_pool(self, template: str, isolation: str | None = None) -> AsyncIterator[PoolInfo]:
        progress = self.service.pools.fill(template, isolation)
        try:
            async for info in progress:
                yield info
        finally:
            await progress.aclose()  # type: ignore[attr-defined]

    async def aclose(self) -> None:
        await self.service.aclose()
        await self.service.store.aclose()


class LocalBackend:
    """Sync face of :class:`AsyncLocalBackend`: every call runs on a private event-loop thread."""

    url: str | None = None

    def __init__(self, make: Callable[[], AsyncLocalBackend]) -> None:
        self._closed = False
        self._pumps: weakref.WeakSet[Pump[Any]] = weakref.WeakSet()  # stopped on close()
        loop = LoopThread()
        self._portal = loop.portal
        try:
            self._backend = self._portal.call(_build, make)
        except BaseException:
            loop.stop()
            raise
        # close() by hand, or when this client is collected, or at interpreter exit (see ``_loop``): a script
        # that never closes its client (no ``with``) must still exit
        self._finalizer = weakref.finalize(self, _shut_down, loop, self._backend, self._pumps)

    @classmethod
    def from_env(cls, **overrides: Any) -> LocalBackend:
        return cls(lambda: AsyncLocalBackend.from_env(**overrides))

    def _call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        if self._closed:
            raise InvalidState("this client was closed; open a new one, e.g. Sandbox.connect(sandbox_id)")
        return self._portal.call(fn, *args)

    def _iterate(self, make: Callable[[], AsyncIterator[T]]) -> Iterator[T]:
        """Items cross from the loop thread as they come (see ``_pump``), not one portal call per item."""
        if self._closed:
            raise InvalidState("this client was closed; open a new one, e.g. Sandbox.connect(sandbox_id)")
        pump = Pump(self._portal, make)  # started by the first next(), like the async iterator it drains
        self._pumps.add(pump)
        try:
            yield from pump
        finally:
            if self._closed:  # e.g. stopping a watch of a closed client: say so, as the portal call did
                raise InvalidState("this client was closed; open a new one, e.g. Sandbox.connect(sandbox_id)")

    def create_sandbox(self, params: CreateParams) -> SandboxInfo:
        return self._call(self._backend.create_sandbox, params)

    def get_sandbox(self, sandbox_id: str) -> SandboxInfo:
        return self._call(self._backend.get_sandbox, sandbox_id)

    def list_sandboxes(
        self, *, metadata: dict[str, str] | None = None, states: frozenset[SandboxState] | None = None
    ) -> list[SandboxInfo]:
        return self._call(lambda: self._backend.list_sandboxes(metadata=metadata, states=states))

    def kill_sandbox(self, sandbox_id: str) -> SandboxInfo:
        return self._call(self._backend.kill_sandbox, sandbox_id)

    def set_timeout(self, sandbox_id: str, seconds: float) -> SandboxInfo:
        return self._call(self._backend.set_timeout, sandbox_id, seconds)

    def update_network(self, sandbox_id: str, network: Any) -> SandboxInfo:
        return self._call(self._backend.update_network, sandbox_id, network)

    def network_status(self, sandbox_id: str) -> NetworkStatus:
        return self._call(self._backend.network_status, sandbox_id)

    def sandbox_metrics(
        self, sandbox_id: str, start: float | None = None, end: float | None = None
    ) -> list[ResourceSample]:
        return self._call(self._backend.sandbox_metrics, sandbox_id, start, end)

    def pause_sandbox(self, sandbox_id: str) -> SandboxInfo:
        return self._call(self._backend.pause_sandbox, sandbox_id)

    def resume_sandbox(self, sandbox_id: str) -> SandboxInfo:
        return self._call(self._backend.resume_sandbox, sandbox_id)

    def exec(self, sandbox_id: str, params: ExecParams) -> Iterator[ProcessEvent]:
        return self._iterate(lambda: self._backend.exec(sandbox_id, params))

    def attach(self, sandbox_id: str, process_id: str) -> Iterator[ProcessEvent]:
        return self._iterate(lambda: self._backend.attach(sandbox_id, process_id))

    def list_processes(self, sandbox_id: str) -> list[ProcessInfo]:
        return self._call(self._backend.list_processes, sandbox_id)

    def send_stdin(self, sandbox_id: str, process_id: str, data: bytes, *, eof: bool = False) -> None:
        self._call(lambda: self._backend.send_stdin(sandbox_id, process_id, data, eof=eof))

    def signal(self, sandbox_id: str, process_id: str, signal: int) -> None:
        self._call(self._backend.signal, sandbox_id, process_id, signal)

    def read_file(self, sandbox_id: str, path: str, *, user: str | None = None) -> Iterator[bytes]:
        return self._iterate(lambda: self._backend.read_file(sandbox_id, path, user=user))

    def write_file(
        self, sandbox_id: str, path: str, chunks: Iterable[bytes], *, user: str | None = None
    ) -> int:
        return self._call(lambda: self._backend.write_file(sandbox_id, path, _aiter(chunks), user=user))

    def list_dir(
        self, sandbox_id: str, path: str, *, depth: int = 1, user: str | None = None
    ) -> list[EntryInfo]:
        return self._call(lambda: self._backend.list_dir(sandbox_id, path, depth=depth, user=user))

    def stat(self, sandbox_id: str, path: str, *, user: str | None = None) -> EntryInfo:
        return self._call(lambda: self._backend.stat(sandbox_id, path, user=user))

    def make_dir(self, sandbox_id: str, path: str, *, user: str | None = None) -> bool:
        return self._call(lambda: self._backend.make_dir(sandbox_id, path, user=user))

    def remove(self, sandbox_id: str, path: str, *, recursive: bool = False, user: str | None = None) -> None:
        self._call(lambda: self._backend.remove(sandbox_id, path, recursive=recursive, user=user))

    def rename(
        self, sandbox_id: str, src: str, dst: str, *, overwrite: bool = False, user: str | None = None
    ) -> None:
        self._call(lambda: self._backend.rename(sandbox_id, src, dst, overwrite=overwrite, user=user))

    def list_templates(self) -> list[TemplateInfo]:
        return self._call(self._backend.list_templates)

    def import_template(
        self, name: str, *, directory: str | None = None, tarball: str | None = None, description: str = ""
    ) -> TemplateInfo:
        return self._call(
            lambda: self._backend.import_template(
                name, directory=directory, tarball=tarball, description=description
            )
        )

    def delete_template(self, name: str) -> None:
        self._call(self._backend.delete_template, name)

    def snapshot_sandbox(self, sandbox_id: str, name: str, *, description: str = "") -> TemplateInfo:
        return self._call(lambda: self._backend.snapshot_sandbox(sandbox_id, name, description=description))

    def fork_sandbox(self, sandbox_id: str, count: int) -> list[SandboxInfo]:
        return self._call(self._backend.fork_sandbox, sandbox_id, count)

    def build_template(self, params: BuildParams) -> Iterator[BuildEvent]:
        """The whole build runs as ONE task on the loop thread (it owns a task group, which must be entered
        and left by the same task); events cross to this thread through a queue as they happen."""
        events: queue.Queue[BuildEvent | None] = queue.Queue()

        async def run() -> None:
            try:
                async for event in self._backend.build_template(params):
                    events.put(event)
            finally:
                events.put(None)

        future = self._portal.start_task_soon(run)
        try:
            while (event := events.get()) is not None:
                yield event
        finally:
            if not future.done():
                future.cancel()
            with contextlib.suppress(concurrent.futures.CancelledError):
                future.result()

    def run_code(self, sandbox_id: str, params: RunCodeParams) -> Iterator[CodeEvent]:
        return self._iterate(lambda: self._backend.run_code(sandbox_id, params))

    def create_code_context(
        self, sandbox_id: str, *, language: str | None = None, cwd: str | None = None
    ) -> CodeContext:
        return self._call(lambda: self._backend.create_code_context(sandbox_id, language=language, cwd=cwd))

    def list_code_contexts(self, sandbox_id: str) -> list[CodeContext]:
        return self._call(self._backend.list_code_contexts, sandbox_id)

    def restart_code_context(self, sandbox_id: str, context_id: str) -> None:
        self._call(self._backend.restart_code_context, sandbox_id, context_id)

    def remove_code_context(self, sandbox_id: str, context_id: str) -> None:
        self._call(self._backend.remove_code_context, sandbox_id, context_id)

    def interrupt_code_context(self, sandbox_id: str, context_id: str) -> None:
        self._call(self._backend.interrupt_code_context, sandbox_id, context_id)

    def build_code_interpreter_template(self, name: str = "code-interpreter") -> TemplateInfo:
        return self._call(self._backend.build_code_interpreter_template, name)

    def forward_port(
        self, sandbox_id: str, port: int, *, host: str = "127.0.0.1", local_port: int = 0
    ) -> AbstractContextManager[PortForward]:
        if self._closed:
            raise InvalidState("this client was closed; open a new one, e.g. Sandbox.connect(sandbox_id)")
        return self._portal.wrap_async_context_manager(
            self._backend.forward_port(sandbox_id, port, host=host, local_port=local_port)
        )

    def set_pool(self, params: PoolParams) -> PoolInfo:
        return self._call(self._backend.set_pool, params)

    def list_pools(self) -> list[PoolInfo]:
        return self._call(self._backend.list_pools)

    def delete_pool(self, template: str, isolation: str | None = None) -> None:
        self._call(self._backend.delete_pool, template, isolation)

    def fill_pool(self, template: str, isolation: str | None = None) -> Iterator[PoolInfo]:
        return self._iterate(lambda: self._backend.fill_pool(template, isolation))

    def create_pty(self, sandbox_id: str, params: PtyParams) -> ProcessEvent:
        return self._call(self._backend.create_pty, sandbox_id, params)

    def resize_pty(self, sandbox_id: str, process_id: str, cols: int, rows: int) -> None:
        self._call(self._backend.resize_pty, sandbox_id, process_id, cols, rows)

    def watch_dir(
        self, sandbox_id: str, path: str, *, recursive: bool = False, user: str | None = None
    ) -> Iterator[FilesystemEvent]:
        return self._iterate(
            lambda: self._backend.watch_dir(sandbox_id, path, recursive=recursive, user=user)
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._finalizer()


def _template_info(record: TemplateRecord) -> TemplateInfo:
    return TemplateInfo(
        name=record.name,
        kind=record.kind,
        description=record.description,
        created_at=record.created_at,
        memory=record.memory is not None,
    )


def _shut_down(loop: LoopThread, backend: AsyncLocalBackend, pumps: weakref.WeakSet[Pump[Any]]) -> None:
    for pump in list(pumps):  # iterations nobody finished must not keep the loop from stopping
        pump.stop()
    loop.stop(backend.aclose)


async def _build(make: Callable[[], T]) -> T:
    """Construct inside the portal's event loop (anyio primitives bind to the loop that creates them)."""
    return make()


async def _aiter(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    """Feed a sync iterable (maybe reading a local file) to the async core without blocking its loop."""
    iterator = iter(chunks)
    sentinel = object()
    while True:
        chunk = await anyio.to_thread.run_sync(next, iterator, sentinel)
        if chunk is sentinel:
            return
        yield chunk  # type: ignore[misc]
