"""``corral sandbox shell ID`` (an interactive terminal) and ``corral files watch ID PATH``.

The shell puts the local terminal in raw mode, so every key (Ctrl-C included) goes to the sandbox's terminal,
copies the sandbox terminal's output to stdout as raw bytes, and forwards the local size on SIGWINCH. It exits
with the shell's own status. The local terminal is restored however it ends (the shell exits, the sandbox
dies, SIGTERM/SIGHUP, an error); if the CLI ends before the shell did, the remote terminal is killed.

Both run the async SDK under ``anyio.run``: one event loop multiplexes keyboard, output and signals, and
Ctrl-C on a watch cancels it cleanly (the watch is cancelled in the sandbox before the CLI exits).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import termios
import tty
from typing import Any

import anyio
import click

from corral.client._async.pty import AsyncPtyHandle
from corral.client._async.sandbox import AsyncSandbox
from corral.models import EventKind, FilesystemEventType

__all__ = ["shell", "watch"]

INPUT_CHUNK = 4096


@click.command()
@click.argument("sandbox_id")
@click.option(
    "--user", type=click.Choice(["user", "root"]), default=None, help="Run as 'user' (default) or root."
)
@click.option("--cwd", default=None, help="Working directory inside the sandbox.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def shell(sandbox_id: str, user: str | None, cwd: str | None, command: tuple[str, ...]) -> None:
    """Open an interactive terminal in a sandbox (a login shell, or COMMAND after --)."""
    fd = sys.stdin.fileno()
    if not os.isatty(fd) or not os.isatty(sys.stdout.fileno()):
        raise click.UsageError(
            "corral sandbox shell needs a terminal on stdin and stdout; "
            "to run a command from a script use: corral sandbox exec ID -- COMMAND"
        )
    saved = termios.tcgetattr(fd)
    try:
        code = anyio.run(_shell, sandbox_id, list(command) or None, user, cwd, fd)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
    sys.exit(code)


async def _shell(sandbox_id: str, argv: list[str] | None, user: str | None, cwd: str | None, fd: int) -> int:
    sbx = await AsyncSandbox.connect(sandbox_id)
    try:
        cols, rows = os.get_terminal_size(fd)
        term = await sbx.pty.create(cols=cols, rows=rows, cmd=argv, user=user, cwd=cwd)
        ended: list[int] = []  # the shell's status, or 128 + a signal that ended us
        exited: list[int] = []  # the shell's status, once it exited by itself
        try:
            tty.setraw(fd)
            async with anyio.create_task_group() as tg:
                tg.start_soon(_keyboard, term, fd)
                tg.start_soon(_signals, term, fd, tg.cancel_scope, ended)
                await _screen(term, exited)
                tg.cancel_scope.cancel()
        finally:
            if not exited:  # we are leaving first: nobody would see that terminal again
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await term.kill()
        return exited[0] if exited else ended[0] if ended else 1
    finally:
        await sbx.aclose()


async def _screen(term: AsyncPtyHandle, ended: list[int]) -> None:
    out = sys.stdout.fileno()
    async for event in term.events():
        if event.kind is EventKind.PTY:
            view = memoryview(event.data)
            while view:
                await anyio.wait_writable(out)
                view = view[os.write(out, view) :]
        elif event.kind is EventKind.EXIT:
            ended.append(event.exit_code if event.exit_code is not None else 128 + (event.signal or 0))
            return


async def _keyboard(term: AsyncPtyHandle, fd: int) -> None:
    while True:
        await anyio.wait_readable(fd)
        data = os.read(fd, INPUT_CHUNK)
        if not data:  # the local terminal went away
            return
        await term.send_input(data)


async def _signals(term: AsyncPtyHandle, fd: int, scope: anyio.CancelScope, ended: list[int]) -> None:
    with anyio.open_signal_receiver(signal.SIGWINCH, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGWINCH:
                cols, rows = os.get_terminal_size(fd)
                await term.resize(cols, rows)
            else:
                ended.append(128 + signum)
                scope.cancel()
                return


@click.command(name="watch")
@click.argument("sandbox_id")
@click.argument("path")
@click.option("--recursive", "-r", is_flag=True, help="Also watch every directory below PATH.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event.")
def watch(sandbox_id: str, path: str, recursive: bool, as_json: bool) -> None:
    """Print changes under PATH inside the sandbox as they happen, until Ctrl-C."""
    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(_watch, sandbox_id, path, recursive, as_json)


async def _watch(sandbox_id: str, path: str, recursive: bool, as_json: bool) -> None:
    sbx = await AsyncSandbox.connect(sandbox_id)
    try:
        async with await sbx.files.watch_dir(path, recursive=recursive) as events:
            click.echo(f"watching {path}", err=True)
            async for event in events:
                if as_json:
                    line: Any = json.dumps({"type": event.type.value, "name": event.name})
                elif event.type is FilesystemEventType.OVERFLOW:
                    line = "overflow (events were lost; rescan)"
                else:
                    line = f"{event.type.value:<7} {event.name}"
                click.echo(line)
    finally:
        await sbx.aclose()
