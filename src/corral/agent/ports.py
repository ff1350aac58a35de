"""Port connections: a TCP connection the agent opens to a server inside the sandbox, relayed over the protocol.

Sandboxes have no network but loopback, so the host reaches a server inside (a web app on port 8000, a
notebook, a websocket) only through the agent: ``port.connect`` makes the agent connect to ``127.0.0.1:port``
in the sandbox's own network namespace (a server bound to 0.0.0.0 is reached the same way) and turns the
request into a long-lived, two-way byte stream. Only loopback addresses are accepted, and loopback inside the
sandbox is the sandbox's own (a private netns under bwrap, gVisor's netstack under runsc), so this cannot reach
the host's services.

Flow control is a credit window in each direction (:data:`PORT_WINDOW_BYTES` / :data:`PORT_WINDOW_FRAMES`):

- sandbox → host: the stream is a connection *producer*; it reads the socket only while less than a window of
  its ``data`` frames is unacknowledged (the host acknowledges with ``data`` frames carrying ``ack_bytes`` /
  ``ack_frames``). A host that stops reading stops the agent reading the socket, and TCP pushes back on the
  server inside: nothing buffers without bound.
- host → sandbox: client bytes are written to the socket; what the socket cannot take yet is kept (at most a
  window, which the host must respect: more is a protocol violation that ends the stream) and acknowledged
  with ``ack`` events as it is written.

Half-close both ways (``eof``), then ``ok`` once both directions have ended; ``abort`` closes at once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

from corral.agent.conn import Connection
from corral.agent.errors import AgentError
from corral.agent.loop import Loop, Timer
from corral.protocol.frames import Frame
from corral.protocol.messages import PORT_WINDOW_BYTES, PORT_WINDOW_FRAMES, AgentErrorCode

__all__ = ["MAX_PORT_STREAMS", "PortStream", "check_target"]

READ_SIZE = 64 * 1024  # per data frame: half a CHUNK_SIZE, so a full window is 16 frames of it
CONNECT_TIMEOUT = 10.0  # loopback answers at once; this guards a listener whose backlog is full
MAX_PORT_STREAMS = 1024  # open port connections per agent (each holds a socket)


def check_target(h: dict[str, Any]) -> tuple[str, int]:
    """The (host, port) a ``port.connect`` asks for; only loopback addresses inside the sandbox."""
    port = h.get("port")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise AgentError(AgentErrorCode.INVALID, "'port' must be a TCP port number from 1 to 65535")
    host = h.get("host", "127.0.0.1")
    if host == "localhost":
        host = "127.0.0.1"
    import ipaddress  # here, not at the top: ~1 ms of the agent's start-up, and few sandboxes forward ports

    try:
        address = ipaddress.ip_address(host) if isinstance(host, str) else None
    except ValueError:
        address = None
    if address is None or not address.is_loopback:
        raise AgentError(
            AgentErrorCode.INVALID,
            "'host' must be a loopback address (127.0.0.1, ::1): only servers inside the sandbox are reachable",
        )
    return str(address), port


class PortStream:
    """One ``port.connect`` request: a non-blocking socket relayed to ``conn`` as request ``rid``."""

    def __init__(
        self,
        loop: Loop,
        conn: Connection,
        rid: str,
        host: str,
        port: int,
        on_done: Callable[[PortStream], None],
    ) -> None:
        self.loop = loop
        self.conn = conn
        self.rid = rid
        self.port = port
        self.on_done = on_done
        self.done = False
        self.connected = False
        self.timer: Timer | None = None
        # sandbox -> host
        self.unacked_bytes = 0
        self.unacked_frames = 0
        self.read_eof = False
        self.reading = False
        # host -> sandbox
        self.out: deque[memoryview] = deque()
        self.out_bytes = 0
        self.host_eof = False
        self.shut_wr = False
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        self.fd = self.sock.fileno()
        conn.add_producer(self)
        err = self.sock.connect_ex((host, port))
        if err == 0:
            self._connected()
        elif err in (errno.EINPROGRESS, errno.EAGAIN):
            loop.add_writer(self.fd, self._connect_done)
            self.timer = loop.call_later(CONNECT_TIMEOUT, self._connect_timed_out)
        else:
            self._connect_failed(err)

    # --- connecting ------------------------------------------------------------------------------------------
    def _connect_done(self) -> None:
        self.loop.remove_writer(self.fd)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._connect_failed(err)
        else:
            self._connected()

    def _connect_timed_out(self) -> None:
        self.timer = None
        self._fail(AgentErrorCode.TIMEOUT, f"port {self.port}: the connection was not accepted in time")

    def _connect_failed(self, err: int) -> None:
        if err == errno.ECONNREFUSED:
            self._fail(AgentErrorCode.PORT_CLOSED, f"nothing listens on port {self.port}")
        else:
            self._fail(AgentErrorCode.PORT_CLOSED, f"port {self.port}: cannot connect ({os.strerror(err)})")

    def _connected(self) -> None:
        self.connected = True
        self.conn.send({"id": self.rid, "ev": "started", "port": self.port})
        self._want_read()

    # --- sandbox -> host -------------------------------------------------------------------------------------
    def _window_open(self) -> bool:
        return self.unacked_bytes < PORT_WINDOW_BYTES and self.unacked_frames < PORT_WINDOW_FRAMES

    def _want_read(self) -> None:
        if self.done or self.read_eof or self.reading or not self._window_open():
            return
        self.reading = True
        self.loop.add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        self.loop.remove_reader(self.fd)
        self.reading = False
        self.conn.wake(self)  # read when the connection has room for the frame

    def produce(self) -> bool:
        if self.done or not self.connected or self.read_eof or not self._window_open():
            return False
        room = min(READ_SIZE, PORT_WINDOW_BYTES - self.unacked_bytes)
        try:
            data = self.sock.recv(room)
        except (BlockingIOError, InterruptedError):
            self._want_read()
            return False
        except OSError as exc:
            self._fail(AgentErrorCode.CONNECTION_RESET, f"port {self.port}: connection lost ({exc.strerror})")
            return False
        if not data:
            self.read_eof = True
            self.conn.send({"id": self.rid, "ev": "data", "eof": True})
            self._maybe_finish()
            return False
        self.unacked_bytes += len(data)
        self.unacked_frames += 1
        self.conn.send({"id": self.rid, "ev": "data"}, data)
        return self._window_open()

    # --- host -> sandbox -------------------------------------------------------------------------------------
    def on_data(self, frame: Frame) -> None:
        """A ``data`` frame of this request: acknowledgements, client bytes, eof or abort."""
        if self.done:
            return
        if frame.get("abort"):
            self._end({"ev": "ok", "aborted": True})
            return
        ack_bytes, ack_frames = frame.get("ack_bytes"), frame.get("ack_frames")
        if isinstance(ack_bytes, int) and isinstance(ack_frames, int) and (ack_bytes or ack_frames):
            self.unacked_bytes = max(0, self.unacked_bytes - ack_bytes)
            self.unacked_frames = max(0, self.unacked_frames - ack_frames)
            self._want_read()
        payload = frame.payload
        if payload:
            if self.host_eof:
                self._fail(AgentErrorCode.INVALID, f"port {self.port}: data after eof")
                return
            if (
                not self.connected
                or self.out_bytes + len(payload) > PORT_WINDOW_BYTES
                or len(self.out) >= PORT_WINDOW_FRAMES
            ):
                self._fail(AgentErrorCode.INVALID, f"port {self.port}: the client overran its send window")
                return
            self.out.append(memoryview(payload))
            self.out_bytes += len(payload)
        if frame.get("eof"):
            self.host_eof = True
        self._flush()

    def _flush(self) -> None:
        if self.done:
            return
        sent = frames = 0
        while self.out:
            head = self.out[0]
            try:
                n = self.sock.send(head)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._fail(
                    AgentErrorCode.CONNECTION_RESET, f"port {self.port}: connection lost ({exc.strerror})"
                )
                return
            sent += n
            if n == len(head):
                self.out.popleft()
                frames += 1
            else:
                self.out[0] = head[n:]
        self.out_bytes -= sent
        if sent:
            self.conn.send({"id": self.rid, "ev": "ack", "bytes": sent, "frames": frames})
        if self.out:
            self.loop.add_writer(self.fd, self._flush)
            return
        self.loop.remove_writer(self.fd)
        if self.host_eof and not self.shut_wr and self.connected:
            self.shut_wr = True
            with contextlib.suppress(OSError):  # the server already closed: its side ends the stream
                self.sock.shutdown(socket.SHUT_WR)
            self._maybe_finish()

    # --- ending ----------------------------------------------------------------------------------------------
    def _maybe_finish(self) -> None:
        if self.read_eof and self.shut_wr and not self.out:
            self._end({"ev": "ok"})

    def _fail(self, code: str, message: str) -> None:
        self._end({"ev": "error", "code": str(code), "message": message})

    def _end(self, header: dict[str, Any]) -> None:
        if self.done:
            return
        self.cancel()
        self.conn.finish(self.rid, header)

    def cancel(self) -> None:
        """Close the socket (the connection closed, or the stream ended); idempotent."""
        if self.done:
            return
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.conn.remove_producer(self)
        self.loop.forget(self.fd)
        self.sock.close()
        self.out.clear()
        self.on_done(self)
