"""PostgreSQL store (``postgresql://user@host:port/dbname``), for more than one gateway process.

A pool of psycopg 3 connections and as many threads (:class:`~gateway.ledger.threads.TransactionThreads`):
each transaction function runs in one thread on one connection, as with SQLite, so the shared transaction functions stay
synchronous. Write transactions are ``READ COMMITTED`` (each statement sees what committed before
it, so a function that takes :meth:`PostgresTx.lock` first then reads the latest state); reads are
``REPEATABLE READ READ ONLY`` so that a multi-query read such as the audit verifier sees one
snapshot. :meth:`PostgresTx.lock` takes ``pg_advisory_xact_lock``, which serialises transactions
across every process on the same database and is released at commit or rollback.

Unlike SQLite, PostgreSQL aborts the whole transaction when a statement fails: a function that
catches :class:`~gateway.errors.AlreadyExists` must not run further statements in the same
transaction; it can only raise (and so roll back) or return.

Round trips: a transaction runs in libpq's pipeline mode from ``BEGIN`` to ``COMMIT`` (sent through
psycopg's libpq binding and C adapters, not its cursors: :class:`PostgresTx`); ``BEGIN`` and the
statements nobody reads the answer of (:meth:`PostgresTx.queue`, and the advisory locks) travel with
the next statement that is read, or with the ``COMMIT`` — one round trip per answer read, plus the
``COMMIT``'s. The hot paths read one answer: a transfer, a cash-in or cash-out and a device load are
checked and posted by one server-side function each (migration 0016), so their transaction costs two
round trips (docs/scaling.md).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import select
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg import pq
from psycopg.adapt import PyFormat, Transformer
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import ExecStatus, TransactionStatus
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from gateway.errors import (
    AlreadyExists,
    ConfigError,
    GatewayError,
    ServerRefused,
    StoreUnavailable,
    TextNotStorable,
)
from gateway.ledger.migrate import MigrationProgress, apply_migrations
from gateway.ledger.store import Params, Row
from gateway.ledger.threads import TransactionThreads

T = TypeVar("T")

POOL_SIZE = 8
CONNECT_TIMEOUT_S = 5
ACQUIRE_TIMEOUT_S = 10.0
"""How long a transaction waits for a free connection (or for the server to come back)."""
LOCK_TIMEOUT_MS = 10_000
"""How long a statement waits for a lock (``lock_timeout``), like SQLite's busy timeout."""
PING_TIMEOUT_S = 2.0
PREPARE_THRESHOLD = 2
"""A statement is prepared on a connection the second time it is sent there (psycopg's default is 5)."""
MAX_PREPARED = 256
"""Statements prepared per connection at most; the rest are sent unnamed."""
SERVER_REFUSAL_CLASS = "EC"
"""The SQLSTATE class of the refusals our PostgreSQL functions raise (:class:`~gateway.errors.ServerRefused`)."""
MAX_PREPARED_LENGTH = 4096
MAX_PREPARED_PARAMS = 50

_BEGIN_WRITE = "BEGIN ISOLATION LEVEL READ COMMITTED READ WRITE"
_BEGIN_READ = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"

_UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError)
"""Connection lost or refused, pool timeout, lock timeout, serialisation failure, server shutdown."""



@functools.lru_cache(maxsize=1024)
def _adapt(sql: str) -> tuple[bytes, int]:
    """The shared SQL with PostgreSQL's placeholders (the n-th ``?`` becomes ``$n``), and their number."""
    parts = sql.split("?")
    text = parts[0] + "".join(f"${n}{part}" for n, part in enumerate(parts[1:], start=1))
    return text.encode("utf-8"), len(parts) - 1


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


class StoreConnection(psycopg.Connection[dict[str, Any]]):
    """A pooled connection, with the statements :class:`PostgresTx` prepared on it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.statements = PreparedStatements()


StatementKey = tuple[bytes, tuple[int, ...]]
"""A statement as the server parses it: its text and its parameters' type OIDs."""


