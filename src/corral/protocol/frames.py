"""Frame codec for the agent protocol (sans-IO, standard library only).

A frame is one JSON object on a single line (the *header*, UTF-8, ending in ``\\n``), followed by exactly
``header["size"]`` raw bytes (the *payload*; ``size`` may be omitted when it is 0). Output and file chunks travel
as raw payload bytes, never base64. The :class:`Decoder` takes bytes as they arrive (``feed``) and returns the
complete frames; it never does I/O, so the agent, the host-side shim and the server share it, and it is fuzzed.

See ``spec/agent-protocol.md`` for the normative description.
"""

from __future__ import annotations

import json

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs start-up time (see Frame)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["MAX_HEADER", "MAX_PAYLOAD", "Decoder", "Frame", "ProtocolError", "encode"]

MAX_HEADER = (
    64 * 1024
)  # headers carry argv, env and paths; 64 KiB leaves room without letting a peer hog memory
MAX_PAYLOAD = 4 * 1024 * 1024  # senders chunk at 64-256 KiB; 4 MiB bounds a hostile peer's single frame


class ProtocolError(Exception):
    """The byte stream is not a valid sequence of frames. The connection must be dropped."""


class Frame:
    """One frame: its header (a JSON object) and its raw payload. Immutable; compared by value.

    A hand-written slotted class, not a dataclass: ``dataclasses`` imports ``inspect`` (~9 ms), and the agent
    imports this module before it can send its ``hello``, which is on the critical path of every sandbox create.
    """

    __slots__ = ("header", "payload")
    header: dict[str, Any]
    payload: bytes

    def __init__(self, header: dict[str, Any], payload: bytes = b"") -> None:
        object.__setattr__(self, "header", header)
        object.__setattr__(self, "payload", payload)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Frame is immutable; cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Frame is immutable; cannot delete {name!r}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frame):
            return NotImplemented
        return self.header == other.header and self.payload == other.payload

    __hash__ = None  # type: ignore[assignment]  # the header is a dict

    def __repr__(self) -> str:
        return f"Frame(header={self.header!r}, payload={self.payload!r})"

    def get(self, key: str, default: Any = None) -> Any:
        return self.header.get(key, default)


def encode(header: dict[str, Any], payload: bytes = b"") -> bytes:
    """Serialise one frame. ``size`` is set from the payload; a caller-provided ``size`` is overwritten."""
    if payload:
        header = {**header, "size": len(payload)}
    elif "size" in header:
        header = {k: v for k, v in header.items() if k != "size"}
    line = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(line) > MAX_HEADER:
        raise ProtocolError(f"frame header of {len(line)} bytes exceeds {MAX_HEADER}")
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"frame payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return line + b"\n" + payload


class Decoder:
    """Incremental decoder: ``feed`` bytes in any split, get complete frames out, in order."""

    __slots__ = ("_buf", "_header", "_need")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._header: dict[str, Any] | None = None
        self._need = 0

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a complete frame (0 means we sit on a frame boundary)."""
        return len(self._buf) + (1 if self._header is not None else 0)

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        out: list[Frame] = []
        while True:
            if self._header is None:
                nl = self._buf.find(b"\n")
                if nl < 0:
                    if len(self._buf) > MAX_HEADER:
                        raise ProtocolError(f"no end of frame header within {MAX_HEADER} bytes")
                    return out
                if nl > MAX_HEADER:
                    raise ProtocolError(f"frame header of {nl} bytes exceeds {MAX_HEADER}")
                header = _parse_header(bytes(self._buf[:nl]))
                del self._buf[: nl + 1]
                self._header = header
                self._need = header.get("size", 0)
            if len(self._buf) < self._need:
                return out
            payload = bytes(self._buf[: self._need])
            del self._buf[: self._need]
            out.append(Frame(self._header, payload))
            self._header = None
            self._need = 0


def _parse_header(line: bytes) -> dict[str, Any]:
    try:
        header = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"frame header is not JSON: {exc}") from exc
    except RecursionError as exc:  # "[[[[…": 64 KiB of nesting exhausts the parser's stack
        raise ProtocolError("frame header is nested too deeply") from exc
    if not isinstance(header, dict):
        raise ProtocolError("frame header must be a JSON object")
    size = header.get("size", 0)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0 or size > MAX_PAYLOAD:
        raise ProtocolError(f"frame size must be an integer from 0 to {MAX_PAYLOAD}, got {size!r}")
    return header
