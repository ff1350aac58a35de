"""Template builds in the core: runs :func:`corral.images.build.build_layers` with a step runner made of real
sandboxes, streams its progress, and stores the result as a template.

Each ``--run`` step gets a throw-away sandbox of the chosen runtime over the layers built so far, with no
network (the runtimes' only mode today) and a bounded lifetime (the shim kills it at the deadline even if this
process dies). When the step exits 0 the sandbox is paused, so its files hold still, and the runtime copies
its writable layer out (:class:`~corral.runtimes.base.LayerExporter`). Build sandboxes are not sandbox
records: nobody can exec into them, and they are destroyed before the step returns, whatever happens.

Also here: what happens when a sandbox is created from a built template (:func:`apply_defaults`): its workdir
and user become the agent's defaults, ``start_cmd`` starts in the background, and ``ready_cmd`` is polled until
it exits 0, within a bound.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio

from corral.core import processes as _processes
from corral.core.agent_client import AgentClient
from corral.core.records import TemplateRecord
from corral.core.templates import TemplateRegistry
from corral.errors import CorralError, InvalidRequest, Timeout, Unsupported
from corral.ids import SandboxId
from corral.images.build import build_layers
from corral.models import BuildEvent, BuildEventKind, BuildParams, EventKind, ExecParams
from corral.protocol import Op
from corral.runtimes.base import ArtifactKind, HostLayers, LayerExporter, Limits, Runtime, SandboxSpec

__all__ = ["READY_TIMEOUT", "SandboxStepRunner", "apply_defaults", "build_template"]

log = logging.getLogger("corral.core.builder")

STEP_TIMEOUT = 1800.0  # one --run step (an apt-get install of a toolchain over a slow mirror fits)
STEP_LIMITS = Limits(memory_mb=2048, cpus=2.0, pids=4096)  # builds compile things; bounded all the same
READY_TIMEOUT = 60.0  # how long create waits for a template's ready_cmd to succeed
READY_INTERVAL = 0.2  # between ready_cmd attempts (each is a full process start in the sandbox)


class SandboxStepRunner:
    """:class:`corral.images.build.StepRunner` over a runtime: one fresh sandbox per step."""

    def __init__(self, runtime: Runtime, *, clock: Callable[[], float] = time.time) -> None:
        if ArtifactKind.LAYER not in runtime.capabilities.snapshot or not isinstance(runtime, LayerExporter):
            raise Unsupported(f"{runtime.name} sandboxes cannot run build steps (no layer export)")
        self._runtime = runtime
        self._exporter: LayerExporter = runtime
        self._clock = clock

    async def run_step(
        self,
        *,
        lowers: tuple[Path, ...],
        command: str,
        env: dict[str, str],
        workdir: str | None,
        user: str,
        dest: Path,
        output: Callable[[str], Awaitable[None]],
    ) -> int:
        spec = SandboxSpec(
            sandbox_id=SandboxId.new(),
            rootfs=HostLayers(lower=lowers),
            limits=STEP_LIMITS,
            env=env,
            deadline=self._clock() + STEP_TIMEOUT + 60,
        )
        instance = await self._runtime.create(spec)
        try:
            client = await AgentClient.open(
                await self._runtime.connect(instance), sandbox_id=str(spec.sandbox_id)
            )
            try:
                code = await _run(
                    client, ExecParams(cmd=command, cwd=workdir, user=user, timeout=STEP_TIMEOUT), output
                )
                if code == 0:  # flush what the sandbox's kernel (gVisor's sentry) still caches
                    await _run(client, ExecParams(argv=["sync"], user="root", timeout=60), None)
            finally:
                await client.aclose()
            if code == 0:
                if self._runtime.capabilities.pause:
                    await self._runtime.pause(instance)
                await self._exporter.export_layer(instance, dest)
            return code
        finally:
            with anyio.CancelScope(shield=True):
                await self._runtime.destroy(instance)


async def _run(
    client: AgentClient, params: ExecParams, output: Callable[[str], Awaitable[None]] | None
) -> int:
    code: int | None = None
    async for event in _processes.exec_stream(client, params):
        if event.kind in (EventKind.STDOUT, EventKind.STDERR) and output is not None:
            await output(event.text)
        elif event.kind is EventKind.EXIT:
            code = event.exit_code if event.exit_code is not None else 128 + (event.signal or 0)
    return 1 if code is None else code


async def build_template(
    params: BuildParams, *, templates: TemplateRegistry, runtime: Runtime
) -> AsyncIterator[BuildEvent]:
    """Build ``params`` and store it as a template, yielding progress; the last event is DONE."""
    await templates.check_new(params.name)
    runner = SandboxStepRunner(runtime) if params.steps else None
    send, receive = anyio.create_memory_object_stream[BuildEvent](64)
    result: list[TemplateRecord] = []

    async def produce() -> None:
        async with send:
            built = await build_layers(
                params,
                layers=templates.layers,
                layout=templates.oci_layout,
                runner=runner or _NoSteps(),
                emit=send.send,
            )
            d = built.defaults
            record = await templates.put_built(
                TemplateRecord(
                    name=params.name,
                    kind=built.kind,
                    rootfs=str(built.layers[0]),
                    created_at=time.time(),
                    env=d.env,
                    description=params.description or params.source,
                    layers=[str(p) for p in built.layers],
                    layer_keys=list(built.layer_keys),
                    image=params.source.strip() if built.kind == "image" and not params.steps else None,
                    defaults={
                        "workdir": d.workdir,
                        "user": d.user,
                        "cmd": d.cmd,
                        "start_cmd": d.start_cmd,
                        "ready_cmd": d.ready_cmd,
                    },
                )
            )
            result.append(record)
            await send.send(
                BuildEvent(kind=BuildEventKind.DONE, message=params.name, total_steps=len(params.steps))
            )

    try:
        async with anyio.create_task_group() as tg, receive:
            tg.start_soon(produce)
            async for event in receive:
                yield event
    except BaseExceptionGroup as group:  # the producer's own error, not a group of one
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from group.exceptions[0].__cause__
        raise


class _NoSteps:
    async def run_step(self, **_: object) -> int:  # pragma: no cover - build_layers calls it only for steps
        raise InvalidRequest("no step runner")


async def apply_defaults(client: AgentClient, record: TemplateRecord, *, env: dict[str, str]) -> None:
    """Configure a new sandbox's agent from its template, start ``start_cmd``, wait for ``ready_cmd``."""
    d = record.defaults
    fields: dict[str, object] = {}
    merged = {**record.env, **env}
    if merged:
        fields["env"] = merged
    if d.get("workdir"):
        fields["cwd"] = d["workdir"]
    if d.get("user"):
        fields["user"] = d["user"]
    if fields:
        await client.call(Op.CONFIGURE, fields)
    if d.get("start_cmd"):
        async for _ in _processes.exec_stream(
            client, ExecParams(cmd=d["start_cmd"], background=True, tag="start")
        ):
            pass
    ready = d.get("ready_cmd")
    if ready:
        try:
            with anyio.fail_after(READY_TIMEOUT):
                while True:  # polled by design: the ready command is the only signal there is
                    if await _run(client, ExecParams(cmd=ready, timeout=READY_TIMEOUT), None) == 0:
                        break
                    await anyio.sleep(READY_INTERVAL)
        except TimeoutError as exc:
            raise Timeout(
                f"the template's ready command did not succeed within {READY_TIMEOUT:g}s: {ready[:80]!r}"
            ) from exc
        except CorralError:
            raise
