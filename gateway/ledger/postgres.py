"""PostgreSQL store (``postgresql://user@host:port/dbname``), for more than one gateway process.

A pool of psycopg 3 connections and a thread pool of the same size: each transaction function runs
in one worker thread on one connection, as with SQLite, so the shared transaction functions stay
synchronous. Write transactions are ``READ COMMITTED`` (each statement sees what committed before
it, so a function that takes :meth:`PostgresTx.lock` first then reads the latest state); reads are
``REPEATABLE READ READ ONLY`` so that a multi-query read such as the audit verifier sees one
snapshot. :meth:`PostgresTx.lock` takes ``pg_advisory_xact_lock``, which serialises transactions
across every process on the same database and is released at commit or rollback.

Unlike SQLite, PostgreSQL aborts the whole transaction when a statement fails: a function that
catches :class:`~gateway.errors.AlreadyExists` must not run further statements in the same
transaction; it can only raise (and so roll back) or return.

Round trips: a transaction runs in pipeline mode from ``BEGIN`` to ``COMMIT``; ``BEGIN`` and the
statements nobody reads the answer of (:meth:`PostgresTx.queue`, and the advisory locks) travel with
the next statement that is read, or with the ``COMMIT`` — one round trip per answer read, plus the
``COMMIT``'s. The hot paths read one answer: a transfer, a cash-in or cash-out and a device load are
checked and posted by one server-side function each (migration 0016), so their transaction costs two
round trips (docs/scaling.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from gateway.errors import AlreadyExists, ConfigError, GatewayError, StoreUnavailable
from gateway.ledger.migrate import MigrationProgress, apply_migrations
from gateway.ledger.store import Params, Row

T = TypeVar("T")

POOL_SIZE = 8
CONNECT_TIMEOUT_S = 5
ACQUIRE_TIMEOUT_S = 10.0
"""How long a transaction waits for a free connection (or for the server to come back)."""
LOCK_TIMEOUT_MS = 10_000
"""How long a statement waits for a lock (``lock_timeout``), like SQLite's busy timeout."""
PING_TIMEOUT_S = 2.0

_BEGIN_WRITE = "BEGIN ISOLATION LEVEL READ COMMITTED READ WRITE"
_BEGIN_READ = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"

_UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError)
"""Connection lost or refused, pool timeout, lock timeout, serialisation failure, server shutdown."""

PgConnection = psycopg.Connection[dict[str, Any]]


@functools.lru_cache(maxsize=1024)
def _adapt(sql: str) -> str:
    """The shared SQL with psycopg's placeholders: ``?`` becomes ``%s``, a literal ``%`` becomes ``%%``."""
    return sql.replace("%", "%%").replace("?", "%s")


