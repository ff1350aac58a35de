"""The REST side of the ``firecracker`` and ``cloud-hypervisor`` engines: JSON over the VMM's Unix socket.

Both VMMs serve a small HTTP/1.1 API on a Unix socket in the sandbox's state dir; httpx (already Corral's HTTP
client) speaks it through its ``uds`` transport. Blocking, like :mod:`.qmp`: called from worker threads. Also
the host half of their vsock (Firecracker's "hybrid vsock", which cloud-hypervisor shares): connect to the
VMM's vsock socket, send ``CONNECT <port>``, read ``OK <host port>``, then the stream is the guest's port.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from corral.errors import RuntimeFailure

__all__ = ["Call", "RestApi", "vsock_connect"]

log = logging.getLogger("corral.runtimes.microvm.rest")

TIMEOUT = 30.0  # one API call (a snapshot of a large guest takes longer: the caller passes its own)


@dataclass(frozen=True)
class Call:
    """One request of a VMM's API (what an engine sends, kept as data so tests can check it)."""

    method: str
    path: str
    body: dict[str, Any] | None = None


class RestApi:
    def __init__(self, sock: Path) -> None:
        self.sock = sock

    def send(self, call: Call, *, timeout: float = TIMEOUT) -> Any:
        """Send ``call``; its JSON answer (None for an empty one). A refusal becomes RuntimeFailure with the
        VMM's own message in the log (it may name host paths: never for clients)."""
        transport = httpx.HTTPTransport(uds=str(self.sock))
        try:
            with httpx.Client(transport=transport, base_url="http://localhost", timeout=timeout) as client:
                reply = client.request(call.method, call.path, json=call.body)
        except httpx.HTTPError as exc:
            log.error("VMM API %s %s on %s failed: %r", call.method, call.path, self.sock, exc)
            raise RuntimeFailure("the microVM's monitor does not answer") from exc
        if reply.is_error:
            log.error("VMM API %s %s refused (%s): %s", call.method, call.path, reply.status_code, reply.text)
            raise RuntimeFailure("the microVM refused an operation")
        return reply.json() if reply.content else None


def vsock_connect(uds: Path, port: int, *, timeout: float = 10.0) -> socket.socket:
    """A stream to the guest's vsock ``port`` through the VMM's vsock Unix socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(str(uds))
        sock.sendall(f"CONNECT {port}\n".encode())
        answer = b""
        while not answer.endswith(b"\n") and len(answer) < 64:
            chunk = sock.recv(1)  # one byte at a time: what follows the line is already the guest's stream
            if not chunk:
                break
            answer += chunk
        if not answer.startswith(b"OK "):
            raise RuntimeFailure(f"the guest does not listen on vsock port {port}")
        sock.settimeout(None)
        return sock
    except (OSError, RuntimeFailure) as exc:
        sock.close()
        if isinstance(exc, RuntimeFailure):
            raise
        raise RuntimeFailure("the microVM's vsock does not answer") from exc
