"""One error tree for the whole of Corral: server, SDK, CLI and the core all raise these.

Every class carries the wire ``code`` and the HTTP ``status`` it maps to, so the server can serialise any
``CorralError`` as ``{"error": {"code", "message", "details"}}`` and the SDK can raise the same class again on
the other side (:func:`from_wire`). Messages are written for a person: they say what went wrong and what to do,
and never contain host paths or raw runsc/kubectl output (those are logged, not returned).
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "AgentUnavailable",
    "CommandFailed",
    "Conflict",
    "CorralError",
    "InvalidNetworkPolicy",
    "InvalidRequest",
    "InvalidState",
    "NotFound",
    "PermissionDenied",
    "PortClosed",
    "ResourceExhausted",
    "RuntimeFailure",
    "RuntimeUnavailable",
    "Timeout",
    "TransportError",
    "Unauthenticated",
    "Unsupported",
    "from_wire",
]


class CorralError(Exception):
    """Base of every error Corral raises on purpose."""

    code: ClassVar[str] = "internal"
    status: ClassVar[int] = 500

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details or {})

    def to_wire(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}

    def __str__(self) -> str:
        return self.message


class InvalidRequest(CorralError):
    """The request itself is wrong: bad argument, unknown option, path outside what is allowed."""

    code = "invalid_request"
    status = 400


class InvalidNetworkPolicy(InvalidRequest):
    """A sandbox's network policy cannot be accepted: a malformed rule, or one that only names destinations
    no sandbox may ever reach (private, loopback, link-local, metadata, …). ``details["rule"]`` names it."""

    code = "invalid_network_policy"


class Unauthenticated(CorralError):
    code = "unauthenticated"
    status = 401


class PermissionDenied(CorralError):
    code = "permission_denied"
    status = 403


class NotFound(CorralError):
    code = "not_found"
    status = 404


class Conflict(CorralError):
    code = "conflict"
    status = 409


class InvalidState(Conflict):
    """The operation is not allowed in the object's current state (e.g. exec in a killed sandbox)."""

    code = "invalid_state"
    status = 409


class ResourceExhausted(CorralError):
    """A limit or quota was hit (memory, pids, disk, tenant quota, file too large)."""

    code = "resource_exhausted"
    status = 429


class Unsupported(CorralError):
    """The chosen runtime cannot do this (e.g. snapshot on a runtime without the capability)."""

    code = "unsupported"
    status = 501


class RuntimeUnavailable(Unsupported):
    """The isolation runtime cannot run on this host: missing binary, not root, kernel feature absent."""

    code = "runtime_unavailable"
    status = 501


class RuntimeFailure(CorralError):
    """The isolation runtime failed. Details are in the server log, never in the message."""

    code = "runtime_failure"
    status = 502


class AgentUnavailable(CorralError):
    """The in-sandbox agent did not answer (sandbox crashed, was OOM-killed, or is still starting)."""

    code = "agent_unavailable"
    status = 502


class Timeout(CorralError):
    code = "timeout"
    status = 504


class PortClosed(CorralError):
    """Nothing listens on the port inside the sandbox (a proxy answers 502 Bad Gateway)."""

    code = "port_closed"
    status = 502


# --- SDK-only errors -------------------------------------------------------------------------------


class CommandFailed(CorralError):
    """Raised by ``commands.run(..., check=True)`` when the command exits non-zero.

    A non-zero exit is a result, not an error, unless the caller asked for ``check``.
    """

    code = "command_failed"
    status = 200

    def __init__(self, message: str, *, exit_code: int, stdout: str = "", stderr: str = "") -> None:
        super().__init__(message, details={"exit_code": exit_code})
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr


class TransportError(CorralError):
    """The SDK could not reach the Corral server."""

    code = "transport_error"
    status = 503


def _all_subclasses(cls: type[CorralError]) -> list[type[CorralError]]:
    out: list[type[CorralError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


_BY_CODE: dict[str, type[CorralError]] = {c.code: c for c in _all_subclasses(CorralError)}


def from_wire(body: dict[str, Any], *, status: int = 500) -> CorralError:
    """Rebuild the error the server sent. Unknown codes fall back to the class for the HTTP status."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return CorralError(f"unexpected error response (HTTP {status})")
    code = str(err.get("code", ""))
    message = str(err.get("message", "")) or f"HTTP {status}"
    details = err.get("details") if isinstance(err.get("details"), dict) else {}
    cls = _BY_CODE.get(code)
    if cls is None or cls is CommandFailed:  # CommandFailed is raised by the SDK itself, never sent
        cls = next(
            (
                c
                for c in _BY_CODE.values()
                if c.status == status and c.__bases__[0] is CorralError and c is not CommandFailed
            ),
            CorralError,
        )
    return cls(message, details=details)
