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
import re
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from types import TracebackType
from typing import Self

import anyio

from corral.core import builder as _builder
from corral.core import files as _files
from corral.core import interpreter as _interpreter
from corral.core import network as _network
from corral.core import ports as _ports
from corral.core import processes as _processes
from corral.core import pty as _pty
from corral.core import secrets as _secrets
from corral.core import snapshots as _snapshots
from corral.core import watch as _watch
from corral.core.agent_client import AgentClient
from corral.core.audit import AuditAction, AuditEntry, AuditLog, entries_of_sandbox
from corral.core.auth import Quotas, check_quota, check_timeout_quota
from corral.core.code_template import CODE_INTERPRETER_TEMPLATE, build_code_interpreter_template
from corral.core.events import SandboxEvents, observed
from corral.core.pools import PoolManager
from corral.core.records import SandboxRecord, TemplateRecord
from corral.core.settings import Settings
from corral.core.state import Action, require_state, transition
from corral.core.store import Store
from corral.core.templates import TemplateRegistry, disk_only
from corral.core.usage import UsageMeter
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
    NetworkStatus,
    ProcessEvent,
    ProcessInfo,
    PtyParams,
    ResourceSample,
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
    RootfsKind,
    RootfsSource,
    Runtime,
    SandboxSpec,
    Snapshot,
    TeardownFinisher,
)
from corral.secrets import SecretBinding

__all__ = ["SandboxService"]

log = logging.getLogger("corral.core.service")

