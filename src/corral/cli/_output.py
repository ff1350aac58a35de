"""Output helpers shared by the CLI commands: JSON or human tables, streamed process output, progress."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Iterator
from enum import Enum
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from corral.models import EventKind, ProcessEvent

__all__ = ["emit_json", "err_console", "exit_status", "progress", "stream_events", "table"]

err_console = Console(stderr=True, highlight=False)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value


def emit_json(value: Any) -> None:
    click.echo(json.dumps(_plain(value), indent=2, sort_keys=True))


def table(columns: list[str], rows: list[list[str]]) -> None:
    out = Table(*columns, box=None, pad_edge=False, header_style="bold")
    for row in rows:
        out.add_row(*row)
    Console(highlight=False).print(out)


@contextlib.contextmanager
def progress(message: str) -> Iterator[None]:
    """A spinner on stderr while something slow happens (only on a terminal), then how long it took."""
    if not err_console.is_terminal:
        yield
        return
    start = time.monotonic()
    with err_console.status(message, spinner="dots"):
        yield
    err_console.print(f"[dim]{message.rstrip('.…')} — done in {time.monotonic() - start:.2f}s[/dim]")


def stream_events(events: Iterator[ProcessEvent]) -> ProcessEvent | None:
    """Copy a process's output to our stdout/stderr as it arrives; return its exit event."""
    for event in events:
        if event.kind is EventKind.STDOUT:
            sys.stdout.buffer.write(event.data)
            sys.stdout.buffer.flush()
        elif event.kind is EventKind.STDERR:
            sys.stderr.buffer.write(event.data)
            sys.stderr.buffer.flush()
        elif event.kind is EventKind.EXIT:
            return event
    return None


def exit_status(event: ProcessEvent | None) -> int:
    """Shell convention: the exit code, or 128 + signal number; 124 for a timeout (as timeout(1) does)."""
    if event is None:
        return 1
    if event.timed_out:
        return 124
    if event.exit_code is not None:
        return event.exit_code
    return 128 + (event.signal or 0)
