"""Store implementations: memory (tests), SQLite (the embedded default), PostgreSQL (servers).

``open_store`` picks one from the settings; everything else receives the store as an argument. The whole
stack of one host (store + runtimes + service) is wired above this, in :mod:`corral.wiring`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from corral.core.settings import Settings
from corral.errors import InvalidRequest

if TYPE_CHECKING:
    from corral.store.postgres import PostgresStore
    from corral.store.sqlite import SqliteStore

__all__ = ["open_store"]


def open_store(settings: Settings) -> SqliteStore | PostgresStore:
    url = settings.database_url
    if url is None:
        from corral.store.sqlite import SqliteStore

        return SqliteStore(settings.db_path)
    if url.startswith(("postgresql://", "postgres://")):
        from corral.store.postgres import PostgresStore

        return PostgresStore(url)
    raise InvalidRequest("CORRAL_DATABASE_URL must be a postgresql:// URL (or unset for the SQLite default)")
