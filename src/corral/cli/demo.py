"""``corral demo``: the README's main job. For each isolation level it creates a sandbox, runs code in it,
moves a file in and out, probes the boundary (processes, network, host files), and prints what it saw.

Every line printed is a measured or observed value; the demo exits non-zero if any check fails.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from corral.client._sync.sandbox import Sandbox
from corral.errors import CorralError

__all__ = ["run_demo"]

PROBE = r"""
import os, socket
print("pid-namespace processes:", len([p for p in os.listdir('/proc') if p.isdigit()]))
try:
    socket.create_connection(('1.1.1.1', 53), timeout=2); print('network: REACHABLE')
except OSError as e:
    print('network: unreachable (%s)' % e.strerror)
try:
    open('/etc/shadow').read(); print('/etc/shadow as user: READABLE')
except OSError as e:
    print('/etc/shadow as user: %s' % (e.strerror or e))
try:
    open('/proc/1/root/etc/hostname').read(); print("pid 1's root: host files READABLE")
except OSError as e:
    print("pid 1's root: %s" % (e.strerror or e))
"""


def _demo_one(console: Console, isolation: str) -> bool:
    console.rule(f"[bold]{isolation}[/bold]")
    start = time.monotonic()
    try:
        sbx = Sandbox.create(isolation=isolation, metadata={"purpose": "demo"})
    except CorralError as exc:
        console.print(f"[red]could not create a {isolation} sandbox:[/red] {exc.message}")
        return False
    created = time.monotonic() - start
    ok = True
    with sbx:
        rows: list[tuple[str, str]] = [
            ("sandbox", sbx.sandbox_id),
            ("create → ready", f"{created * 1000:.0f} ms (the first run builds caches)"),
        ]
        t0 = time.monotonic()
        result = sbx.commands.run("python3 -c 'print(6*7)'")
        rows.append(
            (
                "python3 -c 'print(6*7)'",
                f"{result.stdout.strip()!r} exit={result.exit_code} "
                f"({(time.monotonic() - t0) * 1000:.0f} ms)",
            )
        )
        ok &= result.stdout == "42\n" and result.exit_code == 0
        sbx.files.write("/tmp/data.csv", b"a,b\n1,2\n")
        back = sbx.files.read("/tmp/data.csv")
        rows.append(
            ("files.write + files.read", "round trip ok" if back == b"a,b\n1,2\n" else f"MISMATCH {back!r}")
        )
        ok &= back == b"a,b\n1,2\n"
        who = sbx.commands.run("id -u; uname -r; hostname")
        uid, kernel, host = [*who.stdout.split(), "?", "?", "?"][:3]
        rows.append(("uid / kernel / hostname", f"{uid} / {kernel} / {host}"))
        probe = sbx.commands.run(["python3", "-c", PROBE])
        for line in probe.stdout.splitlines():
            key, _, value = line.partition(": ")
            rows.append((key, value))
        ok &= "REACHABLE" not in probe.stdout and "READABLE" not in probe.stdout
    table = Table(box=None, show_header=False)
    for key, value in rows:
        table.add_row(f"[cyan]{key}[/cyan]", value)
    console.print(table)
    console.print("[green]✓ all checks passed[/green]" if ok else "[red]✗ a check failed[/red]")
    return ok


def run_demo(isolations: list[str]) -> int:
    console = Console(highlight=False)
    console.print(f"[bold]Corral demo[/bold]: {', '.join(isolations)}")
    results = [_demo_one(console, iso) for iso in isolations]
    return 0 if all(results) else 1
