"""``corral sandbox forward``: reach a server inside a sandbox from this machine (like kubectl port-forward)."""

from __future__ import annotations

import signal
import threading

import click

from corral.cli._output import err_console
from corral.client._sync.sandbox import Sandbox

__all__ = ["forward"]

CHECK_EVERY = 2.0  # seconds between checks that the sandbox still runs (the forward ends with it)


@click.command()
@click.argument("sandbox_id")
@click.argument("port", type=click.IntRange(1, 65535))
@click.option(
    "--local-port",
    type=click.IntRange(0, 65535),
    default=0,
    help="Port to listen on here (default: any free).",
)
@click.option("--address", default="127.0.0.1", show_default=True, help="Address to listen on here.")
def forward(sandbox_id: str, port: int, local_port: int, address: str) -> None:
    """Listen on ADDRESS:LOCAL_PORT and relay each connection to PORT inside the sandbox.

    Runs until Ctrl-C, SIGTERM, or the sandbox stops. Example: corral sandbox forward sb-… 8000 --local-port 8080
    """
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    sbx = Sandbox.connect(sandbox_id)
    try:
        with sbx.forward_port(port, local_port=local_port, host=address) as fwd:
            click.echo(f"Forwarding from {fwd.host}:{fwd.local_port} -> {sandbox_id} port {port}", err=False)
            while not stop.wait(CHECK_EVERY):
                if not sbx.is_running():
                    err_console.print(f"sandbox {sandbox_id} is no longer running; stopping the forward")
                    raise SystemExit(1)
    finally:
        sbx.close()
        signal.signal(signal.SIGTERM, previous)