_LIVE = frozenset({SandboxState.CREATING, SandboxState.RUNNING, SandboxState.PAUSED})
MIN_TIMEOUT = 1.0  # a sandbox's life in seconds; less could not even boot, so it is a mistake, not a request
ABANDONED_CREATE_AFTER = 300.0  # a record still "creating" this long after creation lost its creator
_TEARDOWN_RETRY_EVERY = 0.2  # seconds between the retries of finish_teardowns(wait=...)
_IDEMPOTENCY_KEY = re.compile(r"[a-z0-9-]{1,255}")
_NO_TOKEN = "-" * 43  # compared against when there is no sandbox, so both paths do the same work


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
        self.events = SandboxEvents()
        self.store = observed(store, self.events)  # every sandbox write is published (core/events.py)
        self.templates = TemplateRegistry(store, settings.cache_root)
        self._runtime_for = runtime_for
        self._clock = clock
        self._agents: dict[str, AgentClient] = {}
        self._agent_locks: dict[str, anyio.Lock] = {}
        self._wake_reaper = anyio.Event()
        self.audit = AuditLog(store, clock=clock)
        self._quota_locks: dict[str, anyio.Lock] = {}
        self.node = settings.node
        self._build_lock = anyio.Lock()
        self._pause_locks: dict[str, anyio.Lock] = {}
        self._stop_locks: dict[str, anyio.Lock] = {}  # sandbox id -> held while it is being stopped
        self._idempotency_locks: dict[tuple[str, str], anyio.Lock] = {}
        self.pools = PoolManager(self)
        self.egress_decisions: _network.Tally = _network.Tally()  # copied into the audit log, for metrics
        self.usage = UsageMeter(clock)  # resource samples of running sandboxes (core/usage.py)
        self._sealer: _secrets.Sealer | None = None  # the secrets key, read (or made) on first use

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
        self, request: CreateParams, *, tenant: TenantId, start_from: Snapshot | None = None
    ) -> SandboxInfo:
        """Create a sandbox; ``start_from`` (forks) seeds its writable layer and, if captured, its memory.

        With ``request.idempotency_key``, a create the tenant already made with that key (and whose sandbox is
        still live) is answered with that sandbox instead of a second one: a client may retry safely.
        """
        key = request.idempotency_key
        if key is None:
            return await self._create(request, tenant=tenant, start_from=start_from)
        if not isinstance(key, str) or not _IDEMPOTENCY_KEY.fullmatch(key):
            raise InvalidRequest("an idempotency key is 1-255 characters of a-z, 0-9 and '-'")
        async with self._idempotency_locks.setdefault((str(tenant), key), anyio.Lock()):
            for record in await self.store.list_sandboxes(tenant_id=tenant, states=_LIVE):
                if record.idempotency_key == key:
                    return record.info()
            return await self._create(request, tenant=tenant, start_from=start_from)

    async def _create(
        self, request: CreateParams, *, tenant: TenantId, start_from: Snapshot | None
    ) -> SandboxInfo:
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
        auto_pause = bool(request.auto_pause)
        if auto_pause and not runtime.capabilities.pause:
            why = runtime.capabilities.pause_refusal
            raise InvalidRequest(
                f"{isolation} sandboxes cannot be paused{f' ({why})' if why else ''}, so they cannot pause at"
                " their timeout; choose an isolation that can pause, or leave auto-pause off"
            )
        network = _network.check_policy(
            request.network, runtime, isolation, self.settings.egress.denied_networks()
        )
        if auto_pause and network.enabled and not runtime.capabilities.pause_network:
            raise InvalidRequest(
                f"{isolation} sandboxes with network cannot be paused, so they cannot pause at their timeout; "
                "leave auto-pause off, use network='none', or an isolation that pauses with network",
                details={"isolation": isolation},
            )
        bindings = _secrets.bind(request.secrets, network, env)
        if bindings and not runtime.capabilities.egress_secrets:
            raise Unsupported(
                f"{isolation} sandboxes cannot have secrets: their egress has no proxy to put them into requests;"
                " pass the value in env instead, or use an isolation with an egress proxy (namespace, gvisor, microvm)",
                details={"isolation": isolation},
            )
        sealed = await self._seal(bindings)
        claimed = None
        # pool members have no network, and pool claims keep neither auto-pause nor an idempotency key
        if not auto_pause and request.idempotency_key is None and not network.enabled:
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
        await self._build_on_first_use(template)
        # a VM's snapshot template starts as a fork does: its parent's rootfs, its disk image as the upper
        disk = await self.templates.disk(template) if start_from is None else None
        if disk is not None and not (ArtifactKind.DISK in runtime.capabilities.snapshot
                                     and disk[1].runtime == runtime.name):  # fmt: skip
            raise Unsupported(disk_only(template, disk[1].runtime), details={"isolation": isolation})
        rootfs = await self._resolve_template(
            disk[0] if disk is not None else template, tenant, accepts=runtime.capabilities.rootfs
        )
        # a snapshot template with memory restores instead of booting, where the runtime can restore it
        memory = await self.templates.memory(template)
        seed = disk[1] if disk is not None else None
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
                    auto_pause=auto_pause,
                    idempotency_key=request.idempotency_key,
                    network=network.to_wire(),
                    secrets=[b.name for b in bindings],
                    secrets_sealed=sealed,
                ),
                expect_version=None,
            )
        instance = None
        egress = _secrets.EgressSecrets.make(record.sandbox_id, bindings) if bindings else None
        run_env = _secrets.sandbox_env(env, bindings)
        try:
            instance = await runtime.create(
                SandboxSpec(
                    sandbox_id=record.sandbox_id,
                    rootfs=rootfs,
                    limits=limits,
                    env=run_env,
                    egress_secrets=egress.to_wire() if egress is not None else None,
                    deadline=None if auto_pause else record.deadline,
                    upper_seed=seed,
                    restore_from=memory,
                    network=network,
                    isolation=isolation,
                )
            )
            record = await self.store.put_sandbox(
                dataclasses.replace(record, instance=instance), expect_version=record.version
            )
            client = await self._agent(record)
            built = await self.templates.get(template)
            if built is not None and (built.env or built.defaults):
                await _builder.apply_defaults(client, built, env=run_env)
            elif run_env:
                await client.call(Op.CONFIGURE, {"env": run_env})
            if egress is not None:
                await _secrets.install_trust(client, egress.ca_cert, max_bytes=self.settings.max_file_bytes)
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
            network=network.to_wire(),
            secrets=[b.name for b in bindings],
        )
        return record.info()

    async def get(self, sandbox_id: str, *, tenant: TenantId) -> SandboxInfo:
        record = await self._reconciled(await self._record(sandbox_id, tenant))
        return record.info()

    async def list_sandboxes(
        self,
        *,
        tenant: TenantId,
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

    async def kill(self, sandbox_id: str, *, tenant: TenantId) -> SandboxInfo:
        record = await self._record(sandbox_id, tenant)
        if record.state is SandboxState.STOPPED:
            return record.info()
        return (await self._stop(record, StopReason.KILLED, killed_by=tenant)).info()

    # -- network ---------------------------------------------------------------------------------------------
    async def update_network(self, sandbox_id: str, network: object, *, tenant: TenantId) -> SandboxInfo:
        """Replace the sandbox's egress policy in place; open connections it now denies are cut."""
        record = await self._reconciled(await self._record(sandbox_id, tenant))
        require_state(
            record.state, Action.NETWORK, SandboxState.RUNNING, SandboxState.PAUSED, sandbox_id=sandbox_id
        )
        runtime = self._require_reachable(record)
        policy = _network.check_policy(
            network, runtime, record.isolation, self.settings.egress.denied_networks()
        )
        assert record.instance is not None
        cut = await _network.controller(runtime, record.isolation).update_network(record.instance, policy)
        record = await _network.ingest_decisions(
            self.store, self.audit, runtime, record, self.egress_decisions
        )
        while True:
            try:
                record = await self.store.put_sandbox(
                    dataclasses.replace(record, network=policy.to_wire()), expect_version=record.version
                )
                break
            except Conflict:
                record = await self._record(sandbox_id, tenant)
        await self.audit.record(
            AuditAction.NETWORK_UPDATE,
            tenant_id=tenant,
            sandbox_id=record.sandbox_id,
            network=policy.to_wire(),
            cut=cut,
        )
        return record.info()

    async def network_status(self, sandbox_id: str, *, tenant: TenantId) -> NetworkStatus:
        """The sandbox's policy and its decision counts (and the audit log catches up with them)."""
        record = await self._reconciled(await self._record(sandbox_id, tenant))
        if record.network == "none" or record.state is not SandboxState.RUNNING or record.instance is None:
            return NetworkStatus(sandbox_id=str(record.sandbox_id), network=record.network)
        runtime = self._require_reachable(record)
        stats = await _network.controller(runtime, record.isolation).network_stats(record.instance)
        await _network.ingest_decisions(self.store, self.audit, runtime, record, self.egress_decisions)
        return NetworkStatus(
            sandbox_id=str(record.sandbox_id),
            network=record.network,
            connections=int(stats.get("connections", 0)),
            totals=dict(stats.get("totals", {})),
            decisions=list(stats.get("decisions", [])),
            dropped=dict(stats.get("dropped", {})),
        )

    # -- resource use ---------------------------------------------------------------------------------------
    async def metrics(
        self, sandbox_id: str, *, tenant: TenantId, start: float | None = None, end: float | None = None
    ) -> list[ResourceSample]:
        """The sandbox's resource samples in ``[start, end]`` (Unix seconds), oldest first; a running one takes
        a fresh sample first. Samples live in this server's memory (core/usage.py)."""
        record = await self._reconciled(await self._record(sandbox_id, tenant))
        if record.state is SandboxState.RUNNING and self.owns(record):
            await self._sample(record)
        return self.usage.samples(str(record.sandbox_id), start, end)

    async def _sample(self, record: SandboxRecord) -> None:
        """One sample, never while the sandbox is being paused (a frozen agent would answer nothing)."""
        async with self._pause_locks.setdefault(str(record.sandbox_id), anyio.Lock()):
            fresh = await self.store.get_sandbox(record.sandbox_id)
            if fresh is not None and fresh.state is SandboxState.RUNNING:
                await self.usage.take(fresh, await self._agent(fresh))

    async def run_sampler(self) -> None:
        """Sample every running sandbox of this node each ``metrics_interval`` seconds. Run it in a task group."""

        async def live() -> list[SandboxRecord]:
            return [r for r in await self.store.list_sandboxes(states=_LIVE) if self.owns(r)]

        await self.usage.run(live, self._sample, self.settings.metrics_interval, anyio.sleep)

    async def set_timeout(self, sandbox_id: str, seconds: float, *, tenant: TenantId) -> SandboxInfo:
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

    async def pause(self, sandbox_id: str, *, tenant: TenantId) -> SandboxInfo:
        record = await self._reconciled(await self._record(sandbox_id, tenant))
        require_state(record.state, Action.PAUSE, SandboxState.RUNNING, sandbox_id=sandbox_id)
        return (await self._pause(record)).info()

    async def _pause(self, record: SandboxRecord) -> SandboxRecord:
        """Pause ``record``; Conflict if it changed since it was read (say, another caller paused it first).

        One pause of a sandbox at a time in this process: the reaper's auto-pause and a request that finds the
        deadline passed would otherwise both ask the runtime, and the second would fail on a pausing sandbox.
        """
        runtime = self._require_reachable(record)
        if not runtime.capabilities.pause:
            why = runtime.capabilities.pause_refusal
            raise Unsupported(
                f"{record.isolation} sandboxes cannot be paused" + (f": {why}" if why else ""),
                details={"isolation": record.isolation},
            )
        _network.require_with_network(record, runtime.capabilities.pause_network, "paused")
        async with self._pause_locks.setdefault(str(record.sandbox_id), anyio.Lock()):
            fresh = await self.store.get_sandbox(record.sandbox_id)
            if fresh is None or fresh.version != record.version:
                raise Conflict(f"sandbox {record.sandbox_id} changed while it was being paused; try again")
            return await self._pause_now(runtime, record)

    async def _pause_now(self, runtime: Runtime, record: SandboxRecord) -> SandboxRecord:
        assert record.instance is not None and record.deadline is not None
        remaining = max(0.0, record.deadline - self._clock())
        await self._set_deadline(record, None)  # a paused sandbox's deadline is suspended
        try:
            await runtime.pause(record.instance)
        except BaseException:
            with anyio.CancelScope(shield=True):  # still running: its deadline must hold again
                await self._set_deadline(record, record.deadline)
            raise
        return await self.store.put_sandbox(
            dataclasses.replace(
                record,
                state=transition(record.state, SandboxState.PAUSED),
                deadline=None,
                paused_remaining=remaining,
            ),
            expect_version=record.version,
        )

    async def resume(
        self, sandbox_id: str, *, at_least: float | None = None, tenant: TenantId
    ) -> SandboxInfo:
        """Resume a paused sandbox with the time it had left, or ``at_least`` seconds if that is more."""
        if at_least is not None:
            at_least = self._check_timeout(at_least)
        record = await self._record(sandbox_id, tenant)
        require_state(record.state, Action.RESUME, SandboxState.PAUSED, sandbox_id=sandbox_id)
        assert record.instance is not None
        await self._require_reachable(record).resume(record.instance)
        deadline = self._clock() + max(record.paused_remaining or 0.0, at_least or 0.0)
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
        # Up-front errors are raised here, before any stream starts. The build's own events are not to be
        # prefetched by a caller: the generator holds a task group, which must be entered and left in one task.
        await self.templates.check_new(params.name)
        return _builder.build_template(params, templates=self.templates, runtime=runtime)

    # -- processes -------------------------------------------------------------------------------------------
    async def exec(
        self, sandbox_id: str, params: ExecParams, *, tenant: TenantId
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
                            oom_killed=event.oom_killed,
                        )
                yield event
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    async def attach(
        self, sandbox_id: str, process_id: str, *, tenant: TenantId
    ) -> AsyncIterator[ProcessEvent]:
        client = await self._running_agent(sandbox_id, tenant, Action.EXEC)
        return _processes.attach(client, process_id)

    async def list_processes(self, sandbox_id: str, *, tenant: TenantId) -> list[ProcessInfo]:
        return await _processes.list_processes(await self._running_agent(sandbox_id, tenant, Action.EXEC))

    async def send_stdin(
        self,
        sandbox_id: str,
        process_id: str,
        data: bytes,
        *,
        eof: bool = False,
        tenant: TenantId,
    ) -> None:
        client = await self._running_agent(sandbox_id, tenant, Action.EXEC)
        await _processes.send_stdin(client, process_id, data, eof=eof)

    async def signal(self, sandbox_id: str, process_id: str, signal: int, *, tenant: TenantId) -> None:
        if not isinstance(signal, int) or not 1 <= signal <= 64:
            raise InvalidRequest("signal must be a signal number from 1 to 64")
        client = await self._running_agent(sandbox_id, tenant, Action.EXEC)
        await _processes.send_signal(client, process_id, signal)

    # -- files -----------------------------------------------------------------------------------------------
    async def read_file(
        self, sandbox_id: str, path: str, *, user: str | None = None, tenant: TenantId
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
        tenant: TenantId,
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
        tenant: TenantId,
    ) -> list[EntryInfo]:
        client = await self._running_agent(sandbox_id, tenant, Action.FILES)
        return await _files.list_dir(client, path, depth=depth, user=user)

    async def stat(
        self, sandbox_id: str, path: str, *, user: str | None = None, tenant: TenantId
    ) -> EntryInfo:
        return await _files.stat(await self._running_agent(sandbox_id, tenant, Action.FILES), path, user=user)

    async def make_dir(
        self, sandbox_id: str, path: str, *, user: str | None = None, tenant: TenantId
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
        tenant: TenantId,
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
        tenant: TenantId,
    ) -> None:
        client = await self._running_agent(sandbox_id, tenant, Action.FILES)
        await _files.rename(client, src, dst, overwrite=overwrite, user=user)

    async def configure(
        self,
        sandbox_id: str,
        *,
        env: dict[str, str],
        user: str | None = None,
        cwd: str | None = None,
        tenant: TenantId,
    ) -> None:
        """Change a running sandbox's defaults for the processes it starts from now on.

        ``env`` is merged into its environment (and kept on its record, see :meth:`sandbox_env`); ``user``
        (``user`` or ``root``) and ``cwd`` become the defaults of commands that name none.
        """
        env = _check_str_map("env", env, max_items=256, max_len=32768)
        if cwd is not None:
            _files.check_path(cwd)
        client = await self._running_agent(sandbox_id, tenant, Action.EXEC)
        fields: dict[str, object] = {"env": env}
        if user is not None:
            fields["user"] = user
        if cwd is not None:
            fields["cwd"] = cwd
        await client.call(Op.CONFIGURE, fields)
        while env:
            record = await self._record(sandbox_id, tenant)
            try:
                await self.store.put_sandbox(
                    dataclasses.replace(record, env={**record.env, **env}), expect_version=record.version
                )
                return
            except Conflict:
                continue  # changed meanwhile (a timeout, a pause): merge into the new version

    async def sandbox_env(self, sandbox_id: str, *, tenant: TenantId) -> dict[str, str]:
        """The environment variables a sandbox was given (at create and by :meth:`configure`)."""
        return dict((await self._record(sandbox_id, tenant)).env)

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
        self, sandbox_id: str, params: RunCodeParams, *, tenant: TenantId
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
        tenant: TenantId,
    ) -> CodeContext:
        client = await self._running_agent(sandbox_id, tenant, Action.EXEC)
        return await _interpreter.create_context(client, language=language, cwd=cwd)

    async def list_code_contexts(self, sandbox_id: str, *, tenant: TenantId) -> list[CodeContext]:
        return await _interpreter.list_contexts(await self._running_agent(sandbox_id, tenant, Action.EXEC))

    async def restart_code_context(self, sandbox_id: str, context_id: str, *, tenant: TenantId) -> None:
        client = await self._running_agent(sandbox_id, tenant, Action.EXEC)
        await _interpreter.restart_context(client, context_id)

    async def remove_code_context(self, sandbox_id: str, context_id: str, *, tenant: TenantId) -> None:
        client = await self._running_agent(sandbox_id, tenant, Action.EXEC)
        await _interpreter.remove_context(client, context_id)

    async def interrupt_code_context(self, sandbox_id: str, context_id: str, *, tenant: TenantId) -> None:
        client = await self._running_agent(sandbox_id, tenant, Action.EXEC)
        await _interpreter.interrupt_context(client, context_id)

    # -- ports ---------------------------------------------------------------------------------------------
    async def open_port(self, sandbox_id: str, port: int, *, tenant: TenantId) -> _ports.PortStream:
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

    # -- the in-sandbox API of E2B's SDK (server/e2b/envd) ----------------------------------------------------
    async def authenticate_envd(self, sandbox_id: str, access_token: str | None) -> TenantId:
        """The tenant owning ``sandbox_id``, for a caller presenting the sandbox's envd access token.

        The token (``SandboxInfo.envd_access_token``, E2B's ``envdAccessToken``) stands in for an API key on
        the sandbox's own in-sandbox API, for that one sandbox only. A wrong or missing token, an unknown id, a
        stopped sandbox and an unclaimed warm-pool member are all :class:`~corral.errors.NotFound` with the same
        message, so the answer says nothing about which sandbox ids exist.
        """
        presented = (access_token or "").encode()
        return await self.authenticate_envd_proof(
            sandbox_id, lambda token: hmac.compare_digest(presented, token.encode())
        )

    async def authenticate_envd_proof(self, sandbox_id: str, proves: Callable[[str], bool]) -> TenantId:
        """:meth:`authenticate_envd` for credentials derived from the token rather than the token itself.

        ``proves(token)`` is given the sandbox's envd access token and says whether the caller's credential
        (e.g. a signed file URL: a hash over path, operation, user, expiry and the token) was made from it; it
        should compare in constant time. It is called once whether or not the sandbox exists.
        """
        record = (
            await self.store.get_sandbox(SandboxId(sandbox_id)) if SandboxId.is_valid(sandbox_id) else None
        )
        usable = (
            record is not None
            and record.pool_id is None
            and record.state is not SandboxState.STOPPED
            and bool(record.envd_access_token)
        )
        proven = proves(record.envd_access_token if record is not None and usable else _NO_TOKEN)
        if record is None or not usable or not proven:
            raise NotFound(f"sandbox {sandbox_id} was not found")
        return record.tenant_id

    # -- terminals and watches (logic in core/pty.py and core/watch.py) -------------------------------------
    async def create_pty(self, sandbox_id: str, params: PtyParams, *, tenant: TenantId) -> ProcessEvent:
        """Open a terminal; returns its ``started`` event. Follow its output with :meth:`attach`."""
        _pty.check_params(params, max_timeout=self.settings.max_timeout)
        return await _pty.create(await self._running_agent(sandbox_id, tenant, Action.EXEC), params)

    async def resize_pty(
        self, sandbox_id: str, process_id: str, cols: int, rows: int, *, tenant: TenantId
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
        tenant: TenantId,
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
            if record.state is SandboxState.RUNNING and record.network != "none":
                runtime = self._runtime(record.isolation)  # the audit log keeps up with its egress decisions
                await _network.ingest_decisions(
                    self.store, self.audit, runtime, record, self.egress_decisions
                )
        await self.finish_teardowns()
        return soonest

    async def finish_teardowns(self, *, wait: float = 0.0) -> int:
        """Retry the kills whose host clean-up the kernel held up, each runtime once (levels may share one:
        kubernetes); with ``wait``, go on for up to that many seconds while any is left (a server stopping
        finishes what it can). Returns how many are left for a later pass, or the next start."""
        runtimes = {id(r): r for r in map(self._runtime, self.settings.enabled_runtimes)}.values()
        finishers = [r for r in runtimes if isinstance(r, TeardownFinisher)]
        deadline = time.monotonic() + wait
        while True:
            left = sum([await runtime.finish_teardowns() for runtime in finishers])
            if not left or time.monotonic() >= deadline:
                return left
            await anyio.sleep(_TEARDOWN_RETRY_EVERY)

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
            if record.auto_pause:
                return await self._auto_pause(record)
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

    async def _auto_pause(self, record: SandboxRecord) -> SandboxRecord:
        try:
            return await self._pause(record)
        except Conflict:  # paused (or given more time, or killed) by another caller first: that stands
            fresh = await self.store.get_sandbox(record.sandbox_id)
            return fresh if fresh is not None else record
        except CorralError:  # the deadline holds either way: what cannot pause is stopped
            log.exception("auto-pause of sandbox %s failed; stopping it", record.sandbox_id)
            return await self._stop(record, StopReason.TIMEOUT)

    async def _stop(
        self, record: SandboxRecord, reason: StopReason, *, killed_by: TenantId | None = None
    ) -> SandboxRecord:
        """Stop the sandbox once: a kill, the reaper and a read that finds it expired can all get here at the
        same moment; the first tears it down and records why (a kill: who asked, when ``killed_by``), the
        others get the stopped record and record nothing."""
        key = str(record.sandbox_id)
        lock = self._stop_locks.setdefault(key, anyio.Lock())
        try:
            async with lock:
                fresh = await self.store.get_sandbox(record.sandbox_id)
                if fresh is None or fresh.state is SandboxState.STOPPED:
                    return fresh or record
                return await self._stop_once(fresh, reason, killed_by)
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._stop_locks.pop(key, None)

    async def _stop_once(
        self, record: SandboxRecord, reason: StopReason, killed_by: TenantId | None
    ) -> SandboxRecord:
        if reason is not StopReason.KILLED:
            await self.audit.record(
                AuditAction.SANDBOX_EXPIRE if reason is StopReason.TIMEOUT else AuditAction.SANDBOX_CRASH,
                tenant_id=record.tenant_id,
                sandbox_id=record.sandbox_id,
            )
        elif killed_by is not None:  # a pool discarding a member nobody saw is no one's kill
            await self.audit.record(
                AuditAction.SANDBOX_KILL, tenant_id=killed_by, sandbox_id=record.sandbox_id
            )
        runtime = self._require_reachable(record)
        await self._drop_agent(record.sandbox_id)
        self.usage.forget(str(record.sandbox_id))
        if record.instance is not None:
            with anyio.CancelScope(shield=True):
                instance = record.instance
                if record.network != "none":  # its decision feed goes with its state dir: copy it first
                    record = await _network.ingest_decisions(
                        self.store, self.audit, runtime, record, self.egress_decisions
                    )
                await runtime.destroy(instance)
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

    async def _seal(self, bindings: tuple[SecretBinding, ...]) -> str | None:
        """The bindings sealed for the store (None without secrets)."""
        if not bindings:
            return None
        if self._sealer is None:
            self._sealer = await anyio.to_thread.run_sync(
                _secrets.Sealer.from_file, self.settings.secrets_key_path
            )
        return self._sealer.seal(bindings)

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

    async def _resolve_template(
        self, template: str, tenant: TenantId, *, accepts: tuple[RootfsKind, ...]
    ) -> RootfsSource:
        try:
            return await self.templates.resolve(template, accepts=accepts)
        except NotFound as exc:  # it names what exists: only what this tenant may use
            names = [t.name for t in await self.list_templates(tenant=tenant)]
            raise NotFound(
                f"template {template!r} not found; available templates: {', '.join(names)}",
                details={"available": names},
            ) from exc

    async def _build_on_first_use(self, template: str) -> None:
        """The built-in code-interpreter template is built when first asked for (pip; ~15 s from a near index).

        One build at a time; it is shielded, so a client that stops waiting does not throw the work away and
        the next create finds it ready.
        """
        if template != CODE_INTERPRETER_TEMPLATE or await self.templates.get(template) is not None:
            return
        async with self._build_lock:
            if await self.templates.get(template) is not None:
                return
            log.info("building the %s template on first use", template)
            started = time.monotonic()
            with anyio.CancelScope(shield=True):
                await build_code_interpreter_template(self.templates, self.settings.cache_root, name=template)
            log.info("built the %s template in %.1f s", template, time.monotonic() - started)

    async def delete_own_template(self, name: str, *, tenant: TenantId) -> None:
        """Delete a snapshot template ``tenant`` made; shared templates are an operator's to delete."""
        await self._check_template_access(name, tenant)
        if name not in {t.name for t in await self.templates.list()}:
            raise NotFound(f"template {name!r} not found")
        record = await self.templates.get(name)
        if record is None or record.owner != tenant:  # the built-in base, or one an operator made
            raise PermissionDenied(f"template {name!r} is shared by all tenants; an admin key deletes it")
        await self.templates.delete(name)

    async def list_templates(self, *, tenant: TenantId) -> list[TemplateRecord]:
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

    async def sandbox_audit(self, sandbox_id: str, *, tenant: TenantId, limit: int = 200) -> list[AuditEntry]:
        """The audit entries about one of the tenant's sandboxes (also once it stopped), oldest first."""
        record = await self._record(sandbox_id, tenant)
        return await entries_of_sandbox(self.store, record.sandbox_id, tenant, limit=limit)

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
        self._pause_locks.pop(str(sandbox_id), None)
        if client is not None:
            await client.aclose()

    async def _set_deadline(self, record: SandboxRecord, deadline: float | None) -> None:
        """Move the hard deadline the sandbox's runtime holds (the reaper enforces the stored one too).

        An auto-pause sandbox's runtime holds none: at its deadline the reaper pauses it instead.
        """
        assert record.instance is not None
        if record.auto_pause:
            deadline = None
        try:
            await self._require_reachable(record).set_deadline(record.instance, deadline)
        except Unsupported:
            log.debug("sandbox %s has no runtime deadline; the reaper alone enforces it", record.sandbox_id)

    # -- snapshots and forks (core.snapshots) ----------------------------------------------------------------
    async def snapshot(
        self, sandbox_id: str, name: str, *, description: str = "", tenant: TenantId
    ) -> TemplateInfo:
        """Capture a running sandbox (files, and memory where the runtime can) as the template ``name``."""
        return await _snapshots.snapshot(self, sandbox_id, name, description=description, tenant=tenant)

    async def fork(self, sandbox_id: str, count: int = 1, *, tenant: TenantId) -> list[SandboxInfo]:
        """``count`` independent copies of a running sandbox (with memory where the runtime can)."""
        return await _snapshots.fork(self, sandbox_id, count, tenant=tenant)
