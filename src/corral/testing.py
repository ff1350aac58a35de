"""Public test kit: the runtime conformance suite and helpers for testing code that uses Corral.

``check_runtime(make_runtime, rootfs=...)`` boots a sandbox on a runtime and checks, through the real agent,
everything every runtime must do the same way: the agent handshake, commands and exit codes, binary-safe
output, files, errors, no network, re-attach after the connection drops, pause/resume where declared, and a
clean, idempotent teardown. The namespace and gVisor runtimes both pass it (tests/runtimes/test_conformance.py).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import anyio

from corral.core import files
from corral.core.agent_client import AgentClient
from corral.core.processes import exec_stream, list_processes, send_signal
from corral.errors import NotFound
from corral.ids import SandboxId
from corral.models import EventKind, ExecParams, ProcessEvent
from corral.protocol import PROTOCOL_VERSION, Event, Op
from corral.runtimes.base import HostLayers, Instance, ObservedState, Runtime, SandboxSpec

__all__ = ["check_runtime", "run_command"]


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
    make_runtime: Callable[[], Runtime], *, rootfs: HostLayers, timeout: float = 120
) -> None:
    """Run the conformance checks; raises AssertionError naming the first property that does not hold."""
    runtime = make_runtime()
    await runtime.check()
    spec = SandboxSpec(sandbox_id=SandboxId.new(), rootfs=rootfs, deadline=time.time() + timeout)
    instance = await runtime.create(spec)
    try:
        observed = await runtime.inspect(instance)
        assert observed.state is ObservedState.RUNNING, f"a new sandbox is {observed.state}, not running"
        client = await AgentClient.open(await runtime.connect(instance), sandbox_id=spec.sandbox_id)
        try:
            await _check_agent(client)
        finally:
            await client.aclose()
        await _check_reconnect(runtime, instance)
        if runtime.capabilities.pause:
            await _check_pause(runtime, instance)
    finally:
        await runtime.destroy(instance)
    observed = await runtime.inspect(instance)
    assert observed.state is ObservedState.MISSING, f"a destroyed sandbox is still {observed.state}"
    await runtime.destroy(instance)  # idempotent: a second destroy is a no-op, not an error


async def _check_agent(client: AgentClient) -> None:
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