class PreparedStatements:
    """The statements prepared on one connection.

    A statement is prepared (parsed and planned once, then run by name) the second time it is sent, as
    psycopg does at its own threshold; at most :data:`MAX_PREPARED` per connection, and never a long or
    many-parameter one (a multi-row insert of varying length would fill the cache with one-offs).
    """

    def __init__(self) -> None:
        self.names: dict[StatementKey, bytes] = {}
        self.seen: dict[StatementKey, int] = {}
        self.made = 0

    def name_for(self, key: StatementKey) -> tuple[bytes | None, bool]:
        """The statement's name (None: send it unnamed) and whether it must be prepared first."""
        name = self.names.get(key)
        if name is not None:
            return name, False
        if len(key[0]) > MAX_PREPARED_LENGTH or len(key[1]) > MAX_PREPARED_PARAMS or len(self.names) >= MAX_PREPARED:
            return None, False
        seen = self.seen.get(key, 0) + 1
        if seen < PREPARE_THRESHOLD:
            if len(self.seen) >= 4 * MAX_PREPARED:
                self.seen.clear()
            self.seen[key] = seen
            return None, False
        self.seen.pop(key, None)
        self.made += 1
        name = f"_ecny_{self.made}".encode()
        self.names[key] = name  # taken back by forget() if the server did not prepare it
        return name, True

    def forget(self, key: StatementKey) -> None:
        """The server did not prepare it (its batch failed first): send it unnamed until it is prepared."""
        self.names.pop(key, None)


@dataclass(frozen=True)
class _Sent:
    """A message sent in the current batch, whose answer is read at the next sync (in the order sent)."""

    read: bool
    """The caller waits for this statement's answer (:meth:`PostgresTx.fetchone` and the like)."""
    on_conflict: GatewayError | None = None
    prepares: StatementKey | None = None
    """This message prepares that statement: it is not one of the caller's."""
    ends: bool = False
    """The ``COMMIT`` or ``ROLLBACK``: its failure (a deferred constraint) is the transaction's, not a queued one's."""


