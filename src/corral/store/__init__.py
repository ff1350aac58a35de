"""Store implementations: memory (tests), SQLite (the embedded default), PostgreSQL (servers).

``open_store`` picks one from the settings; everything else receives the store as an argument.
``open_service`` wires the whole stack below the server for one host (store + lazily loaded runtimes); the
server and the SDK's embedded mode both start from it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from corral.core.service import SandboxService
from corral.core.settings import Settings
from corral.errors import InvalidRequest
from corral.runtimes.base import Runtime, RuntimeConfig
from corral.runtimes.registry import load_runtime

if TYPE_CHECKING:
    from corral.store.postgres import PostgresStore
    from corral.store.sqlite import SqliteStore

__all__ = ["open_service", "open_store"]


def open_store(settings: Settings) -> SqliteStore | PostgresStore:
    url = settings.database_url
    if url is None:
        from corral.store.sqlite import SqliteStore

        return SqliteStore(settings.db_path)
    if url.startswith(("postgresql://", "postgres://")):
        from corral.store.postgres import PostgresStore

        return PostgresStore(url)
    raise InvalidRequest("CORRAL_DATABASE_URL must be a postgresql:// URL (or unset for the SQLite default)")


def open_service(settings: Settings, *, clock: Callable[[], float] = time.time) -> SandboxService:
    """The service for this host: the configured store, runtimes loaded lazily by name and cached."""
    config = RuntimeConfig(state_root=settings.state_root, cache_root=settings.cache_root)
    runtimes: dict[str, Runtime] = {}

    def runtime_for(name: str) -> Runtime:
        if name not in runtimes:
            runtimes[name] = load_runtime(name, config, enabled=settings.enabled_runtimes)
        return runtimes[name]

    return SandboxService(settings=settings, store=open_store(settings), runtime_for=runtime_for, clock=clock)
