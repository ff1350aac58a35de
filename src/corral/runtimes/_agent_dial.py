"""Dial an agent that listens on the network and authenticate both ways (:mod:`corral.protocol.auth`).

Any runtime whose agent is reached over TCP (a Pod) or vsock (a VM) uses :func:`authenticate` on the stream
it opened; the stream it gets back reads the agent's ``hello`` next, as :meth:`Runtime.connect` promises.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
from anyio.abc import ByteStream

from corral.errors import AgentUnavailable
from corral.protocol import auth
from corral.protocol.frames import encode

__all__ = ["AUTH_REFUSED", "auth_refused", "authenticate", "dial_tcp"]

HANDSHAKE_TIMEOUT = 10.0  # one round trip; the agent gives up on us after auth.AUTH_TIMEOUT too
_MAX_LINE = 4096


AUTH_REFUSED = "auth_refused"  # AgentUnavailable.details["reason"]: the peer is not this sandbox's agent, or
# does not hold the secret we tried (one error class on the wire: corral.errors is the whole error tree)


def auth_refused(exc: AgentUnavailable) -> bool:
    return exc.details.get("reason") == AUTH_REFUSED


class _Prefixed(ByteStream):
    """A stream that first yields bytes already read past the handshake."""

    def __init__(self, inner: ByteStream, prefix: bytes) -> None:
        self._inner = inner
        self._prefix = prefix

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix[:max_bytes], self._prefix[max_bytes:]
            return data
        return await self._inner.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        await self._inner.send(item)

    async def send_eof(self) -> None:
        await self._inner.send_eof()

    async def aclose(self) -> None:
        await self._inner.aclose()


async def _line(stream: ByteStream, buf: bytearray) -> dict[str, Any]:
    while b"\n" not in buf:
        if len(buf) > _MAX_LINE:
            raise auth.AuthError("the peer sent a line too long for the handshake")
        buf += await stream.receive(_MAX_LINE)
    nl = buf.index(b"\n")
    line = bytes(buf[:nl])
    del buf[: nl + 1]
    try:
        header = json.loads(line)
    except ValueError:
        raise auth.AuthError("the peer does not speak the agent protocol") from None
    if not isinstance(header, dict):
        raise auth.AuthError("the peer does not speak the agent protocol")
    return header


async def authenticate(
    stream: ByteStream, secret: bytes, *, rekey: str | None = None, what: str = "the sandbox agent"
) -> ByteStream:
    """Run the client side of the handshake; on failure close ``stream`` and raise ``AgentUnavailable`` (with
    ``details["reason"] == AUTH_REFUSED`` when the peer's answer was wrong, see :func:`auth_refused`)."""
    buf = bytearray()
    try:
        with anyio.fail_after(HANDSHAKE_TIMEOUT):
            challenge = await _line(stream, buf)
            answer = auth.client_response(secret, challenge, rekey=rekey)
            await stream.send(encode(answer))
            auth.check_agent_proof(secret, challenge, answer, await _line(stream, buf))
    except auth.AuthError as exc:
        await stream.aclose()
        raise AgentUnavailable(
            f"{what} did not authenticate: {exc}", details={"reason": AUTH_REFUSED}
        ) from exc
    except (TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
        await stream.aclose()
        raise AgentUnavailable(f"{what} closed or stalled the connection during authentication") from exc
    except BaseException:
        await stream.aclose()
        raise
    return _Prefixed(stream, bytes(buf))


async def dial_tcp(
    host: str, port: int, secret: bytes, *, rekey: str | None = None, timeout: float = 10.0
) -> ByteStream:
    """Connect to an agent's TCP listener and authenticate; the result reads the agent's ``hello`` next."""
    try:
        with anyio.fail_after(timeout):
            stream = await anyio.connect_tcp(host, port)
    except (OSError, TimeoutError) as exc:
        raise AgentUnavailable(
            f"cannot reach the sandbox agent at {host}:{port} ({type(exc).__name__})"
        ) from exc
    return await authenticate(stream, secret, rekey=rekey, what=f"the sandbox agent at {host}:{port}")
