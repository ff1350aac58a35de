"""``corral sandbox …``: create, list, inspect, exec in, change the timeout of, and kill sandboxes."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from corral.cli._common import (
    create_options,
    exec_options,
    exec_params_from,
    key_values,
    network_from,
    network_options,
    sandbox_kwargs,
    stream_command,
)
from corral.cli._output import emit_json, progress, table
from corral.client._sync.sandbox import Sandbox
from corral.models import SandboxInfo

__all__ = ["sandbox"]


def _row(info: SandboxInfo) -> list[str]:
    left = f"{max(0, info.expires_at - time.time()):.0f}s" if info.expires_at else "-"
    labels = ",".join(f"{k}={v}" for k, v in sorted(info.metadata.items()))
    return [info.sandbox_id, info.isolation, info.template, info.state.value, left, labels]


@click.group()
def sandbox() -> None:
    """Manage sandboxes that outlive a single command."""


@sandbox.command()
@create_options
@click.option("--json", "as_json", is_flag=True, help="Print the sandbox as JSON.")
def create(as_json: bool, **opts: Any) -> None:
    """Create a sandbox and print its id. It runs until killed or until its timeout."""
    with progress("Starting sandbox…"):
        sbx = Sandbox.create(**sandbox_kwargs(opts))
    try:
        info = sbx.get_info()
    finally:
        sbx.close()
    if as_json:
        emit_json(info)
    else:
        click.echo(info.sandbox_id)


@sandbox.command(name="list")
@click.option("--metadata", "-m", multiple=True, metavar="KEY=VALUE", help="Only sandboxes with this label.")
@click.option("--all", "include_stopped", is_flag=True, help="Include stopped sandboxes.")
@click.option("--json", "as_json", is_flag=True)
def list_(metadata: tuple[str, ...], include_stopped: bool, as_json: bool) -> None:
    """List sandboxes."""
    infos = Sandbox.list(metadata=key_values(metadata, "--metadata"), include_stopped=include_stopped)
    if as_json:
        emit_json(infos)
    else:
        table(["ID", "ISOLATION", "TEMPLATE", "STATE", "EXPIRES IN", "METADATA"], [_row(i) for i in infos])


@sandbox.command()
@click.argument("sandbox_id")
@click.option("--json", "as_json", is_flag=True)
def info(sandbox_id: str, as_json: bool) -> None:
    """Show one sandbox."""
    sbx = Sandbox.connect(sandbox_id)
    try:
        details = sbx.get_info()
    finally:
        sbx.close()
    if as_json:
        emit_json(details)
    else:
        table(["ID", "ISOLATION", "TEMPLATE", "STATE", "EXPIRES IN", "METADATA"], [_row(details)])


@sandbox.command(name="exec", context_settings={"ignore_unknown_options": True})
@click.argument("sandbox_id")
@exec_options
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(sandbox_id: str, command: tuple[str, ...], **opts: Any) -> None:
    """Run COMMAND in a running sandbox and stream its output. Exits with the command's exit code."""
    params = exec_params_from(command, opts)
    sbx = Sandbox.connect(sandbox_id)
    try:
        code = stream_command(sbx, params)
    finally:
        sbx.close()
    sys.exit(code)


def _with_network_options(fn: Any) -> Any:
    for decorator in reversed(network_options()):
        fn = decorator(fn)
    return fn


@sandbox.command()
@click.argument("sandbox_id")
@_with_network_options
@click.option("--json", "as_json", is_flag=True)
def network(sandbox_id: str, as_json: bool, **opts: Any) -> None:
    """Show the sandbox's egress policy and decisions, or replace the policy (--network/--allow-out/--deny-out).

    Connections the new policy denies are cut. Example: corral sandbox network SBX --allow-out pypi.org
    --allow-out files.pythonhosted.org
    """
    policy = network_from(opts)
    sbx = Sandbox.connect(sandbox_id)
    try:
        if policy is not None:
            sbx.network.update(policy)
        status = sbx.network.status()
    finally:
        sbx.close()
    if as_json:
        emit_json(status)
        return
    click.echo(f"policy: {json.dumps(status.network)}   open connections: {status.connections}")
    rows = [
        [d["kind"], "allowed" if d["allowed"] else "DENIED", d.get("name") or d["dest"], str(d["port"]),
         d["rule"], str(d["count"])]
        for d in status.decisions
    ]  # fmt: skip
    table(["KIND", "VERDICT", "DESTINATION", "PORT", "RULE", "COUNT"], rows)


@sandbox.command(name="set-timeout")
@click.argument("sandbox_id")
@click.argument("seconds", type=float)
def set_timeout(sandbox_id: str, seconds: float) -> None:
    """Kill the sandbox SECONDS from now."""
    sbx = Sandbox.connect(sandbox_id)
    try:
        sbx.set_timeout(seconds)
    finally:
        sbx.close()


@sandbox.command()
@click.argument("sandbox_ids", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True)
def kill(sandbox_ids: tuple[str, ...], as_json: bool) -> None:
    """Kill sandboxes (their processes, files and limits are removed)."""
    killed = []
    for sandbox_id in sandbox_ids:
        sbx = Sandbox.connect(sandbox_id)
        try:
            sbx.kill()
            killed.append(sbx.get_info())
        finally:
            sbx.close()
    if as_json:
        emit_json(killed)
    else:
        for item in killed:
            click.echo(f"killed {item.sandbox_id}")


@sandbox.command()
@click.argument("sandbox_id")
def pause(sandbox_id: str) -> None:
    """Pause a sandbox: no CPU, its timeout stops counting (gVisor also writes its memory to disk)."""
    sbx = Sandbox.connect(sandbox_id)
    try:
        with progress("Pausing…"):
            sbx.pause()
    finally:
        sbx.close()
    click.echo(f"paused {sandbox_id}")


@sandbox.command()
@click.argument("sandbox_id")
def resume(sandbox_id: str) -> None:
    """Resume a paused sandbox where it stopped, with the time it had left."""
    sbx = Sandbox.connect(sandbox_id)
    try:
        with progress("Resuming…"):
            sbx.resume()
    finally:
        sbx.close()
    click.echo(f"resumed {sandbox_id}")


@sandbox.command()
@click.argument("sandbox_id")
@click.argument("name")
@click.option("--description", default="", help="Shown by 'corral template list'.")
@click.option("--json", "as_json", is_flag=True)
def snapshot(sandbox_id: str, name: str, description: str, as_json: bool) -> None:
    """Save a running sandbox as the template NAME (files; memory too under gVisor)."""
    sbx = Sandbox.connect(sandbox_id)
    try:
        with progress("Taking snapshot…"):
            made = sbx.snapshot(name, description=description)
    finally:
        sbx.close()
    if as_json:
        emit_json(made)
    else:
        click.echo(f"template {made.name} ({'files and memory' if made.memory else 'files only'})")


@sandbox.command()
@click.argument("sandbox_id")
@click.option("--count", "-n", type=int, default=1, show_default=True, help="How many copies.")
@click.option("--json", "as_json", is_flag=True)
def fork(sandbox_id: str, count: int, as_json: bool) -> None:
    """Make COUNT independent copies of a running sandbox; prints their ids."""
    sbx = Sandbox.connect(sandbox_id)
    try:
        with progress("Forking…"):
            forks = sbx.fork(count)
        infos = [f.get_info() for f in forks]
    finally:
        sbx.close()
    if as_json:
        emit_json(infos)
    else:
        for item in infos:
            click.echo(item.sandbox_id)
