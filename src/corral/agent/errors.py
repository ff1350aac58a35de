"""The agent's one error type and the mapping from ``OSError`` to protocol error codes.

Handlers raise :class:`AgentError`; the dispatcher turns it into an ``error`` frame. Operating-system errors are
translated once, here, with a message that names only the path as the client gave it (a path inside the
sandbox), never anything about the host.
"""

from __future__ import annotations

import errno

from corral.protocol.messages import AgentErrorCode

__all__ = ["AgentError", "from_oserror", "short_repr"]


class AgentError(Exception):
    """A request failed in a way the client should hear about, as ``{"ev":"error","code","message"}``."""

    def __init__(self, code: AgentErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_CODES: dict[int, AgentErrorCode] = {
    errno.ENOENT: AgentErrorCode.NOT_FOUND,
    errno.ESRCH: AgentErrorCode.NOT_FOUND,
    errno.EACCES: AgentErrorCode.PERMISSION_DENIED,
    errno.EPERM: AgentErrorCode.PERMISSION_DENIED,
    errno.EROFS: AgentErrorCode.PERMISSION_DENIED,
    errno.EISDIR: AgentErrorCode.IS_A_DIRECTORY,
    errno.ENOTDIR: AgentErrorCode.NOT_A_DIRECTORY,
    errno.EEXIST: AgentErrorCode.EXISTS,
    errno.ENOTEMPTY: AgentErrorCode.INVALID,
    errno.ENOSPC: AgentErrorCode.NO_SPACE,
    errno.EDQUOT: AgentErrorCode.NO_SPACE,
    errno.EFBIG: AgentErrorCode.TOO_LARGE,
    errno.ENAMETOOLONG: AgentErrorCode.INVALID,
    errno.ELOOP: AgentErrorCode.INVALID,
    errno.EINVAL: AgentErrorCode.INVALID,
    errno.EXDEV: AgentErrorCode.INVALID,
    errno.EBUSY: AgentErrorCode.BUSY,
    errno.ETXTBSY: AgentErrorCode.BUSY,
    errno.EMFILE: AgentErrorCode.BUSY,
    errno.ENFILE: AgentErrorCode.BUSY,
}


def from_oserror(exc: OSError, path: str | None = None) -> AgentError:
    """Translate ``exc`` (from an operation on ``path``) into an :class:`AgentError`."""
    code = _CODES.get(exc.errno or 0, AgentErrorCode.INTERNAL)
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOTEMPTY:
        reason = "directory not empty"
    message = f"{path}: {reason}" if path is not None else reason
    return AgentError(code, message)


def short_repr(value: object, limit: int = 80) -> str:
    """``repr`` of a client-supplied value, cut short: error frames must stay far below the header limit."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
