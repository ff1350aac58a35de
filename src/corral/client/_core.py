"""Sans-IO pieces of the remote client: URLs, headers, timeouts and error mapping (DESIGN §5).

Shared by the hand-written async backend and its generated sync twin, so the HTTP logic that is not I/O lives
once, here.
"""

from __future__ import annotations

import json
from typing import Any, Protocol
from urllib.parse import quote

import httpx

from corral.errors import CorralError, TransportError, from_wire

__all__ = [
    "STREAM_TIMEOUT",
    "TIMEOUT",
    "NdjsonSplitter",
    "check",
    "error_from",
    "headers",
    "sandbox_path",
    "wire_body",
]

# Calls answer quickly, but a create may wait for a cold gVisor boot or a template build step; streams last as
# long as the command or download does, so they have no read timeout at all.
TIMEOUT = httpx.Timeout(connect=10.0, read=600.0, write=600.0, pool=30.0)
STREAM_TIMEOUT = httpx.Timeout(connect=10.0, read=None, write=600.0, pool=30.0)


class _WireValue(Protocol):
    def to_wire(self) -> dict[str, Any]: ...


def headers(api_key: str | None) -> dict[str, str]:
    out = {"user-agent": "corral-sdk"}
    if api_key:
        out["authorization"] = f"Bearer {api_key}"
    return out


def sandbox_path(sandbox_id: str, *rest: str) -> str:
    return "/".join(["/v1/sandboxes", quote(sandbox_id, safe=""), *(quote(p, safe="") for p in rest)])


def wire_body(params: _WireValue) -> dict[str, Any]:
    """A request body from a wire dataclass, unset (None) fields left out so the server's defaults apply."""
    return {k: v for k, v in params.to_wire().items() if v is not None}


def error_from(status: int, body: bytes) -> CorralError:
    """The Corral error a non-2xx response carries (or one made from its status when it carries none)."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return from_wire(data, status=status)
    text = body[:200].decode(errors="replace").strip()
    return from_wire({"error": {"code": "", "message": f"HTTP {status}: {text or 'no body'}"}}, status=status)


def check(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        raise error_from(response.status_code, response.content)
    return response


class NdjsonSplitter:
    """Splits an NDJSON byte stream on ``\\n`` only.

    Not ``str.splitlines`` (which httpx's ``aiter_lines`` uses): process output travels as latin-1 text, so a
    payload byte 0x85 becomes U+0085, which ``splitlines`` takes for a line break in the middle of a JSON string.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buffer += chunk
        *lines, rest = self._buffer.split(b"\n")
        self._buffer = bytearray(rest)
        return [bytes(line) for line in lines if line.strip()]

    def close(self) -> list[bytes]:
        rest, self._buffer = bytes(self._buffer), bytearray()
        return [rest] if rest.strip() else []


def line_event(line: bytes | str) -> dict[str, Any] | None:
    """One NDJSON line as a dict; a mid-stream ``{"error": …}`` line raises it."""
    if not line.strip():
        return None
    data = json.loads(line)
    if "error" in data and isinstance(data["error"], dict):
        raise from_wire(data)
    return data  # type: ignore[no-any-return]


def transport_error(url: str, exc: Exception) -> TransportError:
    return TransportError(
        f"cannot reach the Corral server at {url} ({type(exc).__name__}); is `corral serve` running and "
        "CORRAL_URL right?"
    )
