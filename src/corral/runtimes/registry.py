"""Lazy registry of runtimes by name ("module:Class" strings, as uvicorn does for apps).

Importing a runtime module only when it is asked for keeps start-up fast and lets a host without runsc or QEMU
use the others.
"""

from __future__ import annotations

import importlib
from typing import cast

from corral.errors import InvalidRequest
from corral.runtimes.base import Runtime, RuntimeConfig

__all__ = ["RUNTIMES", "load_runtime"]

RUNTIMES: dict[str, str] = {
    "namespace": "corral.runtimes.namespace:NamespaceRuntime",
    "gvisor": "corral.runtimes.gvisor:GVisorRuntime",
    "microvm": "corral.runtimes.microvm.runtime:MicroVMRuntime",
    "fake": "corral.runtimes.fake:FakeRuntime",
}


def load_runtime(name: str, config: RuntimeConfig, *, enabled: tuple[str, ...] | None = None) -> Runtime:
    choices = [n for n in RUNTIMES if enabled is None or n in enabled]
    if name not in choices:
        raise InvalidRequest(
            f"unknown isolation {name!r}; choose one of: {', '.join(choices)}", details={"choices": choices}
        )
    module_name, _, attr = RUNTIMES[name].partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    return cast(Runtime, cls(config))
