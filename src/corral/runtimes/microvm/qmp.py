"""QMP (the QEMU Machine Protocol) for the ``qemu`` engine, through the QEMU project's ``qemu.qmp`` library.

Blocking calls (its synchronous ``legacy`` client, which runs a private event loop), made from worker threads
or from the small command below, which the shim runs as its ``checkpoint_argv``::

    python -I -m corral.runtimes.microvm.qmp QMP_SOCKET save IMAGE

It stops the VM, migrates its memory and device state to IMAGE (created here, passed to QEMU as a
descriptor), waits for the migration to finish and quits QEMU: the shim then sees its sandbox command exit,
as after ``runsc checkpoint``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from corral.errors import RuntimeFailure

__all__ = ["command", "save"]

log = logging.getLogger("corral.runtimes.microvm.qmp")

MIGRATION_FD = "corral-migration"  # the name QEMU knows the image's descriptor by
COMMAND_TIMEOUT = 60.0  # one QMP command (``stop`` waits for every vCPU to leave TCG: slow on a loaded host)
_FAILURES = (OSError, EOFError, QMPError)  # EOFError: the VMM hung up (qemu.qmp raises it from close too)


class _Session:
    """One QMP connection, closed on leaving. QEMU hangs up as it quits, and qemu.qmp then raises that
    hang-up (``EOFError``) from ``close()`` whenever it arrived first: after a ``quit`` of ours that is
    the expected end, not a failure (QEMU's own ``qemu.machine`` treats it the same way). Without ``quit``
    it means the VMM went away, a :class:`RuntimeFailure`."""

    def __init__(self, sock: Path, what: str) -> None:
        self.sock = sock
        self.what = what
        self.quit_sent = False
        try:
            self.client = QEMUMonitorProtocol(str(sock))
            self.client.connect(negotiate=True)
        except _FAILURES as exc:
            log.error("QMP connect to %s failed: %r", sock, exc)
            raise RuntimeFailure("the microVM's monitor does not answer") from exc

    def cmd(self, name: str, *, timeout: float = COMMAND_TIMEOUT, **args: Any) -> Any:
        self.client.settimeout(timeout)
        if name == "quit":
            self.quit_sent = True  # before sending: QEMU may hang up before its answer is read
        try:
            return self.client.cmd(name, **args)
        except _FAILURES as exc:
            if self.quit_sent and isinstance(exc, EOFError | QMPError):
                return None  # gone before we read its answer to quit: what we asked for
            log.error("QMP %s on %s failed: %r", name, self.sock, exc)
            raise RuntimeFailure(f"could not {self.what}") from exc

    def send_fd(self, fd: int, name: str) -> None:
        """Give QEMU a descriptor of ours under ``name`` (SCM_RIGHTS, then ``getfd``)."""
        try:
            self.client.send_fd_scm(fd)
        except _FAILURES as exc:
            log.error("QMP could not pass a descriptor to %s: %r", self.sock, exc)
            raise RuntimeFailure(f"could not {self.what}") from exc
        self.cmd("getfd", fdname=name)

    def __enter__(self) -> _Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.client.close()
        except _FAILURES as exc:
            if self.quit_sent or exc_info[0] is not None:
                return  # the hang-up we asked for, or one that is not the error already on its way
            log.error("QMP session with %s ended badly: %r", self.sock, exc)
            raise RuntimeFailure(f"could not {self.what}: the microVM's monitor hung up") from exc


def command(sock: Path, name: str, *, timeout: float = 30.0, **args: Any) -> Any:
    """Run one QMP command and return its result; a QMP error becomes :class:`RuntimeFailure`."""
    with _Session(sock, f"run {name} in the microVM") as session:
        return session.cmd(name, timeout=timeout, **args)


def save(sock: Path, image: Path, *, quit: bool, timeout: float) -> None:
    """``stop`` + ``migrate`` to ``image`` (left stopped, or ended with ``quit``). A failed save leaves the
    VM running as it was: a failed pause or snapshot must not leave a stopped sandbox behind."""
    with _Session(sock, "save the microVM's memory") as session:
        session.cmd("stop")
        try:
            # QEMU runs as an unprivileged uid that cannot open files in the (root-only) state dir or
            # snapshot store, and may not spawn a `cat`: it gets the image as a descriptor we opened
            try:
                fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                log.error("could not create the memory image %s: %s", image, exc)
                raise RuntimeFailure("could not save the microVM's memory") from exc
            try:
                session.send_fd(fd, MIGRATION_FD)
            finally:
                os.close(fd)
            session.cmd("migrate", uri=f"fd:{MIGRATION_FD}")
            deadline = time.monotonic() + timeout
            while True:
                info = session.cmd("query-migrate")
                status = info.get("status") if isinstance(info, dict) else None
                if status == "completed":
                    break
                if status in ("failed", "cancelled") or time.monotonic() > deadline:
                    log.error("migration of %s to %s ended %s: %s", sock, image, status, info)
                    raise RuntimeFailure("could not save the microVM's memory")
                time.sleep(0.005)  # bounded by the deadline; polled like libvirt does
        except RuntimeFailure:
            with contextlib.suppress(RuntimeFailure):
                session.cmd("migrate_cancel")
                session.cmd("cont")
            raise
        if quit:
            session.cmd("quit")


def _main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] != "save":
        print("usage: python -m corral.runtimes.microvm.qmp QMP_SOCKET save IMAGE", file=sys.stderr)
        return 2
    try:
        save(Path(argv[0]), Path(argv[2]), quit=True, timeout=300.0)
    except RuntimeFailure as exc:  # the details went to stderr through the log; the shim passes them on
        print(f"corral-qmp: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    sys.exit(_main(sys.argv[1:]))
