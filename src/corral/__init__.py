"""Corral: sandboxes for AI agents.

    from corral import Sandbox
    with Sandbox.create(isolation="gvisor") as sbx:
        print(sbx.commands.run("python3 -c 'print(6*7)'").stdout)

The public surface is exactly ``__all__`` (a test pins it). Names load on first use, so importing a
submodule (the shim imports ``corral.protocol``) does not pull in the SDK.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs every shim start-up ~4 ms

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "Sandbox": "corral.client._sync.sandbox",
    "CommandHandle": "corral.client._sync.sandbox",
    "AsyncSandbox": "corral.client._async.sandbox",
    "AsyncCommandHandle": "corral.client._async.sandbox",
    "PtyHandle": "corral.client._sync.pty",
    "AsyncPtyHandle": "corral.client._async.pty",
    "WatchHandle": "corral.client._sync.watch",
    "AsyncWatchHandle": "corral.client._async.watch",
    "FilesystemEvent": "corral.models",
    "FilesystemEventType": "corral.models",
    "CommandResult": "corral.models",
    "EntryInfo": "corral.models",
    "EventKind": "corral.models",
    "ProcessEvent": "corral.models",
    "ProcessInfo": "corral.models",
    "ResourceSample": "corral.models",
    "SandboxInfo": "corral.models",
    "SandboxState": "corral.models",
    "CorralError": "corral.errors",
    "CommandFailed": "corral.errors",
    "InvalidRequest": "corral.errors",
    "InvalidState": "corral.errors",
    "NotFound": "corral.errors",
    "PermissionDenied": "corral.errors",
    "ResourceExhausted": "corral.errors",
    "RuntimeUnavailable": "corral.errors",
    "Timeout": "corral.errors",
}

__all__ = [
    "AsyncCommandHandle",
    "AsyncPtyHandle",
    "AsyncSandbox",
    "AsyncWatchHandle",
    "CommandFailed",
    "CommandHandle",
    "CommandResult",
    "CorralError",
    "EntryInfo",
    "EventKind",
    "FilesystemEvent",
    "FilesystemEventType",
    "InvalidRequest",
    "InvalidState",
    "NotFound",
    "PermissionDenied",
    "ProcessEvent",
    "ProcessInfo",
    "PtyHandle",
    "ResourceExhausted",
    "ResourceSample",
    "RuntimeUnavailable",
    "Sandbox",
    "SandboxInfo",
    "SandboxState",
    "Timeout",
    "WatchHandle",
]
assert set(__all__) == set(_EXPORTS)

if TYPE_CHECKING:
    from typing import Any

    from corral.client._async.pty import AsyncPtyHandle
    from corral.client._async.sandbox import AsyncCommandHandle, AsyncSandbox
    from corral.client._async.watch import AsyncWatchHandle
    from corral.client._sync.pty import PtyHandle
    from corral.client._sync.sandbox import CommandHandle, Sandbox
    from corral.client._sync.watch import WatchHandle
    from corral.errors import (
        CommandFailed,
        CorralError,
        InvalidRequest,
        InvalidState,
        NotFound,
        PermissionDenied,
        ResourceExhausted,
        RuntimeUnavailable,
        Timeout,
    )
    from corral.models import (
        CommandResult,
        EntryInfo,
        EventKind,
        FilesystemEvent,
        FilesystemEventType,
        ProcessEvent,
        ProcessInfo,
        ResourceSample,
        SandboxInfo,
        SandboxState,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'corral' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
