"""The store protocol: transactions over SQLite or PostgreSQL.

Everything the gateway records — keys, clients, users, sessions, idempotency records, the audit
chain (and, later, the ledger) — is written by plain functions that take a :class:`Tx`. A
function runs inside one transaction: the check and the record it allows commit together or not
at all. SQL is written once with ``?`` placeholders in the subset both engines share; each
implementation adapts placeholders and supplies its own locking. :func:`gateway.ledger.engines.open_database`
opens the one a DSN names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from gateway.errors import GatewayError

T = TypeVar("T")

Row = Mapping[str, Any]
Params = Sequence[Any]


class Tx(Protocol):
    """One open transaction."""

    dialect: str
    """``sqlite`` or ``postgresql``: for the rare statement that differs."""

    def execute(self, sql: str, params: Params = ()) -> int:
        """Run a statement. Returns the number of rows it changed.

        Raises:
            AlreadyExists: a unique constraint was violated.
            StoreUnavailable: the database is unreachable or locked for too long.
        """
        ...

    def queue(self, sql: str, params: Params = (), on_conflict: GatewayError | None = None) -> None:
        """Run a statement whose outcome the caller does not read, and that cannot fail but for the
        store itself (an insert under a fresh random id, an upsert, an insert whose key a lock
        protects) — or, with ``on_conflict``, but for a unique constraint. PostgreSQL sends it with the
        next statement instead of waiting for it (pipeline mode): one round trip fewer. If it does
        fail, the next statement or the commit raises ``on_conflict`` (a unique violation, when given)
        or StoreUnavailable saying so — never the AlreadyExists of another statement. SQLite runs it
        at once (and raises ``on_conflict`` for a unique violation, when given).
        """
        ...

    def fetchone(self, sql: str, params: Params = (), *, then_commit: bool = False) -> Row | None:
        """Run a query and return its first row, or None.

        ``then_commit``: the transaction ends with this statement, and nothing may follow it. PostgreSQL
        sends ``COMMIT`` right behind it, so that the statement's answer and the commit's come back in one
        round trip and the locks it takes are released without waiting for the gateway to read the answer
        (a check that refuses must then abort the transaction itself: :class:`~gateway.errors.ServerRefused`).
        In a read transaction it ends the read the same way: a one-statement read costs one round trip.
        SQLite commits (or, for a read, rolls back) when the function returns, as always.
        """
        ...

    def fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        """Run a query and return every row."""
        ...

    def lock(self, name: str) -> None:
        """Serialise this transaction with every other one that locks ``name``, until commit.

        SQLite write transactions are serial already (``BEGIN IMMEDIATE``); PostgreSQL takes
        ``pg_advisory_xact_lock``.
        """
        ...


class Database(Protocol):
    """A connection pool that runs functions in transactions off the event loop."""

    dsn: str

    async def write(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn`` in a read-write transaction and commit; roll back if it raises.

        Raises:
            StoreUnavailable: the database cannot be reached or stays locked.
            GatewayError: whatever ``fn`` raises, after rollback.
        """
        ...

    async def read(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn`` in a read-only transaction (a consistent snapshot)."""
        ...

    async def migrate(self, progress: Callable[[int, int], None] | None = None) -> list[str]:
        """Apply the migrations not yet applied, telling ``progress`` (applied, to apply) as they go.
        Returns the names applied now."""
        ...

    async def ping(self) -> bool:
        """True if a trivial query succeeds."""
        ...

    async def close(self) -> None:
        """Close every connection."""
        ...
