"""SQLite store: the embedded default (``sqlite:///var/gateway.db``).

One writer connection; write transactions are serial inside the process (one drain task runs
them). An ``flock`` on ``<file>-writer.lock`` hands the write lock from one gateway process to the
next without SQLite's sleep-and-poll, and ``BEGIN IMMEDIATE`` (with a busy timeout) serialises
them with any other program on the same file. When the lock is free, a group runs on the event
loop itself: a transaction takes a millisecond or two of CPU, and a thread hop each way plus the
writer thread's fight with the event loop for the GIL (while it holds the file's write lock) cost
more than that. When another process holds the lock, the group waits for it on the writer thread.
Reads go to a second connection on a second thread; WAL mode lets them run beside the writer.

Group commit: write functions queued in the same turn of the event loop (or while the group
before them waits for another process) run together in one transaction, each inside its own
SAVEPOINT. A function that raises is rolled back to
its savepoint and gets its own exception; the others commit. The result is what running them one
after another would give, with one commit for the whole group instead of one per request.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from gateway.errors import AlreadyExists, ConfigError, GatewayError, StoreUnavailable
from gateway.ledger.migrate import MigrationProgress, apply_migrations
from gateway.ledger.store import Params, Row

T = TypeVar("T")

BUSY_TIMEOUT_MS = 10_000
#: The database holds identity numbers and password hashes: its file and SQLite's ``-wal`` and
#: ``-shm`` files beside it are readable by the gateway's user only, whatever the umask.
PRIVATE_MODE = 0o600
COMPANION_SUFFIXES = ("", "-wal", "-shm")
MAX_GROUP = 256  # write functions per grouped transaction


class SqliteTx:
    """A transaction on one SQLite connection (see :class:`gateway.ledger.store.Tx`)."""

    dialect = "sqlite"

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def execute(self, sql: str, params: Params = ()) -> int:
        try:
            return self._connection.execute(sql, params).rowcount
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(_integrity_detail(exc)) from exc
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"SQLite: {exc}") from exc

    def queue(self, sql: str, params: Params = (), on_conflict: GatewayError | None = None) -> None:
        """Runs at once: nothing to gain by waiting in an embedded database."""
        try:
            self.execute(sql, params)
        except AlreadyExists as exc:
            if on_conflict is None:
                raise
            raise on_conflict from exc

    def fetchone(self, sql: str, params: Params = (), *, then_commit: bool = False) -> Row | None:
        try:
            row: sqlite3.Row | None = self._connection.execute(sql, params).fetchone()
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"SQLite: {exc}") from exc
        return row  # type: ignore[return-value]

    def fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        try:
            rows: list[Any] = self._connection.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"SQLite: {exc}") from exc
        return rows

    def lock(self, name: str) -> None:
        """Nothing to do: a ``BEGIN IMMEDIATE`` transaction holds the database's write lock."""


def _integrity_detail(exc: sqlite3.IntegrityError) -> str:
    text = str(exc)
    if text.startswith("UNIQUE constraint failed: "):
        return "already exists: " + text.removeprefix("UNIQUE constraint failed: ")
    return text


