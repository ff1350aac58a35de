"""Transports: wire the agent to stdio or to a listening socket, then run the loop.

A listener reachable from outside the sandbox (TCP, vsock) always authenticates its peers
(:mod:`corral.agent.auth`); a unix socket does when given a keyring (it is mode 0600 either way).
"""

from __future__ import annotations

import contextlib
import os
import socket

from corral.agent.conn import Connection
from corral.agent.loop import Loop, log
from corral.agent.server import Agent
from corral.agent.users import ensure_user

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs start-up time
if TYPE_CHECKING:
    from corral.agent.auth import Keyring

__all__ = ["serve_listen", "serve_stdio"]

ACCEPT_BACKOFF = 0.1  # seconds without accepting after a resource error (e.g. EMFILE), instead of a busy loop


def _agent(sudo: bool) -> tuple[Loop, Agent]:
    loop = Loop()
    agent = Agent(loop, ensure_user(), sudo=sudo)
    return loop, agent


def serve_stdio(rfd: int, wfd: int, *, sudo: bool = False) -> int:
    """Serve the one stdio connection (its hello already sent); stop when it closes."""
    loop, agent = _agent(sudo)

    def closed(conn: Connection) -> None:
        agent.shutdown("stdin closed")

    agent.connect(rfd, wfd, "stdio", send_hello=False, on_close=closed)
    loop.run()
    return 0


def _listener(address: str) -> socket.socket:
    kind, _, rest = address.partition(":")
    if kind == "unix" and rest:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Bind under a temporary name and rename once listening: whoever sees the path can connect at once.
        tmp = f"{rest}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        old = os.umask(0o177)
        try:
            sock.bind(tmp)
        finally:
            os.umask(old)
        sock.listen(64)
        os.rename(tmp, rest)  # replaces a stale socket from an earlier run
    elif kind == "tcp" and rest.rpartition(":")[2].isdigit():
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, int(port)))
        except (OSError, OverflowError) as exc:  # in use, not an address of this host, or no such port
            sock.close()
            raise SystemExit(f"--listen {address}: cannot listen there: {exc}") from None
        sock.listen(64)
    elif kind == "vsock" and rest.isdigit():
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.bind((socket.VMADDR_CID_ANY, int(rest)))
        sock.listen(64)
    else:
        raise SystemExit(f"--listen wants unix:PATH, tcp:HOST:PORT or vsock:PORT, not {address!r}")
    sock.setblocking(False)
    return sock


def needs_auth(address: str) -> bool:
    """Whether a listener at ``address`` is reachable from outside the sandbox, so must authenticate."""
    return not address.startswith("unix:")


def serve_listen(address: str, keyring: Keyring | None, *, sudo: bool = False) -> int:
    if keyring is None and needs_auth(address):
        raise SystemExit(
            f"--listen {address.partition(':')[0]}: needs --secret-file (peers must authenticate)"
        )
    # here, not at the top: auth pulls in hashlib and hmac (OpenSSL's libcrypto), which the stdio agent of
    # every VM and container never uses; measured in a microVM under TCG: ~0.3-0.7 s of the agent's start
    from corral.agent.auth import Gate

    loop, agent = _agent(sudo)
    sock = _listener(address)
    log(f"listening on {address}" + (" (peers authenticate)" if keyring is not None else ""))
    serial = 0
    gate = Gate(loop, keyring, lambda fd, name: agent.connect(fd, fd, name)) if keyring is not None else None

    def accept() -> None:
        nonlocal serial
        while True:
            try:
                conn, peer = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:  # the peer gave up (or a gVisor restore broke it): next one
                continue
            except OSError as exc:  # EMFILE, ENOBUFS, ...: keep serving, but do not spin on a ready socket
                log(f"accept failed: {exc}; pausing accept for {ACCEPT_BACKOFF}s")
                loop.remove_reader(sock.fileno())
                loop.call_later(ACCEPT_BACKOFF, lambda: loop.add_reader(sock.fileno(), accept))
                return
            serial += 1
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            fd = conn.detach()
            name = f"#{serial} {peer or 'unix'}"
            if gate is not None:
                gate.accept(fd, name)
            else:
                agent.connect(fd, fd, name)

    loop.add_reader(sock.fileno(), accept)
    loop.run()
    sock.close()
    return 0
