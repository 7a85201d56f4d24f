"""Opening the store a DSN names: SQLite (:mod:`gateway.ledger.sqlite`) or PostgreSQL
(:mod:`gateway.ledger.postgres`), both behind the :class:`~gateway.ledger.store.Database` protocol.

Kept apart from :mod:`gateway.ledger.store` because the engines import the protocol's types: the
protocol stays at the bottom, this module above both engines.
"""

from __future__ import annotations

from gateway.errors import ConfigError
from gateway.ledger.sqlite import SqliteDatabase
from gateway.ledger.store import Database


async def open_database(dsn: str, pool_size: int | None = None) -> Database:
    """Open the store a DSN names: ``sqlite:///path`` or ``postgresql://…``.

    ``pool_size``: PostgreSQL connections (and threads running transactions); None = the store's
    default. SQLite has one writer and one reader connection whatever it says.

    Raises:
        ConfigError: an unknown scheme.
        StoreUnavailable: the database cannot be opened.
    """
    if dsn.startswith("sqlite://"):
        return await SqliteDatabase.open(dsn)
    if dsn.startswith(("postgresql://", "postgres://")):
        try:
            # Start-up cost: psycopg and its pool load only for a PostgreSQL DSN, and a missing or broken
            # psycopg becomes a ConfigError naming the store, not an ImportError for every command.
            from gateway.ledger.postgres import (  # type: ignore[import-not-found,unused-ignore]
                POOL_SIZE,
                PostgresDatabase,
            )
        except ImportError as exc:
            raise ConfigError(f"PostgreSQL store not available ({exc}); a PostgreSQL store needs the 'postgres' "
                              "extra: pip install 'ecny-gateway[postgres]'") from exc
        database: Database = await PostgresDatabase.open(dsn, size=POOL_SIZE if pool_size is None else pool_size)
        return database
    raise ConfigError(f"store.dsn {dsn!r}: use sqlite:///path or postgresql://...")
