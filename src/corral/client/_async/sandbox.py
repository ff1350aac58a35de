"""The async SDK: ``AsyncSandbox`` with ``.commands`` and ``.files``.

Hand-written; ``client/_sync/sandbox.py`` is generated from it by ``scripts/gen-sync`` (unasync), so this file
uses only ``async``/``await`` constructs that have a direct sync spelling (no anyio calls here).

Return types never depend on a flag: ``commands.run`` returns a result, ``commands.start`` a handle,
``commands.stream`` events; ``files.read`` bytes, ``files.read_text`` str, ``files.iter_read`` chunks.
"""

from __future__ import annotations

import builtins
import os
import signal as _signal
from collections.abc import AsyncIterable, AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from corral.client._async.backend import AsyncBackend, open_default_backend
from corral.client._async.code import AsyncCodeInterpreter
from corral.client._async.pty import AsyncPty
from corral.client._async.watch import AsyncWatchHandle, open_watch
from corral.errors import CommandFailed, InvalidRequest, NotFound, Unsupported
from corral.models import (
    CommandResult,
    CreateParams,
    EntryInfo,
    EventKind,
    ExecParams,
    NetworkPolicy,
    NetworkStatus,
    PortForward,
    ProcessEvent,
    ProcessInfo,
    ResourceSample,
    SandboxInfo,
    SandboxState,
    TemplateInfo,
    check_port,
)

__all__ = ["AsyncCommandHandle", "AsyncCommands", "AsyncFiles", "AsyncSandbox"]

CHUNK = 1024 * 1024
DEFAULT_COMMAND_TIMEOUT = 60.0  # seconds; pass timeout=None for no limit

OutputCallback = Callable[[str], object]


def _exec_params(
    cmd: str | list[str],
    *,
    envs: dict[str, str] | None,
    cwd: str | None,
    user: str | None,
    timeout: float | None,
    stdin: bool,
    background: bool,
    tag: str | None,
) -> ExecParams:
    argv = list(cmd) if isinstance(cmd, list | tuple) else None
    return ExecParams(
        cmd=cmd if isinstance(cmd, str) else None,
        argv=argv,
        env=dict(envs or {}),
        cwd=cwd,
        user=user,
        timeout=timeout,
        stdin=stdin,
        background=background,
        tag=tag,
    )


async def _collect(
    events: AsyncIterator[ProcessEvent], on_stdout: OutputCallback | None, on_stderr: OutputCallback | None
) -> CommandResult:
    out: list[bytes] = []
    err: list[bytes] = []
    process_id = None
    async for event in events:
        if event.kind is EventKind.STARTED:
            process_id = event.process_id
        elif event.kind is EventKind.STDOUT:
            out.append(event.data)
            if on_stdout is not None:
                on_stdout(event.text)
        elif event.kind is EventKind.STDERR:
            err.append(event.data)
            if on_stderr is not None:
                on_stderr(event.text)
        elif event.kind is EventKind.EXIT:
            return CommandResult(
                stdout=b"".join(out).decode(errors="replace"),
                stderr=b"".join(err).decode(errors="replace"),
                exit_code=event.exit_code,
                signal=event.signal,
                timed_out=event.timed_out,
                process_id=process_id,
                oom_killed=event.oom_killed,
            )
    return CommandResult(
        stdout=b"".join(out).decode(errors="replace"),
        stderr=b"".join(err).decode(errors="replace"),
        exit_code=None,
        process_id=process_id,
    )


def _check(result: CommandResult, what: str) -> CommandResult:
    if result.exit_code != 0:
        reason = (
            "timed out"
            if result.timed_out
            else "was killed for memory (the sandbox's memory limit was reached)"
            if result.oom_killed
            else f"was killed by signal {result.signal}"
            if result.signal
            else f"exited with {result.exit_code}"
        )
        raise CommandFailed(
            f"command {what!r} {reason}",
            exit_code=result.exit_code if result.exit_code is not None else -1,
            stdout=result.stdout,
            stderr=result.stderr,
        )
    return result


