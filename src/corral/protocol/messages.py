"""Names of the agent protocol: operations, events and error codes (standard library only).

Keeping them as ``StrEnum`` members means both sides spell them once; on the wire they are plain strings.
Event names are shared end to end: agent → server → SDK → CLI all say ``started``, ``stdout``, ``stderr``,
``exit``, ``result``, ``error``.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "CHANNEL",
    "CHUNK_SIZE",
    "PORT_WINDOW_BYTES",
    "PORT_WINDOW_FRAMES",
    "PROTOCOL_VERSION",
    "TERMINAL_EVENTS",
    "AgentErrorCode",
    "Event",
    "Op",
]

PROTOCOL_VERSION = 1
CHUNK_SIZE = 128 * 1024  # file and stdin chunks; large enough to amortise headers, small enough to interleave
# Flow control of a ``port.connect`` stream, each direction: a sender keeps at most this much of its data (and
# this many of its data frames) unacknowledged. 1 MiB keeps a loopback relay at full speed; 16 frames keep the
# receiver's per-request queue well under the host client's 64-frame bound even when frames are tiny.
PORT_WINDOW_BYTES = 1024 * 1024
PORT_WINDOW_FRAMES = 16


class Op(StrEnum):
    """Requests, sent by the client (the server side). Each carries ``id`` and ``op``."""

    HELLO = "hello"
    PING = "ping"
    # processes
    EXEC = "exec"
    ATTACH = "attach"
    STDIN = "stdin"
    SIGNAL = "signal"
    LIST_PROCESSES = "list_processes"
    DETACH = "detach"
    RESIZE = "resize"  # a terminal's size (exec with ``pty``)
    # files
    READ = "read"
    WRITE = "write"
    DATA = "data"  # a chunk of an upload already started by WRITE (same id)
    LIST = "list"
    STAT = "stat"
    MKDIR = "mkdir"
    REMOVE = "remove"
    RENAME = "rename"
    WATCH = "watch"  # a directory's changes, until cancelled
    # agent-wide
    CONFIGURE = "configure"  # late-bound env defaults, set after boot (warm pools)
    # after a restore from a memory image (a fork, a VM's golden image): ``seed`` (hex) is fresh entropy for
    # the kernel's RNG, ``time`` the host's Unix time for the guest clock, which stood still in the image
    RESTORED = "restored"
    USAGE = "usage"  # CPU seconds, memory and disk the sandbox uses, as it sees them (corral.agent.usage)
    # ports
    PORT_CONNECT = "port.connect"  # a TCP connection to a port inside the sandbox, relayed both ways
    CANCEL = "cancel"  # ends a long-lived request (watch, attach) with the same id; not answered itself
    # channels: a peer relaying several clients (the host's shim) tags each client's frames with CHANNEL
    CHANNEL_CLOSE = "channel.close"  # that client left: end what it owned, as a closed connection would


CHANNEL = "ch"  # header field: the virtual connection (channel) a relayed frame belongs to


class Event(StrEnum):
    """Frames sent by the agent. Each answering frame repeats the request ``id``."""

    HELLO = "hello"  # unsolicited, once per connection, before anything else
    STARTED = "started"
    STDOUT = "stdout"
    STDERR = "stderr"
    PTY = "pty"  # terminal output (a process started with ``pty``): one stream, raw bytes
    FS_EVENT = "fs_event"  # changes seen by a ``watch``: header field ``events``
    CHUNK = "chunk"  # file data, for READ
    DATA = "data"  # bytes from a port connection (``eof:true``: the server inside finished sending)
    ACK = "ack"  # bytes/frames of a port connection's client data written to the socket (flow control)
    # terminal events: exactly one of these ends each request
    OK = "ok"
    EXIT = "exit"
    ERROR = "error"


TERMINAL_EVENTS = frozenset({Event.OK, Event.EXIT, Event.ERROR})


class AgentErrorCode(StrEnum):
    """``code`` of an ``error`` event. The server maps each to a :mod:`corral.errors` class."""

    INVALID = "invalid"  # malformed request
    UNKNOWN_OP = "unknown_op"
    NOT_FOUND = "not_found"  # file, directory, process or executable
    EXISTS = "exists"
    NOT_A_DIRECTORY = "not_a_directory"
    IS_A_DIRECTORY = "is_a_directory"
    PERMISSION_DENIED = "permission_denied"
    NO_SPACE = "no_space"
    TOO_LARGE = "too_large"
    TIMEOUT = "timeout"
    BUSY = "busy"
    INTERNAL = "internal"
    PORT_CLOSED = "port_closed"  # nothing listens on the port (connection refused)
    CONNECTION_RESET = "connection_reset"  # the server inside reset or abandoned an open port connection