def lock_key(name: str) -> int:
    """The advisory-lock key of a lock name: the first 8 bytes of its SHA-256, as a signed 64-bit int."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big", signed=True)


def _integrity_detail(exc: psycopg.IntegrityError) -> str:
    diag = exc.diag
    where = f" on {diag.table_name}" if diag.table_name else ""
    if isinstance(exc, pg_errors.UniqueViolation):
        return f"already exists: unique constraint {diag.constraint_name or '?'}{where}"
    # The SQLite store reports every integrity error as AlreadyExists too; name the constraint, never the values.
    return f"constraint {diag.constraint_name or '?'}{where} violated ({diag.sqlstate})"


def _unavailable(exc: Exception) -> StoreUnavailable:
    return StoreUnavailable(f"PostgreSQL: {_error_text(exc)}")


class PostgresTx:
    """A transaction on one PostgreSQL connection (see :class:`gateway.ledger.store.Tx`), in psycopg's
    pipeline mode from ``BEGIN`` to ``COMMIT``.

    Nothing is waited for until an answer is read: ``BEGIN`` travels with the first statement, a
    queued statement (:meth:`queue`, :meth:`lock`) is sent at once but not waited for, and travels with
    the next statement whose answer the caller reads (:meth:`execute`, :meth:`fetchone`,
    :meth:`fetchall`) or with the ``COMMIT`` — so a transaction costs one round trip per answer read,
    plus the ``COMMIT``'s (:attr:`round_trips` counts them). PostgreSQL runs them in the order sent, so a
    queued advisory lock is held before the next statement takes its snapshot. When an answer fails,
    the statements queued before it are checked first: a queued statement's failure is reported as its
    ``on_conflict`` error (a unique violation, when it has one) or as :class:`StoreUnavailable` naming it
    as queued, never as the ``AlreadyExists`` of the statement the caller is waiting for (which it may
    be catching).
    """

    dialect = "postgresql"

    def __init__(self, connection: PgConnection, begin: str) -> None:
        self._connection = connection
        stack = contextlib.ExitStack()
        self._sync: Callable[[], None] = stack.enter_context(connection.pipeline()).sync
        self._pipeline: contextlib.ExitStack | None = stack
        self._queued: list[_Queued] = []
        self._cursor: psycopg.Cursor[dict[str, Any]] | None = None  # for statements whose answer is read
        self.round_trips = 0
        """Answers waited for so far (the ``COMMIT``'s included)."""
        self.answered = False
        """Whether the server has answered anything yet (before that, nothing of this transaction ran)."""
        self.ended = False
        """Whether ``COMMIT`` (or ``ROLLBACK``) was sent."""
        self.skipped = False
        """Whether a failure made PostgreSQL skip statements sent behind it (see :meth:`_note_skipped`)."""
        self.queue(begin)

    def _send(self, sql: str, params: Params, cursor: psycopg.Cursor[dict[str, Any]] | None = None
              ) -> psycopg.Cursor[dict[str, Any]]:
        """Send a statement on ``cursor`` (a new one if None), without waiting. psycopg also reads
        whatever answers have arrived, so an error here can be a queued one's."""
        try:
            # Always pass a sequence (even empty): psycopg only unescapes ``%%`` when given parameters.
            if cursor is None:
                return self._connection.execute(_adapt(sql), tuple(params))
            return cursor.execute(_adapt(sql), tuple(params))
        except psycopg.Error as exc:
            self._note_skipped(self._queued)
            _raise_attributed(exc, self._queued)

    def _note_skipped(self, queued: list[_Queued]) -> None:
        """After a failure: did PostgreSQL skip statements sent behind the failing one? psycopg (3.3)
        then believes statements it prepared in that batch exist on the server ("prepared statement
        _pg3_N does not exist" on the connection's next use), so the connection must not be reused."""
        if any(item.cursor.pgresult is None for item in queued):
            self.skipped = True

    def _sync_checked(self, sync: Callable[[], None], queued: list[_Queued]) -> None:
        try:
            sync()
        except psycopg.Error as exc:
            self._note_skipped(queued)
            _raise_attributed(exc, queued)

    def _run(self, sql: str, params: Params) -> psycopg.Cursor[dict[str, Any]]:
        """Send a statement and wait for its answer (and for everything queued before it). One
        cursor serves all of them: its answer is read before the next is sent (a queued statement
        needs a cursor of its own, its answer arrives later)."""
        if self._cursor is None:
            self._cursor = self._connection.cursor()
        cursor = self._send(sql, params, self._cursor)
        self._synchronise()
        return cursor

    def _synchronise(self) -> None:
        queued, self._queued = self._queued, []
        self.round_trips += 1
        self._sync_checked(self._sync, queued)
        self.answered = True

    def execute(self, sql: str, params: Params = ()) -> int:
        return self._run(sql, params).rowcount

    def queue(self, sql: str, params: Params = (), on_conflict: GatewayError | None = None) -> None:
        self._queued.append(_Queued(self._send(sql, params), on_conflict))

    def fetchone(self, sql: str, params: Params = ()) -> Row | None:
        cursor = self._run(sql, params)
        try:
            return cursor.fetchone()
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc

    def fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        cursor = self._run(sql, params)
        try:
            rows: list[Any] = cursor.fetchall()
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc
        return rows

    def lock(self, name: str) -> None:
        """Take the transaction-scoped advisory lock :func:`lock_key` derives from ``name``.

        Queued: the lock is taken, in order, before the next statement runs. Waits at most
        ``lock_timeout`` (:data:`LOCK_TIMEOUT_MS`), then the next statement raises StoreUnavailable.
        """
        self.queue("SELECT pg_advisory_xact_lock(?::bigint)", (lock_key(name),))

    def end(self, statement: str) -> None:
        """``COMMIT`` (or ``ROLLBACK``), with whatever is still queued, and the Sync that leaves pipeline
        mode: one round trip."""
        stack, queued = self._pipeline, self._queued
        self.ended = True
        self._send(statement, ())
        if stack is not None:
            self._pipeline, self._queued = None, []
            self.round_trips += 1
            self._sync_checked(stack.close, queued)

    def commit(self) -> None:
        """``COMMIT`` (see :meth:`end`)."""
        self.end("COMMIT")

    def leave_pipeline(self) -> None:
        """Back to normal mode after a failure (what was still queued is dropped with its errors;
        the caller rolls the transaction back)."""
        stack, self._pipeline, self._queued = self._pipeline, None, []
        if stack is not None:
            with contextlib.suppress(psycopg.Error):
                stack.close()


@dataclass(frozen=True)
class _Queued:
    """A statement sent but not waited for, and the error its unique violation means (if it has one)."""

    cursor: psycopg.Cursor[dict[str, Any]]
    on_conflict: GatewayError | None = None


def _raise_attributed(exc: psycopg.Error, queued: list[_Queued]) -> NoReturn:
    """Raise ``exc`` as the store's error, saying whose failure it is: a statement still queued
    (its cursor has no answer: the failing one is the first such, and PostgreSQL skipped everything
    after it), or the statement the caller is waiting for."""
    failed = next((item for item in queued if item.cursor.pgresult is None), None)
    if failed is not None:
        if failed.on_conflict is not None and isinstance(exc, pg_errors.UniqueViolation):
            raise failed.on_conflict from exc
        raise StoreUnavailable(f"PostgreSQL: a queued statement failed: {_error_text(exc)}") from exc
    if isinstance(exc, psycopg.IntegrityError):
        raise AlreadyExists(_integrity_detail(exc)) from exc
    if isinstance(exc, _UNAVAILABLE):
        raise _unavailable(exc) from exc
    raise exc


def _error_text(exc: Exception) -> str:
    """An error's message on one line; for a constraint, its name and table (never the values)."""
    if isinstance(exc, psycopg.IntegrityError):
        return _integrity_detail(exc)
    return " ".join(str(exc).split()) or type(exc).__name__


def _conninfo(dsn: str) -> dict[str, Any]:
    try:
        return conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        # The parser quotes the whole DSN, password included: leave it out.
        raise ConfigError("store DSN is not a valid PostgreSQL connection string") from exc


def describe(dsn: str) -> str:
    """``user@host:port/dbname`` for messages and logs: never the password."""
    params = _conninfo(dsn)
    user = f"{params['user']}@" if params.get("user") else ""
    host = params.get("host") or params.get("hostaddr") or "localhost"
    port = f":{params['port']}" if params.get("port") else ""
    return f"{user}{host}{port}/{params.get('dbname', '')}"


def _configure(connection: PgConnection) -> None:
    connection.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")


class PostgresDatabase:
    """:class:`gateway.ledger.store.Database` over a pool of PostgreSQL connections."""

    def __init__(self, dsn: str, size: int = POOL_SIZE, acquire_timeout: float = ACQUIRE_TIMEOUT_S) -> None:
        self.dsn = dsn
        self.size = size
        self.acquire_timeout = acquire_timeout
        params = _conninfo(dsn)
        kwargs: dict[str, Any] = {"autocommit": True, "row_factory": dict_row}  # psycopg 3 loads BYTEA as bytes
        if "connect_timeout" not in params:
            kwargs["connect_timeout"] = CONNECT_TIMEOUT_S
        self._connect_kwargs = kwargs
        self._pool: ConnectionPool[PgConnection] = ConnectionPool(
            dsn,
            connection_class=psycopg.Connection[dict[str, Any]],
            kwargs=kwargs,
            min_size=1,
            max_size=size,
            open=False,
            configure=_configure,
            timeout=acquire_timeout,
            name="gateway-store",
        )
        self._threads = ThreadPoolExecutor(size, thread_name_prefix="postgres")
        self._closed = False

    def __repr__(self) -> str:
        return f"PostgresDatabase({describe(self.dsn)!r})"

    @classmethod
    async def open(
        cls, dsn: str, size: int = POOL_SIZE, acquire_timeout: float = ACQUIRE_TIMEOUT_S
    ) -> PostgresDatabase:
        """Connect once to check the server is there, then open the pool.

        Args:
            dsn: ``postgresql://user[:password]@host[:port]/dbname[?param=value]`` (libpq syntax).
            size: connections in the pool, and threads running transactions.
            acquire_timeout: how long a transaction waits for a connection before StoreUnavailable.

        Raises:
            ConfigError: the DSN does not parse.
            StoreUnavailable: the server cannot be reached or refuses the connection.
        """
        database = cls(dsn, size, acquire_timeout)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(database._threads, database._open_pool)
        except BaseException:
            database._threads.shutdown(wait=False)
            raise
        return database

    def _open_pool(self) -> None:
        where = describe(self.dsn)
        password = str(_conninfo(self.dsn).get("password") or "")
        try:
            probe = psycopg.connect(self.dsn, **self._connect_kwargs)
        except psycopg.Error as exc:
            reason = " ".join(str(exc).split())
            if password:
                reason = reason.replace(password, "***")
            raise StoreUnavailable(f"cannot connect to PostgreSQL at {where}: {reason}") from exc
        probe.close()
        try:
            self._pool.open(wait=True, timeout=self.acquire_timeout)
        except psycopg.Error as exc:
            self._pool.close()
            raise StoreUnavailable(f"cannot open a connection pool to PostgreSQL at {where}") from exc

    def _run(self, writable: bool, fn: Callable[[PostgresTx], T], timeout: float) -> T:
        """Run ``fn`` in a transaction on a pooled connection, and commit (or, for a read, roll back).

        ``BEGIN`` only travels with the first statement, so a connection the server dropped while it
        sat in the pool (a restart, a failover, an idle timeout) fails there, before anything of the
        transaction ran: it is discarded and ``fn`` run again on the next one, so that one transaction
        does not fail for each dead connection left in the pool. ``fn`` must therefore be safe to run
        again from the start (it is: it only computes and talks to the store until its first answer).
        Never after its ``COMMIT`` was sent: whether that committed is then unknown.
        """
        deadline = time.monotonic() + timeout
        failure: Exception | None = None
        for _attempt in range(self.size + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                connection = self._pool.getconn(timeout=remaining)
            except psycopg.Error as exc:
                failure = exc
                break
            tx: PostgresTx | None = None
            try:
                tx = PostgresTx(connection, _BEGIN_WRITE if writable else _BEGIN_READ)
                return self._transaction(tx, connection, writable, fn)
            except Exception as exc:
                if not (connection.broken or connection.closed) or (tx is not None and (tx.answered or tx.ended)):
                    raise
                failure = exc  # a dead connection: nothing ran; try the next one
            finally:
                if tx is not None and tx.skipped:
                    connection.close()
                # A broken (or closed) connection is discarded here, and the pool makes a new one.
                self._pool.putconn(connection)
        reason = " ".join(str(failure).split()) if failure is not None else "timed out"
        raise StoreUnavailable(f"no working PostgreSQL connection within {timeout:g} s: {reason}") from failure

    def _transaction(self, tx: PostgresTx, connection: PgConnection, writable: bool, fn: Callable[[PostgresTx], T]
                     ) -> T:
        try:
            result = fn(tx)
            tx.end("COMMIT" if writable else "ROLLBACK")  # a deferred constraint fails here as AlreadyExists
            return result
        except psycopg.IntegrityError as exc:
            raise AlreadyExists(_integrity_detail(exc)) from exc
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc
        finally:
            tx.leave_pipeline()
            self._rollback_if_open(connection)

    @staticmethod
    def _rollback_if_open(connection: PgConnection) -> None:
        if connection.info.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
            try:
                connection.execute("ROLLBACK")
            except psycopg.Error:
                pass  # the connection is gone; putconn discards it

    async def write(self, fn: Callable[[Any], T]) -> T:
        return await self._call(True, fn, self.acquire_timeout)

    async def read(self, fn: Callable[[Any], T]) -> T:
        return await self._call(False, fn, self.acquire_timeout)

    async def _call(self, writable: bool, fn: Callable[[Any], T], timeout: float) -> T:
        if self._closed:
            raise StoreUnavailable("the PostgreSQL store is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._threads, self._run, writable, fn, timeout)
        except GatewayError:
            raise
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc

    async def migrate(self, progress: MigrationProgress | None = None) -> list[str]:
        return await self.write(lambda tx: apply_migrations(tx, "postgresql", progress))

    async def ping(self) -> bool:
        try:
            await self._call(False, lambda tx: tx.fetchone("SELECT 1"), min(PING_TIMEOUT_S, self.acquire_timeout))
        except GatewayError:
            return False
        return True

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._threads, self._pool.close)
        self._threads.shutdown(wait=True)
