"""The ``hello`` the agent sends on every connection (and answers the ``hello`` op with).

Kept apart and import-light: in stdio mode ``__main__`` sends it before importing the rest of the agent.
"""

from __future__ import annotations

import os

from corral.agent import AGENT_VERSION
from corral.protocol.messages import PROTOCOL_VERSION

TYPE_CHECKING = False  # typing is not imported at run time: this module is on the time-to-hello path
if TYPE_CHECKING:
    from typing import Any

__all__ = ["CAPABILITIES", "hello_fields"]

# Ops, plus optional features a client may probe for: "list.stream" (``list`` with ``stream:true`` sends
# ``chunk`` frames with ``entries``), "write.abort" (``data`` with ``abort:true`` cancels an upload).
CAPABILITIES = (
    "exec",
    "attach",
    "detach",
    "stdin",
    "signal",
    "list_processes",
    "configure",
    "restored",
    "read",
    "write",
    "list",
    "stat",
    "mkdir",
    "remove",
    "rename",
    "list.stream",
    "write.abort",
    "port.connect",
)


def hello_fields() -> dict[str, Any]:
    return {
        "version": PROTOCOL_VERSION,
        "capabilities": list(CAPABILITIES),
        "agent": f"corral-agent/{AGENT_VERSION}",
        "pid": os.getpid(),
    }
