"""SandboxService: the one place that decides what happens to sandboxes.

It owns the lifecycle (create, kill, timeouts, pause/resume), the agent connections, and the reconcile pass
(the *reaper*). Adapters (the embedded SDK bridge, the HTTP server, the CLI) only translate to and from it.

- Runtimes arrive through ``runtime_for`` (a name → Runtime function), so the core never imports one.
- Records are compare-and-swapped through the Store, so several processes (CLI calls, a server) can share a
  data directory: the loser of a race re-reads and tries again or gives up cleanly.
- The reaper is level-triggered: each pass compares every live record with its deadline and with what the
  runtime observes, and repairs the difference. A crash halfway through a pass is repaired by the next one.
- Each sandbox's runtime also holds its hard deadline (:meth:`Runtime.set_deadline`), so a sandbox dies on
  time even with no Corral process running at all. Embedded mode therefore needs no background task: records
  are reconciled when read, and a server runs :meth:`SandboxService.run_reaper` in a task group it owns.
- Every record belongs to one node (``Settings.node``): only that node reconciles it, so several servers can
  share one store without marking each other's sandboxes crashed. A record from before nodes existed
  (:data:`~corral.runtimes.base.LEGACY_NODE`) is adopted by the first node that reconciles it.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from types import TracebackType
from typing import Self

import anyio

from corral.core import builder as _builder
from corral.core import files as _files
from corral.core import interpreter as _interpreter
from corral.core import ports as _ports
from corral.core import processes as _processes
from corral.core import pty as _pty
from corral.core import snapshots as _snapshots
from corral.core import watch as _watch
from corral.core.agent_client import AgentClient
from corral.core.audit import AuditAction, AuditLog
from corral.core.auth import Quotas, check_quota, check_timeout_quota
from corral.core.pools import PoolManager
from corral.core.records import LOCAL_TENANT, SandboxRecord, TemplateRecord
from corral.core.settings import Settings
from corral.core.state import Action, require_state, transition
from corral.core.store import Store
from corral.core.templates import TemplateRegistry
from corral.errors import (
    Conflict,
    CorralError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    RuntimeFailure,
    Timeout,
    Unauthenticated,
    Unsupported,
)
from corral.ids import SandboxId, TenantId
from corral.models import (
    BuildEvent,
    BuildParams,
    CodeContext,
    CodeEvent,
    CreateParams,
    EntryInfo,
    EventKind,
    ExecParams,
    FilesystemEvent,
    ProcessEvent,
    ProcessInfo,
    PtyParams,
    RunCodeParams,
    SandboxInfo,
    SandboxState,
    StopReason,
    TemplateInfo,
)
from corral.protocol import Op
from corral.runtimes.base import (
    LEGACY_NODE,
    ArtifactKind,
    Limits,
    ObservedState,
    Runtime,
    SandboxSpec,
    Snapshot,
)

__all__ = ["SandboxService"]

log = logging.getLogger("corral.core.service")

_LIVE = frozenset({SandboxState.CREATING, SandboxState.RUNNING, SandboxState.PAUSED})
MIN_TIMEOUT = 1.0  # a sandbox's life in seconds; less could not even boot, so it is a mistake, not a request
ABANDONED_CREATE_AFTER = 300.0  # a record still "creating" this long after creation lost its creator


def _check_str_map(name: str, value: object, *, max_items: int = 64, max_len: int = 1024) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise InvalidRequest(f"{name} must be a mapping of strings to strings")
    if len(value) > max_items or any(len(k) > 256 or len(v) > max_len for k, v in value.items()):
        raise InvalidRequest(
            f"{name} may have at most {max_items} entries, keys up to 256 and values up to "
            f"{max_len} characters"
        )
    return dict(value)


class SandboxService:
    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        runtime_for: Callable[[str], Runtime],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.templates = TemplateRegistry(store, settings.cache_root)
        self._runtime_for = runtime_for
        self._clock = clock
        self._agents: dict[str, AgentClient] = {}
        self._agent_locks: dict[str, anyio.Lock] = {}
        self._wake_reaper = anyio.Event()
        self.audit = AuditLog(store, clock=clock)
        self._quota_locks: dict[str, anyio.Lock] = {}
        self.node = settings.node
        self.pools = PoolManager(self)

    # -- lifetime --------------------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close agent connections. Sandboxes keep running: they belong to their shims, not to us."""
        for client in list(self._agents.values()):
            await client.aclose()
        self._agents.clear()

    # -- lifecycle -------------------------------------------------------------------------------------------
    async def create(
        self, request: CreateParams, *, tenant: TenantId = LOCAL_TENANT, start_from: Snapshot | None = None
    ) -> SandboxInfo:
        """Create a sandbox; ``start_from`` (forks) seeds its writable layer and, if captured, its memory."""
        isolation = request.isolation or self.settings.default_isolation
        runtime = self._runtime(isolation)
        timeout = self._check_timeout(
            request.timeout if request.timeout is not None else self.settings.default_timeout
        )
        metadata = _check_str_map("metadata", request.metadata)
        env = _check_str_map("env", request.env, max_items=256, max_len=32768)
        base = self.settings.default_limits
        limits = Limits(
            memory_mb=request.memory_mb or base.memory_mb,
            cpus=request.cpus or base.cpus,
            pids=base.pids,
            disk_mb=base.disk_mb,
        )
        template = request.template or self.settings.default_template
        files = _files.check_files(request.files)
        claimed = await self.pools.claim(
            template=template,
            isolation=isolation,
            limits=limits,
            tenant=tenant,
            metadata=metadata,
            timeout=timeout,
            env=env,
            files=files,
            public_ports=bool(request.public_ports),
        )
        if claimed is not None:  # a warm-pool member, late-bound to this request (core/pools.py)
            self._wake_reaper.set()
            return claimed.info()
        await runtime.check()
        await self._check_template_access(template, tenant)
        rootfs = await self.templates.resolve(template, accepts=runtime.capabilities.rootfs)
        # a snapshot template with memory restores instead of booting, where the runtime can restore it
        memory = await self.templates.memory(template)
        seed = None
        if start_from is not None:
            memory, seed = start_from.memory, start_from.files
        restorable = runtime.capabilities.snapshot
        if memory is not None and not (ArtifactKind.MEMORY in restorable and memory.runtime == runtime.name):
            memory = None
        if seed is not None and seed.kind not in restorable:
            raise Unsupported(f"{isolation} sandboxes cannot start from a {seed.kind} snapshot")
        # The quota check and the insert of the "creating" record are one step per tenant, so concurrent
        # creates in this process cannot together pass a limit that each alone respects.
        async with self._quota_locks.setdefault(str(tenant), anyio.Lock()):
            await self._check_quota(tenant, memory_mb=limits.memory_mb, timeout=timeout)
            now = self._clock()
            record = await self.store.put_sandbox(
                SandboxRecord(
                    sandbox_id=SandboxId.new(),
                    tenant_id=tenant,
                    isolation=isolation,
                    template=template,
                    state=SandboxState.CREATING,
                    limits=limits,
                    created_at=now,
                    timeout=timeout,
                    deadline=now + timeout,
                    metadata=metadata,
                    env=env,
                    public_ports=bool(request.public_ports),
                    node=self.node,
                ),
                expect_version=None,
            )
        instance = None
        try:
            instance = await runtime.create(
                SandboxSpec(
                    sandbox_id=record.sandbox_id,
                    rootfs=rootfs,
                    limits=limits,
                    env=env,
                    deadline=record.deadline,
                    upper_seed=seed,
                    restore_from=memory,
                )
            )
            record = await self.store.put_sandbox(
                dataclasses.replace(record, instance=instance), expect_version=record.version
            )
            client = await self._agent(record)
            built = await self.templates.get(template)
            if built is not None and (built.env or built.defaults):
                await _builder.apply_defaults(client, built, env=env)
            elif env:
                await client.call(Op.CONFIGURE, {"env": env})
            await _files.write_all(client, files, max_bytes=self.settings.max_file_bytes)
            record = await self.store.put_sandbox(
                dataclasses.replace(record, state=transition(record.state, SandboxState.RUNNING)),
                expect_version=record.version,
            )
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._drop_agent(record.sandbox_id)
                if instance is not None:
                    try:
                        await runtime.destroy(instance)
                    except CorralError:
                        log.exception("cleanup of failed sandbox %s failed", record.sandbox_id)
                await self.store.delete_sandbox(record.sandbox_id)
            if isinstance(exc, RuntimeFailure) and record.deadline and self._clock() >= record.deadline:
                raise Timeout(  # its shim ended it at the deadline while it was still booting
                    f"the sandbox's timeout ({timeout:g} s) ran out before it finished starting; "
                    "give it a longer timeout"
                ) from exc
            raise
        self._wake_reaper.set()
        await self.audit.record(
            AuditAction.SANDBOX_CREATE,
            tenant_id=tenant,
            sandbox_id=record.sandbox_id,
            template=template,
            isolation=isolation,
            memory_mb=limits.memory_mb,
            timeout=timeout,
        )
        return record.info()

    async def get(self, sandbox_id: str, *, tenant: TenantId = LOCAL_TENANT) -> SandboxInfo:
        record = await self._reconciled(await self._record(sandbox_id, tenant))
        return record.info()

    async def list_sandboxes(
        self,
        *,
        tenant: TenantId = LOCAL_TENANT,
        metadata: dict[str, str] | None = None,
        states: frozenset[SandboxState] | None = None,
    ) -> list[SandboxInfo]:
        wanted = states if states is not None else frozenset({SandboxState.RUNNING, SandboxState.PAUSED})
        records = await self.store.list_sandboxes(tenant_id=tenant, metadata=metadata, states=wanted | _LIVE)
        out = []
        for record in records:
            record = await self._reconciled(record)
            if record.state in wanted:
                out.append(record.info())
        return out

    async def kill(self, sandbox_id: str, *, tenant: TenantId = LOCAL_TENANT) -> SandboxInfo:
        record = await self._record(sandbox_id, tenant)
        if record.state is SandboxState.STOPPED:
            return record.info()
        stopped = await self._stop(record, StopReason.KILLED)
        await self.audit.record(AuditAction.SANDBOX_KILL, tenant_id=tenant, sandbox_id=record.sandbox_id)
        return stopped.info()

    async def set_timeout(
        self, sandbox_id: str, seconds: float, *, tenant: TenantId = LOCAL_TENANT
    ) -> SandboxInfo:
        """Give the sandbox ``seconds`` more life from now (E2B semantics: not added to the old deadline)."""
        seconds = self._check_timeout(seconds)
        check_timeout_quota(await self._quotas(tenant), seconds, tenant=await self._tenant_name(tenant))
        record = await self._reconciled(await self._record(sandbox_id, tenant))
        require_state(
            record.state, Action.SET_TIMEOUT, SandboxState.RUNNING, SandboxState.PAUSED, sandbox_id=sandbox_id
        )
        if record.state is SandboxState.PAUSED:
            new = dataclasses.replace(record, timeout=seconds, paused_remaining=seconds)
        else:
            deadline = self._clock() + seconds
            await self._set_deadline(record, deadline)
            new = dataclasses.replace(record, timeout=seconds, deadline=deadline)
        record = await self.store.put_sandbox(new, expect_version=record.version)
        self._wake_reaper.set()
        return record.info()

    async def pause(self, sandbox_id: str, *, tenant: TenantId = LOCAL_TENANT) -> SandboxInfo:
        record = await self._reconciled(await self._record(sandbox_id, tenant))
        require_state(record.state, Action.PAUSE, SandboxState.RUNNING, sandbox_id=sandbox_id)
        runtime = self._require_reachable(record)
        if not runtime.capabilities.pause:
            raise Unsupported(f"{record.isolation} sandboxes cannot be paused")
        assert record.instance is not None and record.deadline is not None
        remaining = max(0.0, record.deadline - self._clock())
        await self._set_deadline(record, None)  # a paused sandbox's deadline is suspended
        try:
            await runtime.pause(record.instance)
        except BaseException:
            with anyio.CancelScope(shield=True):  # still running: its deadline must hold again
                await self._set_deadline(record, record.deadline)
            raise
        record = await self.store.put_sandbox(
            dataclasses.replace(
                record,
                state=transition(record.state, SandboxState.PAUSED),
                deadline=None,
                paused_remaining=remaining,
            ),
            expect_version=record.version,
        )
        return record.info()

    async def resume(self, sandbox_id: str, *, tenant: TenantId = LOCAL_TENANT) -> SandboxInfo:
        record = await self._record(sandbox_id, tenant)
        require_state(record.state, Action.RESUME, SandboxState.PAUSED, sandbox_id=sandbox_id)
        assert record.instance is not None
        await self._require_reachable(record).resume(record.instance)
        deadline = self._clock() + (record.paused_remaining or 0.0)
        await self._set_deadline(record, deadline)
        record = await self.store.put_sandbox(
            dataclasses.replace(
                record,
                state=transition(record.state, SandboxState.RUNNING),
                deadline=deadline,
                paused_remaining=None,
            ),
            expect_version=record.version,
        )
        self._wake_reaper.set()
        return record.info()

    # -- template builds -------------------------------------------------------------------------------------
    async def build_template(self, params: BuildParams) -> AsyncIterator[BuildEvent]:
        """Build a template (:mod:`corral.core.builder`); steps run under ``params.isolation``."""
        runtime = self._runtime(params.isolation or self.settings.default_isolation)
        if params.steps:
            await runtime.check()
        return _builder.build_template(params, templates=self.templates, runtime=runtime)

    # -- processes -------------------------------------------------------------------------------------------
    async def exec(
        self, sandbox_id: str, params: ExecParams, *, tenant: TenantId = LOCAL_TENANT
    ) -> AsyncIterator[ProcessEvent]:
        if (params.cmd is None) == (params.argv is None):
            raise InvalidRequest("give exactly one of cmd (a shell command) and argv (a list of arguments)")
        if params.argv is not None and (not params.argv or not all(isinstance(a, str) for a in params.argv)):
            raise InvalidRequest("argv must be a non-empty list of strings")
        if params.timeout is not None and not 0 < params.timeout <= self.settings.max_timeout:
            raise InvalidRequest(
                f"a command timeout must be between 0 and {self.settings.max_timeout:g} seconds"
            )
        client = await self._running_agent(sandbox_id, tenant, Action.EXEC)
        await self.audit.record(
            AuditAction.PROCESS_START,
            tenant_id=tenant,
            sandbox_id=sandbox_id,
            argv=params.argv,
            cmd=params.cmd,
            user=params.user,
            cwd=params.cwd,
            background=params.background,
        )
        return self._audited_exits(_processes.exec_stream(client, params), tenant, sandbox_id)

    async def _audited_exits(
        self, events: AsyncIterator[ProcessEvent], tenant: TenantId, sandbox_id: str
    ) -> AsyncIterator[ProcessEvent]:
        """Pass events through; record each process exit (code, signal, timed out) in the audit log."""
        try:
            async for event in events:
                if event.kind is EventKind.EXIT:
                    with anyio.CancelScope(shield=True):
                        await self.audit.record(
                            AuditAction.PROCESS_EXIT,
                            tenant_id=tenant,
                            sandbox_id=sandbox_id,
                            process_id=event.process_id,
                            exit_code=event.exit_code,
                            signal=event.signal,
                            timed_out=event.timed_out,
                        )
                yield event
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    async def attach(
        self, sandbox_id: str, process_id: str, *, tenant: TenantId = LOCAL_TENANT
    ) -> AsyncIterator[ProcessEvent]:
        client = await self._running_agent(sandbox_id, tenant, Action.EXEC)
        return _processes.attach(client, process_id)

    async def list_processes(self, sandbox_id: str, *, tenant: TenantId = LOCAL_TENANT) -> list[ProcessInfo]:
        return await _processes.list_processes(await self._running_agent(sandbox_id, tenant, Action.EXEC))

    async def send_stdin(
        self,
        sandbox_id: str,
        process_id: str,
        data: bytes,
        *,
        eof: bool = False,
        tenant: TenantId = LOCAL_TENANT,
    ) -> None:
        client = await self._running_agent(sandbox_id, tenant, Action.EXEC)
        await _processes.send_stdin(client, process_id, data, eof=eof)

    async def signal(
        self, sandbox_id: str, process_id: str, signal: int, *, tenant: TenantId = LOCAL_TENANT
    ) -> None:
        if not isinstance(signal, int) or not 1 <= signal <= 64:
            raise InvalidRequest("signal must be a signal number from 1 to 64")
        client = await self._running_agent(sandbox_id, tenant, Action.EXEC)
        await _processes.send_signal(client, process_id, signal)

    # -- files -----------------------------------------------------------------------------------------------
    async def read_file(
        self, sandbox_id: str, path: str, *, user: str | None = None, tenant: TenantId = LOCAL_TENANT
    ) -> AsyncIterator[bytes]:
        _files.check_path(path)
        client = await self._running_agent(sandbox_id, tenant, Action.FILES)
        return _files.read(client, path, user=user)

    async def write_file(
        self,
        sandbox_id: str,
        path: str,
        chunks: AsyncIterable[bytes],
        *,
        user: str | None = None,
        tenant: TenantId = LOCAL_TENANT,
    ) -> int:
        _files.check_path(path, writing=True)
        client = await self._running_agent(sandbox_id, tenant, Action.FILES)
        written = await _files.write(client, path, chunks, max_bytes=self.settings.max_file_bytes, user=user)
        await self.audit.record(
            AuditAction.FILE_WRITE,
            tenant_id=tenant,
            sandbox_id=sandbox_id,
            path=path,
            bytes=written,
            user=user,
        )
        return written

    async def list_dir(
        self,
        sandbox_id: str,
        path: str,
        *,
        depth: int = 1,
        user: str | None = None,
        tenant: TenantId = LOCAL_TENANT,
    ) -> list[EntryInfo]:
        client = await self._running_agent(sandbox_id, tenant, Action.FILES)
        return await _files.list_dir(client, path, depth=depth, user=user)

    async def stat(
        self, sandbox_id: str, path: str, *, user: str | None = None, tenant: TenantId = LOCAL_TENANT
    ) -> EntryInfo:
        return await _files.stat(await self._running_agent(sandbox_id, tenant, Action.FILES), path, user=user)

    async def make_dir(
        self, sandbox_id: str, path: str, *, user: str | None = None, tenant: TenantId = LOCAL_TENANT
    ) -> bool:
        return await _files.make_dir(
            await self._running_agent(sandbox_id, tenant, Action.FILES), path, user=user
        )

    async def remove(
        self,
        sandbox_id: str,
        path: str,
        *,
        recursive: bool = False,
        user: str | None = None,
        tenant: TenantId = LOCAL_TENANT,
    ) -> None:
        client = await self._running_agent(sandbox_id, tenant, Action.FILES)
        await _files.remove(client, path, recursive=recursive, user=user)

    async def rename(
        self,
        sandbox_id: str,
        src: str,
        dst: str,
        *,
        overwrite: bool = False,
        user: str | None = None,
        tenant: TenantId = LOCAL_TENANT,
    ) -> None:
        client = await self._running_agent(sandbox_id, tenant, Action.FILES)
        await _files.rename(client, src, dst, overwrite=overwrite, user=user)

    async def usable_runtimes(self) -> list[str]:
        """The enabled runtimes whose host requirements are met right now (for readiness probes)."""
        usable = []
        for name in self.settings.enabled_runtimes:
            try:
                await self._runtime(name).check()
            except CorralError:
                continue
            usable.append(name)
        return usable

    # -- code interpreter (logic in core/interpreter.py) ---------------------------------------------------
    async def run_code(
        self, sandbox_id: str, params: RunCodeParams, *, tenant: TenantId = LOCAL_TENANT
    ) -> AsyncIterator[CodeEvent]:
        fields = _interpreter.check_run_params(params, max_timeout=self.settings.max_timeout)
        client = await self._running_agent(sandbox_id, tenant, Action.EXEC)
        return _interpreter.run_code(client, fields)

    async def create_code_context(
        self,
        sandbox_id: str,
        *,
        language: str | None = None,
        cwd: str | None = None,
        tenant: TenantId = LOCAL_TENANT,
    ) -> CodeContext:
        client = await self._running_agent(sandbox_id, tenant, Action.EXEC)
        return await _interpreter.create_context(client, language=language, cwd=cwd)

    async def list_code_contexts(
        self, sandbox_id: str, *, tenant: TenantId = LOCAL_TENANT
    ) -> list[CodeContext]:
        return await _interpreter.list_contexts(await self._running_agent(sandbox_id, tenant, Action.EXEC))

    async def restart_code_context(
        self, sandbox_id: str, context_id: str, *, tenant: TenantId = LOCAL_TENANT
    ) -> None:
        client = await self._running_agent(sandbox_id, tenant, Action.EXEC)
        await _interpreter.restart_context(client, context_id)

    async def remove_code_context(
        self, sandbox_id: str, context_id: str, *, tenant: TenantId = LOCAL_TENANT
    ) -> None:
        client = await self._running_agent(sandbox_id, tenant, Action.EXEC)
        await _interpreter.remove_context(client, context_id)

    async def interrupt_code_context(
        self, sandbox_id: str, context_id: str, *, tenant: TenantId = LOCAL_TENANT
    ) -> None:
        client = await self._running_agent(sandbox_id, tenant, Action.EXEC)
        await _interpreter.interrupt_context(client, context_id)

    # -- ports ---------------------------------------------------------------------------------------------
    async def open_port(
        self, sandbox_id: str, port: int, *, tenant: TenantId = LOCAL_TENANT
    ) -> _ports.PortStream:
        """A TCP connection to ``port`` on the sandbox's own loopback, as a byte stream (see ``core.ports``).

        Raises :class:`~corral.errors.PortClosed` when nothing listens there. The caller owns the stream and
        must ``aclose`` it.
        """
        _ports.check_port(port)
        client = await self._running_agent(sandbox_id, tenant, Action.PORTS)
        return await _ports.open_port(client, port, sandbox_id=sandbox_id)

    async def open_port_for_traffic(
        self, sandbox_id: str, port: int, *, traffic_token: str | None
    ) -> _ports.PortStream:
        """:meth:`open_port` for the server's port proxy, where callers hold no API key.

        A sandbox with ``public_ports`` lets anyone in; any other needs its own traffic token (compared in
        constant time). Unknown and stopped sandboxes are both "not found", as for API callers.
        """
        _ports.check_port(port)
        record = None
        if SandboxId.is_valid(sandbox_id):
            record = await self.store.get_sandbox(SandboxId(sandbox_id))
        if record is None or record.pool_id is not None or record.state is SandboxState.STOPPED:
            raise NotFound(f"sandbox {sandbox_id} was not found")
        if not record.public_ports:
            if not traffic_token:
                raise Unauthenticated(
                    f"the ports of sandbox {sandbox_id} are private: send its traffic token "
                    "(SandboxInfo.traffic_token) in the Corral-Traffic-Token header"
                )
            if not hmac.compare_digest(traffic_token.encode(), record.traffic_token.encode()):
                raise PermissionDenied(f"that is not the traffic token of sandbox {sandbox_id}")
        return await self.open_port(sandbox_id, port, tenant=record.tenant_id)

    # -- terminals and watches (logic in core/pty.py and core/watch.py) -------------------------------------
    async def create_pty(
        self, sandbox_id: str, params: PtyParams, *, tenant: TenantId = LOCAL_TENANT
    ) -> ProcessEvent:
        """Open a terminal; returns its ``started`` event. Follow its output with :meth:`attach`."""
        _pty.check_params(params, max_timeout=self.settings.max_timeout)
        return await _pty.create(await self._running_agent(sandbox_id, tenant, Action.EXEC), params)

    async def resize_pty(
        self, sandbox_id: str, process_id: str, cols: int, rows: int, *, tenant: TenantId = LOCAL_TENANT
    ) -> None:
        _pty.check_size(cols, rows)
        await _pty.resize(await self._running_agent(sandbox_id, tenant, Action.EXEC), process_id, cols, rows)

    async def watch_dir(
        self,
        sandbox_id: str,
        path: str,
        *,
        recursive: bool = False,
        user: str | None = None,
        tenant: TenantId = LOCAL_TENANT,
    ) -> AsyncIterator[FilesystemEvent]:
        """Changes under ``path`` as they happen; the first event is ``started``. Close it to stop watching."""
        _files.check_path(path)
        client = await self._running_agent(sandbox_id, tenant, Action.FILES)
        return _watch.watch_dir(client, path, recursive=recursive, user=user)

    # -- reconcile -------------------------------------------------------------------------------------------
    async def reap(self) -> float | None:
        """One reconcile pass over every live sandbox. Returns the soonest deadline still pending."""
        soonest: float | None = None
        for record in await self.store.list_sandboxes(states=_LIVE):
            if not self.owns(record):
                continue  # another node's: it reconciles its own
            try:
                record = await self._reconciled(record)
            except Conflict:
                continue  # another process changed it first; the next pass sees the new version
            if record.state is SandboxState.RUNNING and record.deadline is not None:
                soonest = record.deadline if soonest is None else min(soonest, record.deadline)
        return soonest

    async def run_reaper(self) -> None:
        """Reconcile forever: at each deadline and every ``reap_interval`` seconds. Run it in a task group."""
        while True:
            try:
                soonest = await self.reap()
            except CorralError:
                log.exception("reconcile pass failed; retrying")
                soonest = None
            wait = self.settings.reap_interval
            if soonest is not None:
                wait = min(wait, max(0.0, soonest - self._clock()) + 0.05)
            self._wake_reaper = anyio.Event()
            with anyio.move_on_after(wait):
                await self._wake_reaper.wait()

    async def _reconciled(self, record: SandboxRecord) -> SandboxRecord:
        """Bring one record in line with its deadline and with what its runtime observes.

        Only the record's own node does that; another node's record is returned as stored (that node keeps it
        true), and a record of no node yet is adopted first.
        """
        if not self.owns(record):
            return record
        if record.node == LEGACY_NODE:
            record = await self._adopt(record)
        now = self._clock()
        if record.state is SandboxState.CREATING:
            if now - record.created_at > ABANDONED_CREATE_AFTER:
                return await self._stop(record, StopReason.CRASHED)
            return record
        if record.state not in _LIVE or record.instance is None:
            return record
        if record.state is SandboxState.RUNNING and record.deadline is not None and now >= record.deadline:
            return await self._stop(record, StopReason.TIMEOUT)
        observed = await self._runtime(record.isolation).inspect(record.instance)
        if observed.state in (ObservedState.EXITED, ObservedState.MISSING):
            reason = {"deadline": StopReason.TIMEOUT, "missing": StopReason.MISSING}.get(
                observed.reason or "", StopReason.CRASHED
            )
            return await self._stop(record, reason)
        return record

    def owns(self, record: SandboxRecord) -> bool:
        """Whether this node reconciles ``record`` (its own, or one from before nodes existed)."""
        return record.node in (self.node, LEGACY_NODE)

    async def _adopt(self, record: SandboxRecord) -> SandboxRecord:
        """Stamp a record (and its instance) from before nodes existed with this node."""
        instance = record.instance
        if instance is not None and instance.node == LEGACY_NODE:
            instance = dataclasses.replace(instance, node=self.node)
        try:
            return await self.store.put_sandbox(
                dataclasses.replace(record, node=self.node, instance=instance), expect_version=record.version
            )
        except Conflict:
            fresh = await self.store.get_sandbox(record.sandbox_id)
            if fresh is None:
                raise NotFound(f"sandbox {record.sandbox_id} not found") from None
            return fresh

    def _require_reachable(self, record: SandboxRecord) -> Runtime:
        """The record's runtime, if this node can act on its instance; a node-local instance of another node
        is reachable only through that node's server."""
        runtime = self._runtime(record.isolation)
        if runtime.capabilities.node_local and not self.owns(record):
            raise Conflict(
                f"sandbox {record.sandbox_id} runs on Corral node {record.node!r}, not on this one "
                f"({self.node!r}); send the request to that node's server",
                details={"node": record.node},
            )
        return runtime

    async def _stop(self, record: SandboxRecord, reason: StopReason) -> SandboxRecord:
        if reason is not StopReason.KILLED:  # a kill is recorded by kill(), with who asked
            await self.audit.record(
                AuditAction.SANDBOX_EXPIRE if reason is StopReason.TIMEOUT else AuditAction.SANDBOX_CRASH,
                tenant_id=record.tenant_id,
                sandbox_id=record.sandbox_id,
            )
        runtime = self._require_reachable(record)
        await self._drop_agent(record.sandbox_id)
        if record.instance is not None:
            with anyio.CancelScope(shield=True):
                await runtime.destroy(record.instance)
        while True:
            try:
                return await self.store.put_sandbox(
                    dataclasses.replace(
                        record,
                        state=transition(record.state, SandboxState.STOPPED),
                        stop_reason=reason,
                        stopped_at=self._clock(),
                        deadline=None,
                        paused_remaining=None,
                    ),
                    expect_version=record.version,
                )
            except Conflict:
                fresh = await self.store.get_sandbox(record.sandbox_id)
                if fresh is None or fresh.state is SandboxState.STOPPED:
                    return fresh or record
                record = fresh

    # -- helpers ---------------------------------------------------------------------------------------------
    def _runtime(self, isolation: str) -> Runtime:
        return self._runtime_for(isolation)

    def _check_timeout(self, seconds: float) -> float:
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not MIN_TIMEOUT <= seconds <= self.settings.max_timeout
        ):
            raise InvalidRequest(
                f"timeout must be between {MIN_TIMEOUT:g} and {self.settings.max_timeout:g} seconds"
            )
        return float(seconds)

    async def _check_template_access(self, template: str, tenant: TenantId) -> None:
        record = await self.templates.get(template)
        if record is not None and not record.usable_by(tenant):
            raise NotFound(
                f"template {template!r} not found"
            )  # another tenant's snapshot does not exist for you

    async def delete_own_template(self, name: str, *, tenant: TenantId) -> None:
        """Delete a snapshot template ``tenant`` made; shared templates are an operator's to delete."""
        await self._check_template_access(name, tenant)
        if name not in {t.name for t in await self.templates.list()}:
            raise NotFound(f"template {name!r} not found")
        record = await self.templates.get(name)
        if record is None or record.owner != tenant:  # the built-in base, or one an operator made
            raise PermissionDenied(f"template {name!r} is shared by all tenants; an admin key deletes it")
        await self.templates.delete(name)

    async def list_templates(self, *, tenant: TenantId = LOCAL_TENANT) -> list[TemplateRecord]:
        """The templates this tenant may start sandboxes from."""
        return [t for t in await self.templates.list() if t.usable_by(tenant)]

    async def _quotas(self, tenant: TenantId) -> Quotas:
        record = await self.store.get_tenant(tenant)
        return record.quotas if record is not None else Quotas()  # the embedded tenant has none

    async def _tenant_name(self, tenant: TenantId) -> str:
        record = await self.store.get_tenant(tenant)
        return record.name if record is not None else str(tenant)

    async def _check_quota(self, tenant: TenantId, *, memory_mb: int, timeout: float) -> None:
        quotas = await self._quotas(tenant)
        if quotas == Quotas():
            return
        live = await self.store.list_sandboxes(tenant_id=tenant, states=_LIVE)
        check_quota(
            quotas,
            live_count=len(live),
            live_memory_mb=sum(r.limits.memory_mb for r in live),
            memory_mb=memory_mb,
            timeout=timeout,
            tenant=await self._tenant_name(tenant),
        )

    async def _record(self, sandbox_id: str, tenant: TenantId) -> SandboxRecord:
        if not SandboxId.is_valid(sandbox_id):
            raise NotFound(f"sandbox {sandbox_id!r} not found (sandbox ids look like sb-xxxxxxxxxxxxxxxx)")
        record = await self.store.get_sandbox(SandboxId(sandbox_id))
        if record is None or record.tenant_id != tenant:  # another tenant's sandbox does not exist for you
            raise NotFound(f"sandbox {sandbox_id} not found")
        return record

    async def _running_agent(self, sandbox_id: str, tenant: TenantId, action: Action) -> AgentClient:
        """The agent of a running sandbox, on the hot path of every command and file operation.

        A full reconcile asks the runtime (``runsc state`` costs ~30 ms), so it runs only when there is no live
        agent connection or the deadline has passed: a sandbox that dies closes its connection, and the next
        call reconciles.
        """
        record = await self._record(sandbox_id, tenant)
        live = self._agents.get(str(record.sandbox_id))
        expired = record.deadline is not None and self._clock() >= record.deadline
        if live is None or live.closed or expired or record.state is not SandboxState.RUNNING:
            record = await self._reconciled(record)
        require_state(record.state, action, SandboxState.RUNNING, sandbox_id=sandbox_id)
        return await self._agent(record)

    async def _agent(self, record: SandboxRecord) -> AgentClient:
        key = str(record.sandbox_id)
        lock = self._agent_locks.setdefault(key, anyio.Lock())
        async with lock:
            client = self._agents.get(key)
            if client is not None and not client.closed:
                return client
            assert record.instance is not None
            stream = await self._require_reachable(record).connect(record.instance)
            client = await AgentClient.open(stream, sandbox_id=key)
            self._agents[key] = client
            return client

    async def _drop_agent(self, sandbox_id: str) -> None:
        client = self._agents.pop(str(sandbox_id), None)
        self._agent_locks.pop(str(sandbox_id), None)
        if client is not None:
            await client.aclose()

    async def _set_deadline(self, record: SandboxRecord, deadline: float | None) -> None:
        """Move the hard deadline the sandbox's runtime holds (the reaper enforces the stored one too)."""
        assert record.instance is not None
        try:
            await self._require_reachable(record).set_deadline(record.instance, deadline)
        except Unsupported:
            log.debug("sandbox %s has no runtime deadline; the reaper alone enforces it", record.sandbox_id)

    # -- snapshots and forks (core.snapshots) ----------------------------------------------------------------
    async def snapshot(
        self, sandbox_id: str, name: str, *, description: str = "", tenant: TenantId = LOCAL_TENANT
    ) -> TemplateInfo:
        """Capture a running sandbox (files, and memory where the runtime can) as the template ``name``."""
        return await _snapshots.snapshot(self, sandbox_id, name, description=description, tenant=tenant)

    async def fork(
        self, sandbox_id: str, count: int = 1, *, tenant: TenantId = LOCAL_TENANT
    ) -> list[SandboxInfo]:
        """``count`` independent copies of a running sandbox (with memory where the runtime can)."""
        return await _snapshots.fork(self, sandbox_id, count, tenant=tenant)
