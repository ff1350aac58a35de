"""The tools of Corral's MCP server, over the SDK only (never the core): what works here works remotely too.

:class:`Session` owns what the server holds between tool calls: one SDK backend (embedded, or a Corral server
when ``CORRAL_URL`` is set), the sandboxes this server created, and the port forwards it opened. Leaving its
``async with`` block (the MCP server stopping: stdin closed, Ctrl-C) closes the forwards and kills the
sandboxes it created, so an agent that forgets to clean up leaks nothing beyond the server's own lifetime.

Tool errors: a :class:`~corral.errors.CorralError` becomes an MCP tool error (``isError``) carrying the Corral
message, which is written for a person (or a model) to act on. Anything else is the SDK's "unexpected" path:
the model sees the tool's name only, the traceback goes to the server's log, never to the client.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import TracebackType
from typing import Annotated, Any, Literal, Self

import anyio
from anyio.abc import TaskGroup, TaskStatus
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from corral.client._async.backend import AsyncBackend, open_default_backend
from corral.client._async.sandbox import AsyncSandbox
from corral.errors import CorralError, InvalidRequest
from corral.models import EntryInfo, PortForward, SandboxInfo

__all__ = ["Session", "build_server"]

MAX_READ_BYTES = 1024 * 1024  # a file read returned to a model; larger files should be read in parts
MAX_OUTPUT_CHARS = 100_000  # per stream of a command's output returned to a model

INSTRUCTIONS = """\
Corral runs code in isolated sandboxes on this machine. Create a sandbox (create_sandbox), run commands in it
(run_command), move files in and out (write_file, read_file, list_files), reach a server running inside it
(get_port_url), and kill it when done (kill_sandbox). Sandboxes have no network access. Each sandbox is killed
at its timeout, and every sandbox this server created is killed when the server stops."""


class Session:
    """The state of one running MCP server: its backend, its sandboxes, its port forwards.

    Each port forward is a task of the session's task group (a forward's listener must be closed by the task
    that opened it), stopped through its cancel scope by ``kill_sandbox`` or when the session ends.
    """

    def __init__(self, backend: AsyncBackend) -> None:
        self.backend = backend
        self.created: set[str] = set()
        self.forwards: dict[tuple[str, int], tuple[PortForward, anyio.CancelScope]] = {}
        self._tg: TaskGroup | None = None

    @classmethod
    def open(cls) -> Session:
        return cls(open_default_backend())

    async def __aenter__(self) -> Self:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            for sandbox_id in {k[0] for k in self.forwards}:
                self.close_forwards(sandbox_id)
            assert self._tg is not None
            await self._tg.__aexit__(None, None, None)  # exited in the task (and scope) that entered it
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    for sandbox_id in list(self.created):
                        with contextlib.suppress(CorralError):
                            await self.backend.kill_sandbox(sandbox_id)
                    self.created.clear()
                finally:
                    await self.backend.aclose()

    async def sandbox(self, sandbox_id: str) -> AsyncSandbox:
        return await AsyncSandbox.connect(sandbox_id, backend=self.backend)

    async def forward(self, sandbox_id: str, port: int) -> PortForward:
        existing = self.forwards.get((sandbox_id, port))
        if existing is not None:
            return existing[0]
        assert self._tg is not None, "use the session in an async with block"
        fwd: PortForward = await self._tg.start(self._run_forward, sandbox_id, port)
        return fwd

    async def _run_forward(
        self, sandbox_id: str, port: int, *, task_status: TaskStatus[PortForward] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        with anyio.CancelScope() as scope:
            try:
                async with self.backend.forward_port(sandbox_id, port) as fwd:
                    self.forwards[(sandbox_id, port)] = (fwd, scope)
                    task_status.started(fwd)
                    await anyio.sleep_forever()
            finally:
                self.forwards.pop((sandbox_id, port), None)

    def close_forwards(self, sandbox_id: str) -> None:
        for key in [k for k in self.forwards if k[0] == sandbox_id]:
            self.forwards.pop(key)[1].cancel()


@contextlib.contextmanager
def _tool_errors() -> Iterator[None]:
    """Corral's own errors reach the model as tool errors with their message, and without a traceback."""
    try:
        yield
    except CorralError as exc:
        raise ToolError(exc.message) from None


