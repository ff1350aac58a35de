"""``corral files …``: copy files into and out of a sandbox, and list directories."""

from __future__ import annotations

import sys
import time

import click

from corral.cli._output import emit_json, table
from corral.client._sync.sandbox import Sandbox

__all__ = ["files"]


@click.group()
def files() -> None:
    """Move files in and out of a running sandbox."""


@files.command()
@click.argument("sandbox_id")
@click.argument("local", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.argument("remote")
def put(sandbox_id: str, local: str, remote: str) -> None:
    """Copy LOCAL (or - for stdin) to REMOTE inside the sandbox."""
    sbx = Sandbox.connect(sandbox_id)
    try:
        n = sbx.files.write(remote, sys.stdin.buffer) if local == "-" else sbx.files.upload(local, remote)
    finally:
        sbx.close()
    click.echo(f"wrote {n} bytes to {remote}", err=True)


@files.command()
@click.argument("sandbox_id")
@click.argument("remote")
@click.argument("local", type=click.Path(dir_okay=False, writable=True, allow_dash=True), default="-")
def get(sandbox_id: str, remote: str, local: str) -> None:
    """Copy REMOTE from the sandbox to LOCAL (default: stdout)."""
    sbx = Sandbox.connect(sandbox_id)
    try:
        if local == "-":
            for chunk in sbx.files.iter_read(remote):
                sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
        else:
            n = sbx.files.download(remote, local)
            click.echo(f"read {n} bytes into {local}", err=True)
    finally:
        sbx.close()


@files.command()
@click.argument("sandbox_id")
@click.argument("path", default="/home/user")
@click.option("--depth", type=click.IntRange(1, 32), default=1, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def ls(sandbox_id: str, path: str, depth: int, as_json: bool) -> None:
    """List PATH inside the sandbox."""
    sbx = Sandbox.connect(sandbox_id)
    try:
        entries = sbx.files.list(path, depth=depth)
    finally:
        sbx.close()
    if as_json:
        emit_json(entries)
        return
    table(
        ["TYPE", "MODE", "SIZE", "MODIFIED", "PATH"],
        [
            [
                e.type.value,
                oct(e.mode)[2:],
                str(e.size),
                time.strftime("%Y-%m-%d %H:%M", time.localtime(e.mtime)),
                e.path + (f" -> {e.target}" if e.target else ""),
            ]
            for e in entries
        ],
    )