class PostgresTx:
    """A transaction on one PostgreSQL connection (see :class:`gateway.ledger.store.Tx`), in libpq's
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

    The messages are sent and read with psycopg's libpq binding (``psycopg.pq``) and its C adapters
    (``Transformer``), not through cursors: psycopg's pipeline runs each message through Python
    generators, which cost about 3.5× the CPU of the same batch sent this way (``bench/pg_pipeline.py``;
    the results are the same: ``tests/integration/test_store.py`` runs one transaction each way).
    """

    dialect = "postgresql"

    def __init__(self, connection: StoreConnection, begin: str) -> None:
        self._pgconn = connection.pgconn
        self._transformer = Transformer(connection)
        self._statements = connection.statements
        self._sent: list[_Sent] = []
        self._poll = select.poll()
        self._pipeline = False
        self.round_trips = 0
        """Answers waited for so far (the ``COMMIT``'s included)."""
        self.answered = False
        """Whether the server has answered anything yet (before that, nothing of this transaction ran)."""
        self.ended = False
        """Whether ``COMMIT`` (or ``ROLLBACK``) was sent."""
        try:
            self._poll.register(self._pgconn.socket, select.POLLIN)
            self._pgconn.enter_pipeline_mode()
        except psycopg.Error as exc:
            raise _unavailable(exc) from exc
        self._pipeline = True
        self.queue(begin)

    # --- sending -------------------------------------------------------------------------------------------

    def _send(self, sql: str, params: Params, sent: _Sent) -> None:
        """Send a statement (prepared first if its time has come), without waiting for its answer."""
        if self.ended:
            raise RuntimeError("a statement after the transaction's COMMIT was sent (fetchone then_commit)")
        query, count = _adapt(sql)
        if len(params) != count:
            raise ValueError(f"the statement has {count} placeholders but {len(params)} parameters")
        pgconn = self._pgconn
        try:
            if params:
                try:
                    values = self._transformer.dump_sequence(params, _auto(len(params)))
                except psycopg.DataError as exc:  # a NUL in a text: bad data, not a store that is down
                    raise TextNotStorable(f"PostgreSQL cannot store this value: {exc}") from None
                types, formats = tuple(self._transformer.types or ()), self._transformer.formats
            else:
                values, types, formats = None, (), None
            key = (query, types)
            name, prepare = self._statements.name_for(key)
            if name is None:
                pgconn.send_query_params(query, values, types or None, formats)
            else:
                if prepare:
                    pgconn.send_prepare(name, query, types or None)
                    self._sent.append(_Sent(False, prepares=key))
                pgconn.send_query_prepared(name, values, formats)
        except psycopg.Error as exc:
            raise _unavailable(exc) from exc
        self._sent.append(sent)

    def queue(self, sql: str, params: Params = (), on_conflict: GatewayError | None = None) -> None:
        self._send(sql, params, _Sent(False, on_conflict))

    def lock(self, name: str) -> None:
        """Take the transaction-scoped advisory lock :func:`lock_key` derives from ``name``.

        Queued: the lock is taken, in order, before the next statement runs. Waits at most
        ``lock_timeout`` (:data:`LOCK_TIMEOUT_MS`), then the next statement raises StoreUnavailable.
        """
        self.queue("SELECT pg_advisory_xact_lock(?::bigint)", (lock_key(name),))

    # --- reading -------------------------------------------------------------------------------------------

    def _run(self, sql: str, params: Params, then_commit: bool = False) -> pq.abc.PGresult:
        """Send a statement and wait for its answer (and for everything queued before it; with
        ``then_commit``, for the ``COMMIT`` sent behind it too)."""
        self._send(sql, params, _Sent(True))
        if then_commit:
            self._send("COMMIT", (), _Sent(False, ends=True))
            self.ended = True
        answer = self._synchronise()
        assert answer is not None
        return answer

    def _synchronise(self) -> pq.abc.PGresult | None:
        """Sync, and read every answer of the batch: the last read statement's result (None if none).

        Raises the first failure of the batch as the store's error, attributed (see the class's docstring).
        """
        sent, self._sent = self._sent, []
        self.round_trips += 1
        pgconn = self._pgconn
        try:
            pgconn.pipeline_sync()
            self._flush()
            answers = self._read_until_sync()
        except psycopg.Error as exc:
            raise _unavailable(exc) from exc
        self.answered = True
        answer: pq.abc.PGresult | None = None
        failure: tuple[_Sent, pq.abc.PGresult] | None = None
        for item, results in zip(sent, answers, strict=True):
            result = results[-1] if results else None
            ok = result is not None and result.status in _SUCCEEDED
            if item.prepares is not None and not ok:
                self._statements.forget(item.prepares)
            if failure is None and result is not None and result.status == ExecStatus.FATAL_ERROR:
                failure = (item, result)
            if item.read and ok:
                answer = result
        if failure is not None:
            item, result = failure
            _raise_attributed(psycopg.errors.error_from_result(result, self._transformer.encoding), item)
        return answer

    def _flush(self) -> None:
        """Send what libpq holds; while the socket is full, read what the server answers meanwhile."""
        pgconn = self._pgconn
        if not pgconn.flush():
            return  # all sent (the usual case: a batch fits the socket's buffer)
        self._poll.modify(pgconn.socket, select.POLLIN | select.POLLOUT)
        while pgconn.flush():
            events = self._poll.poll()
            if any(event & select.POLLIN for _, event in events):
                pgconn.consume_input()
        self._poll.modify(pgconn.socket, select.POLLIN)

    def _read_until_sync(self) -> list[list[pq.abc.PGresult]]:
        """The results of each statement of the batch, in order, up to the sync's."""
        pgconn = self._pgconn
        answers: list[list[pq.abc.PGresult]] = []
        current: list[pq.abc.PGresult] = []
        while True:
            while pgconn.is_busy():
                self._poll.poll()
                pgconn.consume_input()
            result = pgconn.get_result()
            if result is None:  # the end of one statement's results
                answers.append(current)
                current = []
            elif result.status == ExecStatus.PIPELINE_SYNC:
                return answers
            else:
                current.append(result)

    def _rows(self, result: pq.abc.PGresult, first: int, last: int) -> list[Row]:
        transformer = self._transformer
        transformer.set_pgresult(result)
        encoding = transformer.encoding
        names = [(result.fname(i) or b"").decode(encoding) for i in range(result.nfields)]
        return transformer.load_rows(first, last, lambda values: dict(zip(names, values, strict=False)))

    def execute(self, sql: str, params: Params = ()) -> int:
        changed = self._run(sql, params).command_tuples
        return -1 if changed is None else changed

    def fetchone(self, sql: str, params: Params = (), *, then_commit: bool = False) -> Row | None:
        result = self._run(sql, params, then_commit)
        return self._rows(result, 0, 1)[0] if result.ntuples else None

    def fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        result = self._run(sql, params)
        return self._rows(result, 0, result.ntuples)

    # --- ending --------------------------------------------------------------------------------------------

    def end(self, statement: str) -> None:
        """``COMMIT`` (or ``ROLLBACK``), with whatever is still queued: one round trip (none when a
        statement sent with ``then_commit`` ended the transaction already)."""
        if self.ended:
            return
        self._send(statement, (), _Sent(False, ends=True))
        self.ended = True
        self._synchronise()

    def commit(self) -> None:
        """``COMMIT`` (see :meth:`end`)."""
        self.end("COMMIT")

    def leave_pipeline(self) -> None:
        """Back to normal mode. After a failure (nothing was ended), with a ``ROLLBACK`` sent behind
        whatever was still queued, in one round trip: their answers are read and dropped."""
        if not self._pipeline:
            return
        self._pipeline = False
        pgconn = self._pgconn
        with contextlib.suppress(psycopg.Error):
            if not self.ended:  # (not marked ended: a transaction that failed unanswered may be run again)
                pgconn.send_query_params(b"ROLLBACK", None)
                self._sent.append(_Sent(False))
            if self._sent:
                self._sent = []
                pgconn.pipeline_sync()
                self._flush()
                self._read_until_sync()
            pgconn.exit_pipeline_mode()


