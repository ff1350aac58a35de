"""Sandbox states and the one table of allowed transitions.

Every operation starts with :func:`require_state`, so "what may happen when" lives here and nowhere else.
Warm-pool membership is not a state (it is a field); desired and observed state are kept apart: the record
holds what Corral decided, :meth:`Runtime.inspect` says what the host shows, and the reaper reconciles them.
"""

from __future__ import annotations

from enum import StrEnum

from corral.errors import InvalidState
from corral.models import SandboxState

__all__ = ["Action", "SandboxState", "require_state", "transition"]


class Action(StrEnum):
    EXEC = "run commands in"
    FILES = "use files of"
    PAUSE = "pause"
    RESUME = "resume"
    KILL = "kill"
    SET_TIMEOUT = "change the timeout of"
    CONNECT = "connect to"
    SNAPSHOT = "snapshot"
    FORK = "fork"
    PORTS = "open a port of"
    NETWORK = "change the network of"


_S = SandboxState
_TRANSITIONS: dict[SandboxState, frozenset[SandboxState]] = {
    _S.CREATING: frozenset({_S.RUNNING, _S.STOPPED}),
    _S.RUNNING: frozenset({_S.PAUSED, _S.STOPPED}),
    _S.PAUSED: frozenset({_S.RUNNING, _S.STOPPED}),
    _S.STOPPED: frozenset(),
}

_HINTS = {
    _S.PAUSED: "resume it first",
    _S.STOPPED: "create a new sandbox",
    _S.CREATING: "wait until it is running",
}


def require_state(state: SandboxState, action: Action, *allowed: SandboxState, sandbox_id: str = "") -> None:
    """Raise :class:`InvalidState` with an actionable message unless ``state`` is one of ``allowed``."""
    if state in allowed:
        return
    hint = _HINTS.get(state, "")
    what = f"sandbox {sandbox_id}" if sandbox_id else "the sandbox"
    raise InvalidState(
        f"cannot {action.value} {what}: it is {state.value}" + (f"; {hint}" if hint else ""),
        details={"state": state.value},
    )


def transition(current: SandboxState, new: SandboxState) -> SandboxState:
    if new not in _TRANSITIONS[current]:
        raise InvalidState(f"a sandbox cannot go from {current.value} to {new.value}")
    return new