def _make_private(path: str) -> None:
    """Create the database file owner-only before SQLite does, and take group and other access
    away from an existing database and its ``-wal`` and ``-shm`` files.

    SQLite creates the ``-wal`` and ``-shm`` files with the database file's mode, so a database
    file made 0600 here keeps them 0600 too. A symlink planted in place of one of these files is
    refused rather than followed (SQLite itself would follow it).

    An existing file is never opened here: closing any descriptor of a file drops every POSIX lock
    this process holds on it, so opening and closing the database or its ``-shm`` beside a live
    SQLite connection of the same process (a second store, the CLI inside a test) would silently
    release that connection's locks. Existing files are checked with ``lstat`` and narrowed with
    ``chmod`` by path instead; whoever could swap a file between the two already owns the folder.

    Raises:
        StoreUnavailable: a file is a symlink or cannot be created or restricted (another owner).
    """
    for suffix in COMPANION_SUFFIXES:
        name = f"{path}{suffix}"
        try:
            info = os.lstat(name)
        except FileNotFoundError:
            if suffix:
                continue  # a companion SQLite has not made yet: it will take the database file's mode
            try:  # nobody holds a file that does not exist yet: creating it here is safe
                os.close(os.open(name, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 PRIVATE_MODE))
            except FileExistsError:
                info = os.lstat(name)  # created meanwhile (another process): check it like any other
            except OSError as exc:
                raise StoreUnavailable(f"cannot create SQLite file {name}: {exc.strerror}") from exc
            else:
                os.chmod(name, PRIVATE_MODE)  # whatever the umask did
                continue
        except OSError as exc:
            raise StoreUnavailable(f"cannot read SQLite file {name}: {exc.strerror}") from exc
        if stat.S_ISLNK(info.st_mode):
            raise StoreUnavailable(f"cannot open SQLite file {name}: it is a symbolic link")
        if stat.S_IMODE(info.st_mode) & 0o077:
            try:  # whatever mode an older version or the umask left: owner only
                os.chmod(name, PRIVATE_MODE)
            except OSError as exc:
                raise StoreUnavailable(f"cannot restrict {name} to its owner (mode 0600): {exc.strerror}") from exc


def _connect(path: str) -> sqlite3.Connection:
    connection = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
    )
    connection.row_factory = sqlite3.Row
    connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    connection.execute("PRAGMA journal_mode = WAL")
    # FULL, not NORMAL: in WAL mode NORMAL syncs the log only at checkpoints, so a power cut can
    # lose transactions that were already acknowledged (a transfer the client saw succeed).
    connection.execute("PRAGMA synchronous = FULL")
    connection.execute("PRAGMA foreign_keys = ON")
    # 64 MiB of page cache (the default is 2 MiB): large reconciliations insert into indexes keyed by
    # hashes (payment, journal entry), which touch pages all over the index; pages are only cached
    # as they are read, so a small database uses no more memory than before.
    connection.execute("PRAGMA cache_size = -65536")
    return connection