class AsyncCommandHandle:
    """A process started with ``commands.start``: it runs in the background until it exits or is killed."""

    def __init__(self, backend: AsyncBackend, sandbox_id: str, process_id: str, pid: int | None) -> None:
        self._backend = backend
        self.sandbox_id = sandbox_id
        self.process_id = process_id
        self.pid = pid

    def events(self) -> AsyncIterator[ProcessEvent]:
        """Output kept so far, then live output, ending with the ``exit`` event."""
        return self._backend.attach(self.sandbox_id, self.process_id)

    async def wait(
        self,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        check: bool = False,
    ) -> CommandResult:
        result = await _collect(self.events(), on_stdout, on_stderr)
        return _check(result, self.process_id) if check else result

    async def send_stdin(self, data: bytes | str) -> None:
        await self._backend.send_stdin(
            self.sandbox_id, self.process_id, data.encode() if isinstance(data, str) else data
        )

    async def close_stdin(self) -> None:
        await self._backend.send_stdin(self.sandbox_id, self.process_id, b"", eof=True)

    async def signal(self, signal: int) -> None:
        await self._backend.signal(self.sandbox_id, self.process_id, signal)

    async def kill(self) -> None:
        await self._backend.signal(self.sandbox_id, self.process_id, int(_signal.SIGKILL))


class AsyncCommands:
    def __init__(self, backend: AsyncBackend, sandbox_id: str) -> None:
        self._backend = backend
        self._sandbox_id = sandbox_id

    async def run(
        self,
        cmd: str | list[str],
        *,
        envs: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = DEFAULT_COMMAND_TIMEOUT,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        check: bool = False,
    ) -> CommandResult:
        """Run a command to completion. A string runs through ``/bin/sh -c``; a list is exec'd directly.

        A non-zero exit code is a result (``result.exit_code``), not an error, unless ``check=True``.
        """
        params = _exec_params(
            cmd, envs=envs, cwd=cwd, user=user, timeout=timeout, stdin=False, background=False, tag=None
        )
        result = await _collect(self._backend.exec(self._sandbox_id, params), on_stdout, on_stderr)
        return _check(result, cmd if isinstance(cmd, str) else " ".join(cmd)) if check else result

    def stream(
        self,
        cmd: str | list[str],
        *,
        envs: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = DEFAULT_COMMAND_TIMEOUT,
        stdin: bool = False,
    ) -> AsyncIterator[ProcessEvent]:
        """Run a command and yield its events as they happen: started, stdout/stderr chunks, exit.

        Stopping the iteration early kills the command.
        """
        params = _exec_params(
            cmd, envs=envs, cwd=cwd, user=user, timeout=timeout, stdin=stdin, background=False, tag=None
        )
        return self._backend.exec(self._sandbox_id, params)

    async def start(
        self,
        cmd: str | list[str],
        *,
        envs: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
        stdin: bool = False,
        tag: str | None = None,
    ) -> AsyncCommandHandle:
        """Start a background command and return its handle at once; its output is kept for re-attach."""
        params = _exec_params(
            cmd, envs=envs, cwd=cwd, user=user, timeout=timeout, stdin=stdin, background=True, tag=tag
        )
        handle = None
        async for event in self._backend.exec(self._sandbox_id, params):  # started, then detached
            if event.kind is EventKind.STARTED and event.process_id:
                handle = AsyncCommandHandle(self._backend, self._sandbox_id, event.process_id, event.pid)
        if handle is None:
            raise NotFound("the command did not start")
        return handle

    async def list(self) -> list[ProcessInfo]:
        return await self._backend.list_processes(self._sandbox_id)

    async def connect(self, process_id: str) -> AsyncCommandHandle:
        for proc in await self.list():
            if proc.process_id == process_id:
                return AsyncCommandHandle(self._backend, self._sandbox_id, process_id, proc.pid)
        raise NotFound(f"process {process_id} not found in sandbox {self._sandbox_id}")

    async def kill(self, process_id: str) -> None:
        await self._backend.signal(self._sandbox_id, process_id, int(_signal.SIGKILL))

    async def send_stdin(self, process_id: str, data: bytes | str) -> None:
        await self._backend.send_stdin(
            self._sandbox_id, process_id, data.encode() if isinstance(data, str) else data
        )


async def _bytes_chunks(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), CHUNK):
        yield data[start : start + CHUNK]
    if not data:
        yield b""


async def _file_chunks(stream: IO[bytes]) -> AsyncIterator[bytes]:
    while True:
        chunk = stream.read(CHUNK)
        if not chunk:
            return
        yield chunk


async def _path_chunks(path: Path) -> AsyncIterator[bytes]:
    with open(path, "rb") as stream:  # noqa: ASYNC230 - plain open keeps the unasync twin identical
        async for chunk in _file_chunks(stream):
            yield chunk


