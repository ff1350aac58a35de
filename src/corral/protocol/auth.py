"""Authenticating a connection to an agent that listens where others can reach it (TCP, vsock).

Sans-IO, standard library only: the agent (:mod:`corral.agent.auth`) and the host side (runtimes) share it.
A mutual challenge/response over the sandbox's secret ``k`` (32+ random bytes), before anything else:

1. agent  → ``{"ev": "auth", "v": 1, "nonce": A}``  (A: 32 fresh random bytes, hex)
2. client → ``{"op": "auth", "nonce": C, "proof": HMAC(k, "corral-auth-v1 client" A C)}``
   and optionally ``"rekey": S`` (see below)
3. agent  → ``{"ev": "auth", "ok": true, "proof": HMAC(k, "corral-auth-v1 agent" A C)}``, then its ``hello``;
   or ``{"ev": "error", "code": "unauthenticated"}`` and it closes the connection.

Why a challenge and not a preamble carrying the secret: the network between the server and a Pod is usually
not encrypted, and a secret sent in clear would let anyone who sees one connection open their own. Here the
wire carries only nonces and MACs over both nonces, useless for another connection. Why mutual: a Pod IP is
reused once its Pod is gone; a client that reaches another sandbox's agent (or anything else listening at that
address) learns so from step 3 before it sends a command or a file. Proofs are compared in constant time.

Rekey: a warm-pool Pod is made before anyone claims it, from a template shared by the whole pool, so it can
only hold the pool's bootstrap secret. The claimer sends a fresh random salt ``S`` with its proof; once the
proof checks out the agent replaces its secret with ``derive(k, S)`` and accepts nothing else from then on.
The sandbox's own secret is thus never on the wire, and knowing the pool's secret no longer opens a claimed
sandbox. Whoever holds the bootstrap secret and the salt (the Corral servers) can derive it again.

This authenticates; it does not encrypt. Keep the traffic on a network the cluster trusts (NetworkPolicy).
"""

from __future__ import annotations

import hashlib
import hmac
import os

TYPE_CHECKING = False  # the agent imports this on its accept path; keep typing out of it
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "AUTH_TIMEOUT",
    "MIN_SECRET",
    "AuthError",
    "challenge",
    "check_agent_proof",
    "check_client",
    "client_response",
    "derive",
    "new_salt",
    "read_secret",
]

VERSION = 1
AUTH_TIMEOUT = 10.0  # seconds an unauthenticated peer may take; a real client needs one round trip
MIN_SECRET = 32  # bytes: a 256-bit key for HMAC-SHA256
MAX_SECRET = 1024
_NONCE_BYTES = 32
_CLIENT = b"corral-auth-v1 client"
_AGENT = b"corral-auth-v1 agent"
_REKEY = b"corral-rekey-v1"


class AuthError(Exception):
    """The peer did not prove it holds the secret, or spoke something other than this handshake."""


def _nonce() -> str:
    return os.urandom(_NONCE_BYTES).hex()


def _hex_field(header: dict[str, Any], name: str, size: int) -> bytes:
    value = header.get(name)
    if not isinstance(value, str) or len(value) != 2 * size:
        raise AuthError(f"auth frame: {name!r} must be {size} bytes of hex")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise AuthError(f"auth frame: {name!r} is not hex") from None


def _mac(secret: bytes, label: bytes, agent_nonce: bytes, client_nonce: bytes) -> bytes:
    return hmac.new(secret, label + agent_nonce + client_nonce, hashlib.sha256).digest()


def _check_secret(secret: bytes) -> bytes:
    if not MIN_SECRET <= len(secret) <= MAX_SECRET:
        raise AuthError(f"a secret must be {MIN_SECRET}..{MAX_SECRET} bytes, not {len(secret)}")
    return secret


def read_secret(path: str) -> bytes:
    """The secret in the file at ``path``: its raw bytes, every one (1 random secret in 256 ends in 0x0a)."""
    with open(path, "rb") as f:
        data = f.read(MAX_SECRET + 1)
    return _check_secret(data)


def new_salt() -> str:
    return _nonce()


def derive(secret: bytes, salt: str) -> bytes:
    """The secret that replaces ``secret`` after a rekey with ``salt`` (hex, as sent)."""
    raw = _hex_field({"rekey": salt}, "rekey", _NONCE_BYTES)
    return hmac.new(_check_secret(secret), _REKEY + raw, hashlib.sha256).digest()


# --- agent side ---------------------------------------------------------------------------------------------


def challenge() -> dict[str, Any]:
    """Step 1: the agent's first frame on a new connection. Keep it to check the answer."""
    return {"ev": "auth", "v": VERSION, "nonce": _nonce()}


def check_client(
    secret: bytes, sent: dict[str, Any], answer: dict[str, Any]
) -> tuple[dict[str, Any], str | None]:
    """Step 2 checked, step 3 made: returns the agent's proof frame and the rekey salt (or None).

    Raises :class:`AuthError` if ``answer`` is not a valid proof for the challenge ``sent``.
    """
    if answer.get("op") != "auth":
        raise AuthError("expected an auth frame first")
    agent_nonce = bytes.fromhex(sent["nonce"])
    client_nonce = _hex_field(answer, "nonce", _NONCE_BYTES)
    proof = _hex_field(answer, "proof", 32)
    if not hmac.compare_digest(proof, _mac(secret, _CLIENT, agent_nonce, client_nonce)):
        raise AuthError("wrong proof")
    rekey = answer.get("rekey")
    if rekey is not None:
        _hex_field(answer, "rekey", _NONCE_BYTES)
    ok = {"ev": "auth", "ok": True, "proof": _mac(secret, _AGENT, agent_nonce, client_nonce).hex()}
    return ok, rekey


# --- client side --------------------------------------------------------------------------------------------


def client_response(
    secret: bytes, challenge_header: dict[str, Any], *, rekey: str | None = None
) -> dict[str, Any]:
    """Step 2: the answer to the agent's challenge. Pass it to :func:`check_agent_proof` with step 3."""
    _check_secret(secret)
    if challenge_header.get("ev") != "auth" or challenge_header.get("v") != VERSION:
        raise AuthError(f"the peer did not open with an auth challenge (got {challenge_header.get('ev')!r})")
    agent_nonce = _hex_field(challenge_header, "nonce", _NONCE_BYTES)
    client_nonce = os.urandom(_NONCE_BYTES)
    answer: dict[str, Any] = {
        "op": "auth",
        "nonce": client_nonce.hex(),
        "proof": _mac(secret, _CLIENT, agent_nonce, client_nonce).hex(),
    }
    if rekey is not None:
        answer["rekey"] = rekey
    return answer


def check_agent_proof(
    secret: bytes, challenge_header: dict[str, Any], answer: dict[str, Any], reply: dict[str, Any]
) -> None:
    """Step 3 checked: raises :class:`AuthError` unless the agent proved it holds ``secret``."""
    if reply.get("ev") == "error":
        raise AuthError(f"the agent refused the connection: {reply.get('message', reply.get('code'))}")
    if reply.get("ev") != "auth" or reply.get("ok") is not True:
        raise AuthError(f"unexpected answer to auth: {reply.get('ev')!r}")
    agent_nonce = _hex_field(challenge_header, "nonce", _NONCE_BYTES)
    client_nonce = _hex_field(answer, "nonce", _NONCE_BYTES)
    proof = _hex_field(reply, "proof", 32)
    if not hmac.compare_digest(proof, _mac(secret, _AGENT, agent_nonce, client_nonce)):
        raise AuthError("the agent's proof is wrong: this is not the sandbox's agent")