class SqliteDatabase:
    """:class:`gateway.ledger.store.Database` over one SQLite file."""

    def __init__(self, dsn: str, path: str) -> None:
        self.dsn = dsn
        self.path = path
        self._writer_thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._reader_thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-reader")
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._queued: list[tuple[Callable[[Any], Any], asyncio.Future[Any]]] = []
        self._draining: asyncio.Task[None] | None = None
        self._gate: int | None = None  # fd of the writer lock file (None for an in-memory database)

    @classmethod
    async def open(cls, dsn: str) -> SqliteDatabase:
        # As SQLAlchemy reads them: sqlite:///var/gateway.db is relative, sqlite:////srv/g.db absolute.
        if not dsn.startswith("sqlite:///"):
            raise ConfigError(f"store DSN {dsn!r}: write sqlite:///relative/path or sqlite:////absolute/path")
        path = dsn.removeprefix("sqlite:///")
        database = cls(dsn, path)
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            _make_private(path)
            try:
                database._gate = os.open(f"{path}-writer.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise StoreUnavailable(f"cannot open the writer lock of {path}: {exc.strerror}") from exc
        loop = asyncio.get_running_loop()
        try:
            database._writer = await loop.run_in_executor(database._writer_thread, _connect, path)
            database._reader = await loop.run_in_executor(database._reader_thread, _connect, path)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open SQLite database {path}: {exc}") from exc
        return database

    def _run_group(self, fns: list[Callable[[SqliteTx], Any]]) -> list[tuple[bool, Any]]:
        """Run ``fns`` in one transaction; the caller holds the write gate. Returns (ok, result or
        exception) per fn. With several fns each runs in a savepoint; one alone needs none (its
        failure rolls back the whole transaction).

        Raises:
            StoreUnavailable: BEGIN or COMMIT failed; nothing of the group is written.
        """
        assert self._writer is not None
        connection = self._writer
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"SQLite: {exc}") from exc
        savepoints = len(fns) > 1
        outcomes: list[tuple[bool, Any]] = []
        try:
            for fn in fns:
                if savepoints:
                    connection.execute("SAVEPOINT request")
                try:
                    result = fn(SqliteTx(connection))
                except Exception as exc:
                    if savepoints:
                        connection.execute("ROLLBACK TO request")
                        connection.execute("RELEASE request")
                    elif connection.in_transaction:
                        connection.execute("ROLLBACK")
                    failure = StoreUnavailable(f"SQLite: {exc}") if isinstance(exc, sqlite3.Error) else exc
                    outcomes.append((False, failure))
                else:
                    if savepoints:
                        connection.execute("RELEASE request")
                    outcomes.append((True, result))
            if connection.in_transaction:
                connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        return outcomes

    def _run_group_when_free(self, fns: list[Callable[[SqliteTx], Any]]) -> list[tuple[bool, Any]]:
        """On the writer thread: wait for the write gate, then run the group."""
        self._lock_gate(blocking=True)
        try:
            return self._run_group(fns)
        finally:
            self._unlock_gate()

    def _lock_gate(self, blocking: bool) -> bool:
        """Take the exclusive ``flock`` on ``<database>-writer.lock``; False if ``blocking`` is off and
        another process holds it.

        SQLite makes a writer that finds the file locked sleep and poll (1, 2, 5, 10 … ms), which
        wastes most of the time when several gateway processes (``[server] processes``) write to
        one file. A blocking ``flock`` hands the lock over as soon as it is released.
        """
        if self._gate is None:
            return True
        try:
            fcntl.flock(self._gate, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock_gate(self) -> None:
        if self._gate is not None:
            fcntl.flock(self._gate, fcntl.LOCK_UN)

    def _run_read(self, fn: Callable[[SqliteTx], T]) -> T:
        assert self._reader is not None
        connection = self._reader
        connection.execute("BEGIN")
        try:
            return fn(SqliteTx(connection))
        finally:
            if connection.in_transaction:
                connection.execute("ROLLBACK")

    async def write(self, fn: Callable[[Any], T]) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queued.append((fn, future))
        if self._draining is None or self._draining.done():
            self._draining = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queued:
            group, self._queued = self._queued[:MAX_GROUP], self._queued[MAX_GROUP:]
            try:
                fns = [fn for fn, _ in group]
                if self._lock_gate(blocking=False):  # the write lock is free: run the group here, on the loop
                    try:
                        outcomes = self._run_group(fns)
                    finally:
                        self._unlock_gate()
                else:  # another process holds it: wait for it in the writer thread, not on the event loop
                    outcomes = await loop.run_in_executor(self._writer_thread, self._run_group_when_free, fns)
            except Exception as exc:
                error = exc if isinstance(exc, GatewayError) else StoreUnavailable(f"SQLite: {exc}")
                for _, future in group:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), (ok, value) in zip(group, outcomes, strict=True):
                if future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)

    async def read(self, fn: Callable[[Any], T]) -> T:
        return await self._call(self._reader_thread, self._run_read, fn)

    async def _call(self, executor: ThreadPoolExecutor, runner: Callable[[Any], T], fn: Callable[[Any], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(executor, runner, fn)
        except GatewayError:
            raise
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite: {exc}") from exc

    async def migrate(self, progress: MigrationProgress | None = None) -> list[str]:
        return await self.write(lambda tx: apply_migrations(tx, "sqlite", progress))

    async def ping(self) -> bool:
        try:
            await self.read(lambda tx: tx.fetchone("SELECT 1"))
        except GatewayError:
            return False
        return True

    async def close(self) -> None:
        while self._draining is not None and not self._draining.done():
            await self._draining
        loop = asyncio.get_running_loop()
        for executor, connection in ((self._writer_thread, self._writer), (self._reader_thread, self._reader)):
            if connection is not None:
                await loop.run_in_executor(executor, connection.close)
            executor.shutdown(wait=True)
        self._writer = self._reader = None
        if self._gate is not None:
            os.close(self._gate)
            self._gate = None