class AsyncFiles:
    def __init__(self, backend: AsyncBackend, sandbox_id: str) -> None:
        self._backend = backend
        self._sandbox_id = sandbox_id

    async def read(self, path: str, *, user: str | None = None) -> bytes:
        return b"".join([chunk async for chunk in self._backend.read_file(self._sandbox_id, path, user=user)])

    async def read_text(self, path: str, *, encoding: str = "utf-8", user: str | None = None) -> str:
        return (await self.read(path, user=user)).decode(encoding)

    def iter_read(self, path: str, *, user: str | None = None) -> AsyncIterator[bytes]:
        """The file's content in chunks, for files too large to hold in memory."""
        return self._backend.read_file(self._sandbox_id, path, user=user)

    async def write(
        self, path: str, data: bytes | str | IO[bytes] | AsyncIterable[bytes], *, user: str | None = None
    ) -> int:
        """Write (atomically replace) a file; parent directories are created. Returns the bytes written."""
        if isinstance(data, str):
            chunks: AsyncIterable[bytes] = _bytes_chunks(data.encode())
        elif isinstance(data, bytes | bytearray | memoryview):
            chunks = _bytes_chunks(bytes(data))
        elif hasattr(data, "read"):
            chunks = _file_chunks(data)  # type: ignore[arg-type]
        else:
            chunks = data
        return await self._backend.write_file(self._sandbox_id, path, chunks, user=user)

    async def upload(self, local_path: str | os.PathLike[str], path: str, *, user: str | None = None) -> int:
        return await self._backend.write_file(
            self._sandbox_id, path, _path_chunks(Path(local_path)), user=user
        )

    async def download(
        self, path: str, local_path: str | os.PathLike[str], *, user: str | None = None
    ) -> int:
        total = 0
        with open(local_path, "wb") as out:  # noqa: ASYNC230 - as in _path_chunks
            async for chunk in self._backend.read_file(self._sandbox_id, path, user=user):
                out.write(chunk)
                total += len(chunk)
        return total

    async def list(self, path: str, *, depth: int = 1, user: str | None = None) -> list[EntryInfo]:
        return await self._backend.list_dir(self._sandbox_id, path, depth=depth, user=user)

    async def stat(self, path: str, *, user: str | None = None) -> EntryInfo:
        return await self._backend.stat(self._sandbox_id, path, user=user)

    async def exists(self, path: str, *, user: str | None = None) -> bool:
        try:
            await self._backend.stat(self._sandbox_id, path, user=user)
        except NotFound:
            return False
        return True

    async def make_dir(self, path: str, *, user: str | None = None) -> bool:
        return await self._backend.make_dir(self._sandbox_id, path, user=user)

    async def remove(self, path: str, *, recursive: bool = False, user: str | None = None) -> None:
        await self._backend.remove(self._sandbox_id, path, recursive=recursive, user=user)

    async def rename(self, src: str, dst: str, *, overwrite: bool = False, user: str | None = None) -> None:
        await self._backend.rename(self._sandbox_id, src, dst, overwrite=overwrite, user=user)

    async def watch_dir(
        self, path: str, *, recursive: bool = False, user: str | None = None
    ) -> AsyncWatchHandle:
        """Watch ``path`` for changes; iterate the handle for events, ``stop()`` it when done."""
        return await open_watch(
            self._backend.watch_dir(self._sandbox_id, path, recursive=recursive, user=user)
        )


class AsyncNetwork:
    """The sandbox's egress policy: ``sbx.network.update(allow_out=[...])``, ``sbx.network.status()``."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    @property
    def policy(self) -> NetworkPolicy:
        """The policy as of the last call that returned the sandbox's info."""
        return self._sandbox._info.network_policy

    async def update(
        self,
        network: str | dict[str, Any] | None = None,
        *,
        allow_out: list[str] | None = None,
        deny_out: list[str] | None = None,
    ) -> NetworkPolicy:
        """Replace the policy in place: ``update("internet")``, ``update(allow_out=["github.com"])``.

        Connections the new policy denies are cut. A sandbox created with ``network="none"`` has no network
        to change: create it with a policy (``{"allow_out": []}`` allows nothing yet) to change it later.
        """
        if network is None:
            rules: dict[str, Any] = {}
            if allow_out is not None:
                rules["allow_out"] = list(allow_out)
            if deny_out is not None:
                rules["deny_out"] = list(deny_out)
            network = rules or "none"
        elif allow_out is not None or deny_out is not None:
            raise InvalidRequest("give either a network policy or allow_out/deny_out, not both")
        wire = NetworkPolicy.parse(network).to_wire()  # refused here, with the rule named, before sending
        self._sandbox._info = await self._sandbox._backend.update_network(self._sandbox.sandbox_id, wire)
        return self.policy

    async def status(self) -> NetworkStatus:
        """The policy, open connections and every decision so far (counted, by destination and rule)."""
        return await self._sandbox._backend.network_status(self._sandbox.sandbox_id)


