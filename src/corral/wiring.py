"""The composition root: one host's Corral stack (store, runtimes, service) made from its Settings.

The server (:func:`corral.server.app.create_app`) and the SDK's embedded mode both start here; nothing below
this module reads Settings to decide what to build. The store comes from :func:`corral.store.open_store`;
each runtime is loaded by name from the registry when first asked for, with a :class:`RuntimeConfig` (state
and cache roots, this node's id) and its ``[runtime.<name>]`` table from the settings, then cached.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from corral.core.service import SandboxService
from corral.core.settings import Settings
from corral.errors import InvalidRequest
from corral.runtimes.base import Runtime, RuntimeConfig
from corral.runtimes.registry import RUNTIMES, check_options, load_runtime, served_levels
from corral.store import open_store

__all__ = ["open_service", "runtime_loader"]


def runtime_loader(settings: Settings) -> Callable[[str], Runtime]:
    """An isolation level → Runtime function for the enabled levels, each runtime made once with its own
    options (all the ``[runtime.<name>]`` tables are checked now). A level is the runtime of that name, or the
    runtime whose ``serves`` names it (kubernetes serving "gvisor" and "kata-fc"): several levels, one runtime."""
    check_options(settings.runtime_options)
    served = served_levels(settings.runtime_options)
    enabled = settings.enabled_runtimes
    for level in enabled:
        if level not in RUNTIMES and level not in served:
            raise InvalidRequest(
                f"[runtime] enabled names {level!r}, which is no runtime (runtimes: {', '.join(RUNTIMES)}) and"
                " no runtime serves (e.g. [runtime.kubernetes] serves = [...] for RuntimeClasses)"
            )
    config = RuntimeConfig(
        state_root=settings.state_root,
        cache_root=settings.cache_root,
        node=settings.node,
        egress=settings.egress,
    )
    runtimes: dict[str, Runtime] = {}

    def runtime_for(level: str) -> Runtime:
        if level not in enabled:
            raise InvalidRequest(
                f"unknown isolation {level!r}; choose one of: {', '.join(enabled)}",
                details={"choices": list(enabled)},
            )
        name = served.get(level, level)
        if name not in runtimes:
            runtimes[name] = load_runtime(name, config, options=settings.options_for(name))
        return runtimes[name]

    return runtime_for


def open_service(settings: Settings, *, clock: Callable[[], float] = time.time) -> SandboxService:
    """The service for this host: the configured store and the enabled runtimes (loaded lazily)."""
    return SandboxService(
        settings=settings, store=open_store(settings), runtime_for=runtime_loader(settings), clock=clock
    )
