"""Transports: wire the agent to stdio or to a listening socket, then run the loop."""

from __future__ import annotations

import contextlib
import os
import socket

from corral.agent.conn import Connection
from corral.agent.loop import Loop, log
from corral.agent.server import Agent
from corral.agent.users import ensure_user

__all__ = ["serve_listen", "serve_stdio"]


def _agent() -> tuple[Loop, Agent]:
    loop = Loop()
    agent = Agent(loop, ensure_user())
    return loop, agent


def serve_stdio(rfd: int, wfd: int) -> int:
    """Serve the one stdio connection (its hello already sent); stop when it closes."""
    loop, agent = _agent()

    def closed(conn: Connection) -> None:
        agent.shutdown("stdin closed")

    agent.connect(rfd, wfd, "stdio", send_hello=False, on_close=closed)
    loop.run()
    return 0


def _listener(address: str) -> socket.socket:
    kind, _, rest = address.partition(":")
    if kind == "unix" and rest:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(rest)
        old = os.umask(0o177)
        try:
            sock.bind(rest)
        finally:
            os.umask(old)
    elif kind == "tcp" and rest:
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
    else:
        raise SystemExit(f"--listen wants unix:PATH or tcp:HOST:PORT, not {address!r}")
    sock.listen(64)
    sock.setblocking(False)
    return sock


def serve_listen(address: str) -> int:
    loop, agent = _agent()
    sock = _listener(address)
    log(f"listening on {address}")
    serial = 0

    def accept() -> None:
        nonlocal serial
        while True:
            try:
                conn, peer = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # ECONNABORTED (e.g. after a gVisor restore), EMFILE: keep serving
                log(f"accept failed: {exc}")
                return
            serial += 1
            if conn.family != socket.AF_UNIX:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            fd = conn.detach()
            agent.connect(fd, fd, f"#{serial} {peer or 'unix'}")

    loop.add_reader(sock.fileno(), accept)
    loop.run()
    sock.close()
    return 0
