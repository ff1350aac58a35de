"""The only place in Corral's host-side code that starts host processes (DESIGN §8.3).

Everything is an argv list with a timeout; failures become :class:`~corral.errors.RuntimeFailure` (or
``RuntimeUnavailable`` for a missing binary) whose message is safe to show a client. The raw stderr, which may
contain host paths, goes to the log only.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

from corral.errors import RuntimeFailure, RuntimeUnavailable, Timeout

__all__ = [
    "ProcResult",
    "proc_start_ticks",
    "require_binary",
    "run",
    "run_blocking",
    "spawn_detached",
    "spawn_standby",
]

log = logging.getLogger("corral.runtimes.proc")

_INSTALL_HINTS = {
    "bwrap": "apt-get install bubblewrap",
    "runsc": "apt-get install runsc",
    "mount": "apt-get install mount",
    "qemu-system-x86_64": "apt-get install qemu-system-x86",
    "qemu-img": "apt-get install qemu-utils",
    "mkfs.erofs": "apt-get install erofs-utils",
    "mkfs.ext4": "apt-get install e2fsprogs",
    "lz4": "apt-get install lz4",
    "apt-get": "run Corral on Debian (the microvm guest kernel is a Debian package)",
    "apt-cache": "run Corral on Debian (the microvm guest kernel is a Debian package)",
    "dpkg": "run Corral on Debian (the microvm guest kernel is a Debian package)",
}


@dataclass(frozen=True, kw_only=True)
class ProcResult:
    returncode: int
    stdout: bytes
    stderr: bytes


def require_binary(name: str) -> str:
    """Absolute path of ``name``, or a RuntimeUnavailable that says how to install it."""
    path = shutil.which(name)
    if path is None:
        hint = _INSTALL_HINTS.get(name, f"install {name}")
        raise RuntimeUnavailable(
            f"{name} is not installed on this host; install it with: {hint}",
            details={"binary": name, "install": hint},
        )
    return path


async def run(
    argv: Sequence[str],
    *,
    timeout: float,
    what: str,
    check: bool = True,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
) -> ProcResult:
    """Run a host command to completion.

    ``what`` is a short description for the client-facing error ("delete the gVisor sandbox"); the command's
    own stderr is logged, not returned.
    """
    try:
        with anyio.fail_after(timeout):
            done = await anyio.run_process(
                list(argv), input=input, check=False, env=dict(env) if env is not None else None
            )
    except TimeoutError as exc:
        log.error("host command timed out after %ss: %s", timeout, argv)
        raise Timeout(f"timed out trying to {what} (after {timeout:g}s)") from exc
    except FileNotFoundError as exc:
        require_binary(argv[0])
        raise RuntimeFailure(f"could not {what}") from exc
    result = ProcResult(returncode=done.returncode, stdout=done.stdout, stderr=done.stderr)
    if check and done.returncode != 0:
        log.error(
            "host command failed (rc=%s): %s\n%s",
            done.returncode,
            argv,
            done.stderr.decode(errors="replace")[-4000:],
        )
        raise RuntimeFailure(f"could not {what}", details={"exit_code": done.returncode})
    return result


def run_blocking(
    argv: Sequence[str],
    *,
    timeout: float,
    what: str,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    cwd: Path | None = None,
) -> ProcResult:
    """:func:`run` for code already in a worker thread (building the agent bundle). Same errors."""
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            timeout=timeout,
            check=False,
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
    except subprocess.TimeoutExpired as exc:
        log.error("host command timed out after %ss: %s", timeout, argv)
        raise Timeout(f"timed out trying to {what} (after {timeout:g}s)") from exc
    except FileNotFoundError as exc:
        require_binary(argv[0])
        raise RuntimeFailure(f"could not {what}") from exc
    if check and done.returncode != 0:
        log.error(
            "host command failed (rc=%s): %s\n%s",
            done.returncode,
            argv,
            done.stderr.decode(errors="replace")[-4000:],
        )
        raise RuntimeFailure(f"could not {what}", details={"exit_code": done.returncode})
    return ProcResult(returncode=done.returncode, stdout=done.stdout, stderr=done.stderr)


def spawn_detached(
    argv: Sequence[str], *, log_path: Path, env: Mapping[str, str] | None = None, pass_fds: Sequence[int] = ()
) -> subprocess.Popen[bytes]:
    """Start a long-lived helper (a shim) in its own session, so it outlives its creator.

    Its stdout is a pipe the caller reads a readiness line from; stderr goes to ``log_path``; stdin is
    /dev/null. All other fds are closed.
    """
    with open(log_path, "ab") as logf:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=logf,
            env=dict(env) if env is not None else None,
            start_new_session=True,
            close_fds=True,
            pass_fds=tuple(pass_fds),
        )


def spawn_standby(argv: Sequence[str]) -> subprocess.Popen[bytes]:
    """Start a helper ahead of need in its own session: stdin a pipe it waits on for its assignment (EOF:
    not needed), stdout a pipe for its readiness line, stderr /dev/null until it opens a log of its own."""
    return subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


def proc_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None if no such process.

    Comparing it with a recorded value tells whether ``pid`` is still the same process.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # the comm field may contain spaces and parentheses; fields after the last ')' are fixed
    rest = stat[stat.rindex(")") + 2 :].split()
    return int(rest[19])


def pid_alive(pid: int, start_ticks: int) -> bool:
    """Whether ``pid`` is still the process that started at ``start_ticks`` and has not exited.

    A zombie (exited, not yet reaped by its parent) counts as gone.
    """
    if proc_start_ticks(pid) != start_ticks:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def kill_pid(pid: int, start_ticks: int, sig: int) -> bool:
    """Signal ``pid`` only if it is still the process we started. Returns whether a signal was sent."""
    if not pid_alive(pid, start_ticks):
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True
