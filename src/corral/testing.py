"""Public test kit: the runtime conformance suite and helpers for testing code that uses Corral.

``check_runtime(make_runtime, rootfs=...)`` boots sandboxes on a runtime and checks, through the real agent and
the :class:`~corral.runtimes.base.Runtime` contract only (no host path, pid or socket is looked at, so a VM or a
Pod passes it the same way), everything every runtime must do the same way:

- the agent handshake, commands and exit codes, binary-safe output, files, errors, no network;
- re-attach after the connection drops;
- limits, where the runtime declares ``resource_limits``: memory (an allocation past it fails or ends the
  sandbox), pids (fork stops short of the limit), cpu (busy threads get about the share they were given);
- the deadline: :meth:`Runtime.set_deadline` moves it, and the runtime itself ends the sandbox then;
- pause/resume where declared; snapshot and fork where declared (a fork starts from the captured files, and
  from the captured memory where the runtime captures it, and diverges from its parent); discard;
- cleanup: destroy leaves the sandbox ``missing`` and is idempotent.

``isolated=False`` leaves out the checks only an isolating runtime can pass (network), for the fake runtime.
The namespace, gVisor and fake runtimes pass it (tests/runtimes/test_conformance.py).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio

from corral.core import files
from corral.core.agent_client import AgentClient
from corral.core.processes import exec_stream, list_processes, send_signal
from corral.errors import CorralError, NotFound
from corral.ids import SandboxId
from corral.models import EventKind, ExecParams, ProcessEvent
from corral.protocol import PROTOCOL_VERSION, Event, Op
from corral.runtimes.base import (
    Artifact,
    ArtifactKind,
    Instance,
    Limits,
    ObservedState,
    RootfsSource,
    Runtime,
    SandboxSpec,
)

__all__ = ["check_runtime", "run_command"]

# the limits the limit checks set: small enough to hit quickly, large enough for the agent and a python3
CHECK_LIMITS = Limits(memory_mb=96, pids=48, cpus=0.5)
DEADLINE_WAIT = 30.0  # seconds a moved deadline may take to end the sandbox (a loaded 2-core CI host)


async def run_command(client: AgentClient, params: ExecParams) -> tuple[bytes, bytes, ProcessEvent]:
    """Run one command through an agent; returns (stdout, stderr, exit event)."""
    out, err = bytearray(), bytearray()
    async for event in exec_stream(client, params):
        if event.kind is EventKind.STDOUT:
            out += event.data
        elif event.kind is EventKind.STDERR:
            err += event.data
        elif event.kind is EventKind.EXIT:
            return bytes(out), bytes(err), event
    raise AssertionError("the command's event stream ended without an exit event")


async def check_runtime(
    make_runtime: Callable[[], Runtime], *, rootfs: RootfsSource, timeout: float = 120, isolated: bool = True
) -> None:
    """Run the conformance checks; raises AssertionError naming the first property that does not hold."""
    runtime = make_runtime()
    await runtime.check()
    made: list[Instance] = []

    async def create(
        *,
        limits: Limits | None = None,
        upper_seed: Artifact | None = None,
        restore_from: Artifact | None = None,
    ) -> Instance:
        spec = SandboxSpec(
            sandbox_id=SandboxId.new(),
            rootfs=rootfs,
            deadline=time.time() + timeout,
            limits=limits or Limits(),
            upper_seed=upper_seed,
            restore_from=restore_from,
        )
        instance = await runtime.create(spec)
        made.append(instance)
        assert instance.sandbox_id == spec.sandbox_id and instance.runtime == runtime.name, (
            "create returned an instance of another sandbox or runtime"
        )
        return instance

    try:
        instance = await create()
        observed = await runtime.inspect(instance)
        assert observed.state is ObservedState.RUNNING, f"a new sandbox is {observed.state}, not running"
        client = await AgentClient.open(await runtime.connect(instance), sandbox_id=instance.sandbox_id)
        try:
            await _check_agent(client, isolated=isolated)
        finally:
            await client.aclose()
        await _check_reconnect(runtime, instance)
        if runtime.capabilities.pause:
            await _check_pause(runtime, instance)
        if runtime.capabilities.snapshot:
            await _check_snapshot(runtime, instance, create)
        if runtime.capabilities.resource_limits:
            await _check_limits(runtime, await create(limits=CHECK_LIMITS))
        await _check_deadline(runtime, await create())
    finally:
        with anyio.CancelScope(shield=True):
            for each in made:
                await runtime.destroy(each)
    for each in made:
        observed = await runtime.inspect(each)
        assert observed.state is ObservedState.MISSING, f"a destroyed sandbox is still {observed.state}"
        await runtime.destroy(each)  # idempotent: a second destroy is a no-op, not an error


async def _run(runtime: Runtime, instance: Instance, params: ExecParams) -> tuple[bytes, bytes, ProcessEvent]:
    client = await AgentClient.open(await runtime.connect(instance), sandbox_id=instance.sandbox_id)
    try:
        with anyio.fail_after(60):
            return await run_command(client, params)
    finally:
        await client.aclose()


async def _check_agent(client: AgentClient, *, isolated: bool) -> None:
    assert client.hello.get("version") == PROTOCOL_VERSION, "the agent's hello has the wrong version"
    ok = await client.call(Op.PING)
    assert ok.get("ev") == Event.OK, "ping did not answer ok"

    out, err, done = await run_command(client, ExecParams(cmd="echo hi; echo oops >&2; exit 3"))
    assert out == b"hi\n", f"stdout was {out!r}"
    assert err == b"oops\n", f"stderr was {err!r}"
    assert done.exit_code == 3, f"exit code was {done.exit_code}"

    every_byte = bytes(range(256))

    async def chunks() -> AsyncIterator[bytes]:
        yield every_byte

    written = await files.write(client, "/tmp/conformance.bin", chunks(), max_bytes=1 << 20)
    assert written == 256, f"wrote {written} bytes, not 256"
    back = b"".join([c async for c in files.read(client, "/tmp/conformance.bin")])
    assert back == every_byte, "a binary file did not read back byte for byte"
    out, _, done = await run_command(client, ExecParams(argv=["cat", "/tmp/conformance.bin"]))
    assert out == every_byte, "binary output of a command was altered"
    entries = await files.list_dir(client, "/tmp")
    assert "conformance.bin" in {e.name for e in entries}, "list does not show a file just written"

    try:
        await run_command(client, ExecParams(argv=["/no/such/program"]))
    except NotFound:
        pass
    else:
        raise AssertionError("running a missing program did not raise NotFound")

    if not isolated:
        return
    # no network by default: only the loopback interface exists
    out, _, _ = await run_command(client, ExecParams(cmd="cat /proc/net/dev"))
    interfaces = {line.split(":")[0].strip() for line in out.decode().splitlines()[2:] if ":" in line}
    assert interfaces <= {"lo"}, f"a sandbox without network has interfaces {sorted(interfaces)}"


async def _check_reconnect(runtime: Runtime, instance: Instance) -> None:
    client = await AgentClient.open(await runtime.connect(instance), sandbox_id=instance.sandbox_id)
    try:
        events = exec_stream(client, ExecParams(cmd="sleep 30", background=True))
        process_id = None
        async for event in events:
            if event.kind is EventKind.STARTED:
                process_id = event.process_id
        assert process_id, "a background command did not report its process id"
    finally:
        await client.aclose()
    client = await AgentClient.open(await runtime.connect(instance), sandbox_id=instance.sandbox_id)
    try:
        running = {p.process_id for p in await list_processes(client) if p.running}
        assert process_id in running, "a background process did not survive its connection closing"
        await send_signal(client, process_id, 9)
    finally:
        await client.aclose()


async def _check_pause(runtime: Runtime, instance: Instance) -> None:
    await runtime.pause(instance)
    observed = await runtime.inspect(instance)
    assert observed.state is ObservedState.PAUSED, f"a paused sandbox is {observed.state}"
    await runtime.resume(instance)
    client = await AgentClient.open(await runtime.connect(instance), sandbox_id=instance.sandbox_id)
    try:
        with anyio.fail_after(30):
            out, _, _ = await run_command(client, ExecParams(cmd="echo back"))
        assert out == b"back\n", "a resumed sandbox does not run commands"
    finally:
        await client.aclose()


async def _check_snapshot(
    runtime: Runtime,
    instance: Instance,
    create: Callable[..., Awaitable[Instance]],
) -> None:
    """Snapshot a sandbox with a file and a background process, fork it, and check what the fork has."""
    marker = secrets.token_hex(8)
    await _run(runtime, instance, ExecParams(cmd=f"echo {marker} > /tmp/snap.txt"))
    client = await AgentClient.open(await runtime.connect(instance), sandbox_id=instance.sandbox_id)
    try:
        started = [
            e.process_id
            async for e in exec_stream(client, ExecParams(cmd="sleep 300", background=True))
            if e.kind is EventKind.STARTED
        ]
    finally:
        await client.aclose()
    assert started and started[0], "a background command did not report its process id"
    snap = await runtime.snapshot(instance, f"conformance-{secrets.token_hex(6)}")
    try:
        assert snap.files.kind in runtime.capabilities.snapshot, f"snapshot made a {snap.files.kind} artifact"
        assert (snap.memory is not None) == (ArtifactKind.MEMORY in runtime.capabilities.snapshot), (
            "snapshot captured memory against what the runtime declares (or failed to)"
        )
        out, _, _ = await _run(runtime, instance, ExecParams(cmd="cat /tmp/snap.txt"))
        assert out == f"{marker}\n".encode(), "the snapshotted sandbox lost its files"
        fork = await create(upper_seed=snap.files, restore_from=snap.memory)
        out, _, _ = await _run(runtime, fork, ExecParams(cmd="cat /tmp/snap.txt"))
        assert out == f"{marker}\n".encode(), f"a fork does not have its parent's files ({out!r})"
        await _run(runtime, fork, ExecParams(cmd="echo fork > /tmp/snap.txt"))
        out, _, _ = await _run(runtime, instance, ExecParams(cmd="cat /tmp/snap.txt"))
        assert out == f"{marker}\n".encode(), "a fork's writes reached its parent"
        if snap.memory is not None:
            client = await AgentClient.open(await runtime.connect(fork), sandbox_id=fork.sandbox_id)
            try:
                running = {p.process_id for p in await list_processes(client) if p.running}
            finally:
                await client.aclose()
            assert started[0] in running, "a fork restored from memory lost its parent's processes"
    finally:
        await runtime.discard(snap)
    await runtime.discard(snap)  # idempotent


async def _python_number(runtime: Runtime, instance: Instance, script: str) -> tuple[float, bytes]:
    """Run a python3 script as root in the sandbox; the number it printed last (-1 if none) and its stderr."""
    out, err, _ = await _run(runtime, instance, ExecParams(argv=["python3", "-c", script], user="root"))
    words = out.split()
    return (float(words[-1]) if words else -1.0), err


async def _check_limits(runtime: Runtime, instance: Instance) -> None:
    """The limits of :data:`CHECK_LIMITS` hold inside the sandbox (memory last: it may end the sandbox)."""
    limits = CHECK_LIMITS
    forks = (
        "import os\n"
        "n = 0\n"
        f"for _ in range({limits.pids * 4}):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        break\n"
        "    if pid == 0:\n"
        "        os.execv('/bin/sleep', ['sleep', '30'])\n"
        "    n += 1\n"
        "print(n, flush=True)\n"
        "os.killpg(0, 9)\n"
    )
    started, err = await _python_number(runtime, instance, forks)
    assert 0 <= started < limits.pids, (
        f"{started:g} processes started under a limit of {limits.pids} pids ({err[-200:]!r})"
    )
    # two busy threads for one second of wall time get about `cpus` seconds of CPU, not two
    burn = (
        "import os, threading, time\n"
        "def spin():\n"
        "    end = time.monotonic() + 1.0\n"
        "    while time.monotonic() < end: pass\n"
        "ts = [threading.Thread(target=spin) for _ in range(2)]\n"
        "t0 = os.times(); [t.start() for t in ts]; [t.join() for t in ts]; t1 = os.times()\n"
        "print(t1.user + t1.system - t0.user - t0.system)\n"
    )
    used, _ = await _python_number(runtime, instance, burn)
    assert 0 < used <= limits.cpus * 2.0 + 0.2, (
        f"two busy threads used {used:.2f} s of CPU in 1 s under a limit of {limits.cpus} cpus"
    )
    hog = f"b = bytearray({limits.memory_mb * 2} * 1024 * 1024); print('allocated')"
    try:
        out, _, done = await _run(runtime, instance, ExecParams(argv=["python3", "-c", hog], user="root"))
    except CorralError:
        out, done = b"", None  # the sandbox ended under the allocation (gVisor: an OOM ends the sandbox)
    assert b"allocated" not in out and (done is None or done.exit_code != 0), (
        f"{limits.memory_mb * 2} MiB were allocated under a limit of {limits.memory_mb} MiB"
    )


async def _check_deadline(runtime: Runtime, instance: Instance) -> None:
    """set_deadline moves the hard deadline, and the runtime ends the sandbox at it on its own."""
    await runtime.set_deadline(instance, None)
    await runtime.set_deadline(instance, time.time() + 1.0)
    live = (ObservedState.RUNNING, ObservedState.PAUSED)
    with anyio.fail_after(DEADLINE_WAIT):
        # the runtime's own clock runs out: no event reaches us, so poll its state (bounded)
        while (observed := await runtime.inspect(instance)).state in live:  # noqa: ASYNC110
            await anyio.sleep(0.1)
    assert observed.state is ObservedState.EXITED and observed.reason == "deadline", (
        f"at its deadline the sandbox was {observed.state} ({observed.reason}), not ended by the deadline"
    )