class AsyncSandbox(AsyncCodeInterpreter):
    """A sandbox. ``async with await AsyncSandbox.create() as sbx:`` kills it when the block ends."""

    def __init__(self, info: SandboxInfo, backend: AsyncBackend, *, owns_backend: bool) -> None:
        self._info = info
        self._backend = backend
        self._owns_backend = owns_backend
        self.sandbox_id = info.sandbox_id
        self.commands = AsyncCommands(backend, info.sandbox_id)
        self.files = AsyncFiles(backend, info.sandbox_id)
        self.pty = AsyncPty(backend, info.sandbox_id)
        self.network = AsyncNetwork(self)

    @classmethod
    async def create(
        cls,
        template: str | None = None,
        *,
        isolation: str | None = None,
        timeout: float | None = None,
        metadata: dict[str, str] | None = None,
        envs: dict[str, str] | None = None,
        memory_mb: int | None = None,
        cpus: float | None = None,
        backend: AsyncBackend | None = None,
        files: dict[str, bytes] | None = None,
        public_ports: bool = False,
        network: str | dict[str, Any] | None = None,
        secrets: dict[str, Any] | None = None,
    ) -> AsyncSandbox:
        """Create a sandbox and wait until it is ready.

        ``isolation``: "namespace" (fast, shared kernel), "gvisor" (user-space kernel) or "microvm" (a VM with
        its own kernel). ``timeout``: seconds
        until it is killed (default 300; change it later with ``set_timeout``). ``files``: path -> content,
        written (as the default user) before this returns. ``public_ports``: let anyone with the URL reach
        its ports through the server (``get_url``); by default a request needs ``traffic_token``. Served from
        a warm pool when one matches (only sandboxes without network are).

        ``network``: ``"none"`` (the default: no network at all), ``"internet"`` (public addresses only), or
        ``{"allow_out": [...], "deny_out": [...]}`` with host names (``pypi.org``), wildcards
        (``*.githubusercontent.com``) and CIDRs (``203.0.113.0/24``), each with an optional ``:port``.
        Change it later with ``sbx.network.update(...)``. Never reachable, whatever the policy: the host,
        other sandboxes, private, link-local and metadata addresses.

        ``secrets``: ``{"OPENAI_KEY": "sk-..."}`` (bound to the policy's ``allow_out`` names) or
        ``{"OPENAI_KEY": {"value": "sk-...", "hosts": ["api.openai.com"], "body": False}}``. The sandbox's env
        gets a placeholder; the egress proxy puts the value into HTTPS requests to the bound hosts only (it
        terminates TLS there with a CA of this sandbox, which the sandbox trusts). The info shows names only.
        """
        owns = backend is None
        backend = backend or open_default_backend()
        try:
            info = await backend.create_sandbox(
                CreateParams(
                    template=template,
                    isolation=isolation,
                    timeout=timeout,
                    metadata=dict(metadata or {}),
                    env=dict(envs or {}),
                    memory_mb=memory_mb,
                    cpus=cpus,
                    files=dict(files or {}),
                    public_ports=public_ports,
                    network=network,
                    secrets=dict(secrets or {}),
                )
            )
        except BaseException:
            if owns:
                await backend.aclose()
            raise
        return cls(info, backend, owns_backend=owns)

    @classmethod
    async def connect(cls, sandbox_id: str, *, backend: AsyncBackend | None = None) -> AsyncSandbox:
        """Attach to a running sandbox by id (from this or another process)."""
        owns = backend is None
        backend = backend or open_default_backend()
        try:
            info = await backend.get_sandbox(sandbox_id)
            if info.state is SandboxState.STOPPED:
                raise NotFound(f"sandbox {sandbox_id} is no longer running ({info.stop_reason})")
        except BaseException:
            if owns:
                await backend.aclose()
            raise
        return cls(info, backend, owns_backend=owns)

    @classmethod
    async def list(
        cls,
        *,
        metadata: dict[str, str] | None = None,
        include_stopped: bool = False,
        backend: AsyncBackend | None = None,
    ) -> list[SandboxInfo]:
        owns = backend is None
        backend = backend or open_default_backend()
        try:
            states = frozenset(SandboxState) if include_stopped else None
            return await backend.list_sandboxes(metadata=metadata, states=states)
        finally:
            if owns:
                await backend.aclose()

    async def get_info(self) -> SandboxInfo:
        self._info = await self._backend.get_sandbox(self.sandbox_id)
        return self._info

    async def is_running(self) -> bool:
        return (await self.get_info()).state is SandboxState.RUNNING

    async def get_metrics(
        self, start: float | None = None, end: float | None = None
    ) -> builtins.list[ResourceSample]:
        """CPU, memory and disk use over time (:class:`~corral.ResourceSample`), oldest first, a fresh one
        last while the sandbox runs; ``start``/``end`` (Unix seconds) narrow it. A server samples every
        ``[sandbox] metrics_interval`` seconds; embedded mode samples when asked."""
        return await self._backend.sandbox_metrics(self.sandbox_id, start, end)

    async def set_timeout(self, seconds: float) -> None:
        """Kill the sandbox ``seconds`` from now (replaces the previous deadline)."""
        self._info = await self._backend.set_timeout(self.sandbox_id, seconds)

    async def pause(self) -> None:
        self._info = await self._backend.pause_sandbox(self.sandbox_id)

    async def resume(self) -> None:
        self._info = await self._backend.resume_sandbox(self.sandbox_id)

    async def kill(self) -> None:
        self._info = await self._backend.kill_sandbox(self.sandbox_id)

    async def snapshot(self, name: str, *, description: str = "") -> TemplateInfo:
        """Save this running sandbox as the template ``name`` (it keeps running).

        Its files always; its memory and processes too where its isolation can checkpoint (gVisor): then
        ``create(template=name)`` resumes where the snapshot was taken (``TemplateInfo.memory`` says which).
        """
        return await self._backend.snapshot_sandbox(self.sandbox_id, name, description=description)

    async def fork(self, count: int = 1) -> builtins.list[AsyncSandbox]:
        """``count`` new sandboxes, each an independent copy of this one as it is now (files, and memory
        where its isolation can checkpoint). They share this sandbox's client: close them before it."""
        infos = await self._backend.fork_sandbox(self.sandbox_id, count)
        return [type(self)(info, self._backend, owns_backend=False) for info in infos]

    @property
    def traffic_token(self) -> str | None:
        """The credential for this sandbox's ports through the server, sent as ``Corral-Traffic-Token``;
        None when its ports are public. It opens these ports only, not the API."""
        return None if self._info.public_ports else self._info.traffic_token

    def get_host(self, port: int) -> str:
        """``{port}-{sandbox_id}.{domain}``: the host name the server routes to ``port`` in this sandbox."""
        if self._info.domain is None or self._backend.url is None:
            raise Unsupported(
                "sandbox ports get URLs from a Corral server (set CORRAL_URL); in embedded mode use "
                "forward_port(port) to reach them on this machine"
            )
        return f"{check_port(port)}-{self.sandbox_id}.{self._info.domain}"

    def get_url(self, port: int, path: str = "") -> str:
        """The URL of a server listening on ``port`` inside this sandbox (on 0.0.0.0 or 127.0.0.1 there),
        served by the Corral server's proxy: HTTP, streamed responses and WebSockets. Unless the sandbox was
        created with ``public_ports=True``, send ``traffic_token`` in the ``Corral-Traffic-Token`` header.
        Clients that cannot resolve the wildcard name can send :meth:`port_headers` to the server's own URL.
        """
        host = self.get_host(port)
        scheme = "https" if (self._backend.url or "").startswith("https:") else "http"
        return f"{scheme}://{host}" + (f"/{path.lstrip('/')}" if path else "")

    def port_headers(self, port: int) -> dict[str, str]:
        """Headers that route a request sent to the server's own URL (``CORRAL_URL``) to ``port`` in this
        sandbox, token included: for clients that cannot resolve ``{port}-{sandbox_id}.{domain}``."""
        self.get_host(port)  # the same checks
        headers = {"Corral-Sandbox-Id": self.sandbox_id, "Corral-Sandbox-Port": str(port)}
        if self.traffic_token:
            headers["Corral-Traffic-Token"] = self.traffic_token
        return headers

    def forward_port(
        self, port: int, *, local_port: int = 0, host: str = "127.0.0.1"
    ) -> AbstractAsyncContextManager[PortForward]:
        """Make ``port`` inside the sandbox reachable on this machine while the block runs.

        Used as a context manager, ``sbx.forward_port(8000)`` listens on ``host:local_port`` (``local_port=0``: a
        free one, see ``fwd.local_port`` / ``fwd.url``) and relays each connection to the sandbox's port 8000,
        like ``kubectl port-forward``. The sandbox has no network of its own: this is how to reach a server in
        it. Unpacks as ``(host, local_port)``.
        """
        return self._backend.forward_port(self.sandbox_id, port, host=host, local_port=local_port)

    async def aclose(self) -> None:
        """Release this client's resources. The sandbox keeps running until killed or timed out."""
        if self._owns_backend:
            await self._backend.aclose()

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.kill()
        finally:
            await self.aclose()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.sandbox_id} {self._info.isolation} {self._info.state.value}>"