_SUCCEEDED = frozenset((ExecStatus.COMMAND_OK, ExecStatus.TUPLES_OK, ExecStatus.EMPTY_QUERY))


@functools.lru_cache(maxsize=256)
def _auto(count: int) -> list[PyFormat]:
    """psycopg's ``%s`` for ``count`` parameters: each dumped in the format its adapter prefers."""
    return [PyFormat.AUTO] * count


def _raise_attributed(exc: psycopg.Error, failed: _Sent) -> NoReturn:
    """Raise ``exc`` as the store's error, saying whose failure it is: a statement the caller queued (its
    ``on_conflict`` for a unique violation), or the statement the caller is waiting for."""
    state = exc.diag.sqlstate or ""
    if state.startswith(SERVER_REFUSAL_CLASS):
        raise ServerRefused(state, exc.diag.message_detail or "") from exc
    if not failed.read and not failed.ends and failed.prepares is None:
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


def _configure(connection: StoreConnection) -> None:
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
        self._pool: ConnectionPool[StoreConnection] = ConnectionPool(
            dsn,
            connection_class=StoreConnection,
            kwargs=kwargs,
            min_size=1,
            max_size=size,
            open=False,
            configure=_configure,
            timeout=acquire_timeout,
            name="gateway-store",
        )
        self._threads = TransactionThreads(size, "postgres")
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
        try:
            await database._threads.run(database._open_pool)
        except BaseException:
            database._threads.shutdown()
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
                # A broken (or closed) connection is discarded here, and the pool makes a new one.
                self._pool.putconn(connection)
        reason = " ".join(str(failure).split()) if failure is not None else "timed out"
        raise StoreUnavailable(f"no working PostgreSQL connection within {timeout:g} s: {reason}") from failure

    def _transaction(self, tx: PostgresTx, connection: StoreConnection, writable: bool, fn: Callable[[PostgresTx], T]
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
    def _rollback_if_open(connection: StoreConnection) -> None:
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
        try:
            return await self._threads.run(self._run, writable, fn, timeout)
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
        await self._threads.run(self._pool.close)
        self._threads.shutdown()
