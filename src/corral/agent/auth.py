"""The agent's side of :mod:`corral.protocol.auth`: a connection is handed to the agent only once authenticated.

Until then it costs at most :data:`MAX_AUTH_LINE` bytes of buffer, :data:`MAX_PENDING` such peers are held at
once (more are closed at accept), and each gets :data:`~corral.protocol.auth.AUTH_TIMEOUT` seconds. The client
must wait for the agent's proof before it sends anything else; bytes after its auth frame end the connection.

The secret is read from a file once, at start-up (see ``__main__``), and the file is removed when the agent may
remove it, so the code that later runs in the sandbox finds it neither on disk, nor in argv, nor in the
environment. The agent also makes itself non-dumpable, so a process of the same uid cannot read it from the
agent's memory through ``/proc/PID/mem`` or ptrace.
"""

from __future__ import annotations

import contextlib
import json
import os

from corral.agent.loop import Loop, Timer, log
from corral.protocol import auth
from corral.protocol.frames import encode

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

__all__ = ["MAX_AUTH_LINE", "MAX_PENDING", "Gate", "Keyring", "load_secret"]

MAX_AUTH_LINE = 4096  # an auth frame is ~200 bytes; nothing larger is read from an unauthenticated peer
MAX_PENDING = 32  # unauthenticated connections held at once; a flood of idle peers cannot exhaust fds
_PR_SET_DUMPABLE = 4


class Keyring:
    """The agent's current secret; a rekey replaces it for every later connection."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret

    def rekey(self, salt: str) -> None:
        self.secret = auth.derive(self.secret, salt)


def load_secret(path: str) -> Keyring:
    """Read the secret file, remove it where we may, and make this process non-dumpable."""
    try:
        secret = auth.read_secret(path)
    except (OSError, auth.AuthError) as exc:
        raise SystemExit(f"corral-agent: cannot use the secret file: {exc}") from None
    with contextlib.suppress(
        OSError
    ):  # a read-only mount (a Secret volume) keeps it; that is the mount's job
        os.unlink(path)
    _non_dumpable()
    return Keyring(secret)


def _non_dumpable() -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            log(f"prctl(PR_SET_DUMPABLE) failed: errno {ctypes.get_errno()}")
    except (
        OSError,
        AttributeError,
    ) as exc:  # no libc to load (a static image): the secret file is gone anyway
        log(f"cannot make the agent non-dumpable: {exc}")


class Gate:
    """Holds new connections until they authenticate, then passes each to ``admit(fd, name)``."""

    def __init__(self, loop: Loop, keyring: Keyring, admit: Callable[[int, str], object]) -> None:
        self.loop = loop
        self.keyring = keyring
        self.admit = admit
        self.pending: dict[int, _Pending] = {}

    def accept(self, fd: int, name: str) -> None:
        if len(self.pending) >= MAX_PENDING:
            log(f"{name}: {MAX_PENDING} connections are already authenticating; closing this one")
            os.close(fd)
            return
        sent = auth.challenge()
        try:
            os.set_blocking(fd, False)
            os.write(fd, encode(sent))  # ~100 bytes into an empty socket buffer: never partial
        except OSError:
            os.close(fd)
            return
        p = _Pending(
            fd, name, sent, self.loop.call_later(auth.AUTH_TIMEOUT, lambda: self._fail(fd, "timed out"))
        )
        self.pending[fd] = p
        self.loop.add_reader(fd, lambda: self._readable(p))

    def _readable(self, p: _Pending) -> None:
        try:
            data = os.read(p.fd, MAX_AUTH_LINE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(p.fd, f"read failed: {exc}", answer=False)
            return
        if not data:
            self._fail(p.fd, "closed before authenticating", answer=False)
            return
        p.buf += data
        nl = p.buf.find(b"\n")
        if nl < 0:
            if len(p.buf) >= MAX_AUTH_LINE:
                self._fail(p.fd, "auth frame too long")
            return
        if nl != len(p.buf) - 1:
            self._fail(p.fd, "sent data before the agent's proof")
            return
        try:
            answer = json.loads(bytes(p.buf[:nl]))
            if not isinstance(answer, dict):
                raise auth.AuthError("auth frame is not a JSON object")
            ok, salt = auth.check_client(self.keyring.secret, p.sent, answer)
        except (ValueError, auth.AuthError) as exc:
            self._fail(p.fd, f"authentication failed: {exc}")
            return
        if salt is not None:
            self.keyring.rekey(salt)
            log(f"{p.name}: rekeyed; the previous secret is no longer accepted")
        self._drop(p.fd)
        try:
            os.write(p.fd, encode(ok))
        except OSError:
            os.close(p.fd)
            return
        self.admit(p.fd, p.name)

    def _drop(self, fd: int) -> None:
        p = self.pending.pop(fd)
        p.timer.cancel()
        self.loop.forget(fd)

    def _fail(self, fd: int, why: str, *, answer: bool = True) -> None:
        p = self.pending.get(fd)
        if p is None:
            return
        log(f"{p.name}: {why}")
        self._drop(fd)
        if answer:
            with contextlib.suppress(OSError):
                os.write(
                    fd, encode({"ev": "error", "code": "unauthenticated", "message": "authentication failed"})
                )
        os.close(fd)


class _Pending:
    __slots__ = ("buf", "fd", "name", "sent", "timer")

    def __init__(self, fd: int, name: str, sent: dict[str, Any], timer: Timer) -> None:
        self.fd = fd
        self.name = name
        self.sent = sent
        self.timer = timer
        self.buf = bytearray()