def _info(info: SandboxInfo) -> dict[str, Any]:
    return {
        "sandbox_id": info.sandbox_id,
        "state": info.state.value,
        "isolation": info.isolation,
        "template": info.template,
        "expires_at": info.expires_at,
        "metadata": info.metadata,
    }


def _entry(entry: EntryInfo) -> dict[str, Any]:
    return {"path": entry.path, "type": entry.type.value, "size": entry.size}


def _clip(text: str) -> str:
    if len(text) <= MAX_OUTPUT_CHARS:
        return text
    return text[:MAX_OUTPUT_CHARS] + f"\n[… {len(text) - MAX_OUTPUT_CHARS} more characters not shown]"


SandboxIdArg = Annotated[str, Field(description="The sandbox id returned by create_sandbox (sb-…).")]
PathArg = Annotated[str, Field(description="Absolute path inside the sandbox, e.g. /home/user/main.py.")]


def build_server(session: Session, *, name: str = "corral") -> MCPServer:
    """An MCP server whose tools act through ``session``'s SDK backend."""
    server: MCPServer = MCPServer(name, instructions=INSTRUCTIONS, log_level="WARNING")

    @server.tool()
    async def create_sandbox(
        template: Annotated[
            str | None, Field(description="Template (root file system) to start from; default 'base'.")
        ] = None,
        isolation: Annotated[
            Literal["namespace", "gvisor", "microvm"] | None,
            Field(
                description="'gvisor' (a user-space kernel: the stronger boundary, the default), "
                "'namespace' (Linux namespaces: faster, shares the host kernel) or 'microvm' (a virtual "
                "machine with its own kernel: the strongest boundary, slow to boot without KVM)."
            ),
        ] = None,
        timeout: Annotated[
            float, Field(description="Seconds until the sandbox is killed automatically.", gt=0, le=86400)
        ] = 300,
    ) -> dict[str, Any]:
        """Create a new isolated sandbox (no network access) and return its id and details.

        The sandbox runs until kill_sandbox, until its timeout, or until this MCP server stops.
        """
        with _tool_errors():
            sbx = await AsyncSandbox.create(
                template, isolation=isolation, timeout=timeout, backend=session.backend
            )
            session.created.add(sbx.sandbox_id)
            return _info(await sbx.get_info())

    @server.tool()
    async def run_command(
        sandbox_id: SandboxIdArg,
        command: Annotated[str, Field(description="Shell command, run with /bin/sh -c.")],
        cwd: Annotated[str | None, Field(description="Working directory; default the user's home.")] = None,
        envs: Annotated[
            dict[str, str] | None, Field(description="Extra environment variables for the command.")
        ] = None,
        timeout: Annotated[
            float, Field(description="Seconds after which the command is killed.", gt=0, le=3600)
        ] = 60,
        user: Annotated[
            Literal["user", "root"], Field(description="Run as the unprivileged 'user' or as 'root'.")
        ] = "user",
    ) -> dict[str, Any]:
        """Run a shell command in a sandbox and wait for it; returns stdout, stderr and the exit code.

        A non-zero exit code is a result, not an error.
        """
        with _tool_errors():
            sbx = await session.sandbox(sandbox_id)
            result = await sbx.commands.run(command, cwd=cwd, envs=envs, timeout=timeout, user=user)
            return {
                "stdout": _clip(result.stdout),
                "stderr": _clip(result.stderr),
                "exit_code": result.exit_code,
                "timed_out": result.timed_out,
            }

    @server.tool()
    async def run_code(
        sandbox_id: SandboxIdArg,
        code: Annotated[str, Field(description="The cell to run; state persists between calls.")],
        language: Annotated[
            Literal["python", "javascript", "bash"], Field(description="Interpreter to run it in.")
        ] = "python",
        timeout: Annotated[
            float, Field(description="Seconds before the cell is interrupted.", gt=0, le=3600)
        ] = 60,
    ) -> dict[str, Any]:
        """Run code in a stateful interpreter in the sandbox (variables persist between calls).

        Python needs a sandbox made from the code-interpreter template; returns the value of the last
        expression, printed output, rich results (their formats; images are not inlined) and any error.
        """
        with _tool_errors():
            sbx = await session.sandbox(sandbox_id)
            execution = await sbx.run_code(code, language=language, timeout=timeout)
            return {
                "text": execution.text,
                "stdout": _clip("".join(execution.logs.stdout)),
                "stderr": _clip("".join(execution.logs.stderr)),
                "results": [{"formats": r.formats(), "text": _clip(r.text or "")} for r in execution.results],
                "error": None
                if execution.error is None
                else {
                    "name": execution.error.name,
                    "value": execution.error.value,
                    "traceback": _clip(execution.error.traceback),
                },
                "timed_out": execution.timed_out,
            }

    @server.tool()
    async def read_file(sandbox_id: SandboxIdArg, path: PathArg) -> str:
        """Read a text file from a sandbox (up to 1 MiB; invalid UTF-8 is replaced)."""
        with _tool_errors():
            sbx = await session.sandbox(sandbox_id)
            entry = await sbx.files.stat(path)
            if entry.size > MAX_READ_BYTES:
                raise InvalidRequest(
                    f"{path} is {entry.size} bytes; read_file returns at most {MAX_READ_BYTES}. "
                    "Use run_command (head, tail, grep) to look at parts of it."
                )
            return (await sbx.files.read(path)).decode(errors="replace")

    @server.tool()
    async def write_file(
        sandbox_id: SandboxIdArg,
        path: PathArg,
        content: Annotated[str, Field(description="The file's new content (UTF-8 text).")],
    ) -> dict[str, Any]:
        """Write a text file in a sandbox (replacing it; parent directories are created)."""
        with _tool_errors():
            sbx = await session.sandbox(sandbox_id)
            return {"path": path, "bytes_written": await sbx.files.write(path, content)}

    @server.tool()
    async def list_files(
        sandbox_id: SandboxIdArg,
        path: PathArg,
        depth: Annotated[
            int, Field(description="How many levels to descend (1: direct children).", ge=1, le=8)
        ] = 1,
    ) -> list[dict[str, Any]]:
        """List a directory in a sandbox: each entry's path, type (file, dir, symlink, other) and size."""
        with _tool_errors():
            sbx = await session.sandbox(sandbox_id)
            return [_entry(e) for e in await sbx.files.list(path, depth=depth)]

    @server.tool()
    async def get_port_url(
        sandbox_id: SandboxIdArg,
        port: Annotated[
            int, Field(description="TCP port a server listens on inside the sandbox.", ge=1, le=65535)
        ],
    ) -> dict[str, Any]:
        """Make a server running inside a sandbox reachable; returns its URL (and headers to send with it).

        Start the server first (e.g. run_command with 'nohup python3 -m http.server 8000 >/dev/null 2>&1 &').
        Through a Corral server the URL is its port proxy's, valid while the sandbox runs; send the returned
        headers (the sandbox's traffic token) with each request. Otherwise it is a forward on this machine,
        open until the sandbox is killed or this MCP server stops.
        """
        with _tool_errors():
            sbx = await session.sandbox(sandbox_id)  # a missing or stopped sandbox is reported here
            if session.backend.url is not None:
                token = sbx.traffic_token
                headers = {"Corral-Traffic-Token": token} if token else {}
                return {
                    "url": sbx.get_url(port),
                    "host": sbx.get_host(port),
                    "port": port,
                    "headers": headers,
                }
            fwd = await session.forward(sandbox_id, port)
            return {"url": fwd.url, "host": fwd.host, "local_port": fwd.local_port, "port": port}

    @server.tool()
    async def kill_sandbox(sandbox_id: SandboxIdArg) -> dict[str, Any]:
        """Kill a sandbox: its processes and files are gone for good."""
        with _tool_errors():
            session.close_forwards(sandbox_id)
            info = await session.backend.kill_sandbox(sandbox_id)
            session.created.discard(sandbox_id)
            return _info(info)

    @server.tool()
    async def list_sandboxes() -> list[dict[str, Any]]:
        """List the running and paused sandboxes."""
        with _tool_errors():
            return [_info(i) for i in await session.backend.list_sandboxes()]

    return server
