"""QMP (the QEMU Machine Protocol) for the ``qemu`` engine, through the QEMU project's ``qemu.qmp`` library.

Blocking calls (its synchronous ``legacy`` client, which runs a private event loop), made from worker threads
or from the small command below, which the shim runs as its ``checkpoint_argv``::

    python -I -m corral.runtimes.microvm.qmp QMP_SOCKET save IMAGE

It stops the VM, migrates its memory and device state to IMAGE, waits for the migration to finish and quits
QEMU: the shim then sees its sandbox command exit, as after ``runsc checkpoint``.
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from corral.errors import RuntimeFailure

__all__ = ["command", "save"]

log = logging.getLogger("corral.runtimes.microvm.qmp")

CONNECT_TIMEOUT = 10.0


def _client(sock: Path, timeout: float) -> QEMUMonitorProtocol:
    client = QEMUMonitorProtocol(str(sock))
    client.connect(negotiate=True)
    client.settimeout(timeout)
    return client


def command(sock: Path, name: str, *, timeout: float = 30.0, **args: Any) -> Any:
    """Run one QMP command and return its result; a QMP error becomes :class:`RuntimeFailure`."""
    try:
        client = _client(sock, min(timeout, CONNECT_TIMEOUT))
    except (OSError, QMPError) as exc:
        log.error("QMP connect to %s failed: %s", sock, exc)
        raise RuntimeFailure("the microVM's monitor does not answer") from exc
    try:
        client.settimeout(timeout)
        return client.cmd(name, **args)
    except (OSError, QMPError) as exc:
        log.error("QMP %s failed: %s", name, exc)
        raise RuntimeFailure(f"the microVM refused {name}") from exc
    finally:
        client.close()


def save(sock: Path, image: Path, *, quit: bool, timeout: float) -> None:
    """``stop`` + ``migrate`` to ``image`` (left stopped, or ended with ``quit``)."""
    try:
        client = _client(sock, CONNECT_TIMEOUT)
    except (OSError, QMPError) as exc:
        raise RuntimeFailure("the microVM's monitor does not answer") from exc
    try:
        client.cmd("stop")
        client.cmd("migrate", uri=f"exec:cat > {shlex.quote(str(image))}")
        deadline = time.monotonic() + timeout
        while True:
            info = client.cmd("query-migrate")
            status = info.get("status") if isinstance(info, dict) else None
            if status == "completed":
                break
            if status in ("failed", "cancelled") or time.monotonic() > deadline:
                log.error("migration of %s ended %s: %s", sock, status, info)
                raise RuntimeFailure("could not save the microVM's memory")
            time.sleep(0.005)  # bounded by the deadline; polled like libvirt does
        if quit:
            client.cmd("quit")
    except (OSError, QMPError) as exc:
        log.error("QMP save to %s failed: %s", image, exc)
        raise RuntimeFailure("could not save the microVM's memory") from exc
    finally:
        client.close()


def _main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] != "save":
        print("usage: python -m corral.runtimes.microvm.qmp QMP_SOCKET save IMAGE", file=sys.stderr)
        return 2
    try:
        save(Path(argv[0]), Path(argv[2]), quit=True, timeout=300.0)
    except RuntimeFailure as exc:
        print(f"corral-qmp: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    sys.exit(_main(sys.argv[1:]))
