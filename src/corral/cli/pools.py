"""``corral pool …``: keep warm pools of booted sandboxes per (template, isolation).

``set`` records the target and, unless ``--no-fill``, boots the missing members before returning, with a
progress bar on stderr: embedded mode has no background task to do it later (a server does). A claim leaves
the pool one short until the next fill or server pass.
"""

from __future__ import annotations

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from corral.cli._output import emit_json, err_console, table
from corral.client._sync.pools import Pools
from corral.models import PoolInfo

__all__ = ["pool"]


@click.group()
def pool() -> None:
    """Keep booted sandboxes ready, so creating one skips the boot."""


def _describe(info: PoolInfo) -> str:
    return f"{info.template}/{info.isolation}: {info.ready}/{info.target} ready" + (
        f", {info.starting} starting elsewhere" if info.starting else ""
    )


@pool.command(name="set")
@click.argument("template")
@click.option("--size", type=click.IntRange(min=0), required=True, help="Sandboxes to keep ready.")
@click.option("--isolation", help="namespace or gvisor (default: CORRAL_ISOLATION, else gvisor).")
@click.option("--memory-mb", type=int, help="Memory limit of each member (creates must ask for the same).")
@click.option("--cpus", type=float, help="CPU limit of each member (creates must ask for the same).")
@click.option("--no-fill", is_flag=True, help="Only record the size; let a server's pass boot the members.")
@click.option("--json", "as_json", is_flag=True)
def set_(
    template: str,
    size: int,
    isolation: str | None,
    memory_mb: int | None,
    cpus: float | None,
    no_fill: bool,
    as_json: bool,
) -> None:
    """Keep SIZE sandboxes of TEMPLATE ready, and boot them now.

    Example: corral pool set base --size 4 --isolation namespace
    """
    with Pools() as pools:
        info = pools.set(template, size, isolation=isolation, memory_mb=memory_mb, cpus=cpus)
        if not no_fill:
            info = _fill(pools, info)
    if as_json:
        emit_json(info)
    else:
        click.echo(_describe(info))


def _fill(pools: Pools, info: PoolInfo) -> PoolInfo:
    columns = (
        TextColumn(f"Filling pool {info.template}/{info.isolation}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err_console, transient=False, disable=not err_console.is_terminal) as bar:
        task = bar.add_task("fill", total=info.target, completed=min(info.ready, info.target))
        for latest in pools.fill(info.template, isolation=info.isolation):
            bar.update(task, total=latest.target, completed=min(latest.ready, latest.target))
            info = latest
    return info


@pool.command(name="list")
@click.option("--json", "as_json", is_flag=True)
def list_(as_json: bool) -> None:
    """Pools with their target and how many members are ready and starting."""
    with Pools() as pools:
        found = pools.list()
    if as_json:
        emit_json(found)
    else:
        table(
            ["TEMPLATE", "ISOLATION", "TARGET", "READY", "STARTING"],
            [[p.template, p.isolation, str(p.target), str(p.ready), str(p.starting)] for p in found],
        )


@pool.command()
@click.argument("template")
@click.option("--isolation", help="namespace or gvisor (default: CORRAL_ISOLATION, else gvisor).")
@click.option("--json", "as_json", is_flag=True)
def delete(template: str, isolation: str | None, as_json: bool) -> None:
    """Forget TEMPLATE's pool and kill its unclaimed members (claimed sandboxes keep running)."""
    with Pools() as pools:
        pools.delete(template, isolation=isolation)
    if as_json:
        emit_json({"deleted": {"template": template, "isolation": isolation}})
