"""The store contract, run against both implementations (``store_dsn``: SQLite and PostgreSQL).

What the rest of the gateway relies on: migrations apply once; a write commits or rolls back as a
whole; a unique violation is AlreadyExists; BYTEA/BLOB comes back as ``bytes``; ``tx.lock``
serialises read-modify-write transactions (on PostgreSQL this is the advisory lock, so the audit
chain has no gaps or forks under concurrent appends); an unreachable server is StoreUnavailable.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest

from gateway.audit.chain import AuditEntry, append, chain_staged, pending_count
from gateway.audit.verify import verify_chain
from gateway.config import load_settings
from gateway.errors import AlreadyExists, ConfigError, StoreUnavailable
from gateway.ledger import journal
from gateway.ledger.engines import open_database
from gateway.ledger.migrate import migration_files
from gateway.ledger.postgres import PostgresDatabase, lock_key
from gateway.ledger.store import Database, Tx
from gateway.runtime import RUNTIME
from gateway.wallets.accounts import Wallets
from tests.conftest import Token, make_settings, start_gateway
from tests.pg import PostgresServer, free_port


@pytest.fixture
async def database(store_dsn: str) -> AsyncIterator[Database]:
    """An open store, not migrated."""
    opened = await open_database(store_dsn)
    yield opened
    await opened.close()


@pytest.fixture
async def migrated(database: Database) -> Database:
    await database.migrate()
    return database


class Boom(Exception):
    pass


def add_user(tx: Tx, username: str) -> None:
    tx.execute(
        "INSERT INTO users (username, role, password_hash, created_at) VALUES (?, ?, ?, ?)",
        (username, "teller", "x", "2024-01-01T00:00:00Z"),
    )


def add_key(tx: Tx, key_id: str, label: str, public_key: bytes) -> None:
    tx.execute(
        "INSERT INTO keys (key_id, label, algorithm, usages, public_key, created_at, created_by) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (key_id, label, "ecdsa-p256", "raw", public_key, "2024-01-01T00:00:00Z", "test"),
    )


def count_users(tx: Tx) -> int:
    row = tx.fetchone("SELECT COUNT(*) AS n FROM users")
    assert row is not None
    return int(row["n"])


def dialect_of(dsn: str) -> str:
    return "sqlite" if dsn.startswith("sqlite") else "postgresql"


async def test_migrate_is_idempotent(database: Database, store_dsn: str) -> None:
    every = [name for name, _ in migration_files(dialect_of(store_dsn))]
    assert every[0] == "0001_foundation"
    assert await database.migrate() == every
    assert await database.migrate() == []
    assert await database.read(count_users) == 0
    # A second process (a new pool) finds everything applied too.
    again = await open_database(store_dsn)
    try:
        assert await again.migrate() == []
    finally:
        await again.close()


async def test_the_daily_totals_migration_counts_what_was_posted_before_it(migrated: Database,
                                                                             store_dsn: str) -> None:
    """Migration 0023 starts ``wallet_moves`` from the postings already there: a store upgraded with cash
    movements and loads on its books must count them, or its first cash-ins after the upgrade would pass
    the daily threshold on one person's word. The migration is undone and run again over such a ledger."""
    settings = load_settings(None, environ={})
    wallets = Wallets(migrated, cast(Any, None), cast(Any, None), settings)
    audit = AuditEntry("teller", "teller", "wallets.cash_in", "allowed")

    def book(tx: Tx) -> tuple[str, str]:
        first, second = (str(wallets.open_in(tx, {"holder_name": "Test Holder", "phone": "13800000000",
                                                  "tier": 2, "kind": "personal"}, audit)["wallet_id"])
                         for _ in range(2))
        wallets.cash_in(tx, first, 40_000, "teller", audit)
        wallets.cash_in(tx, first, 2_500, "teller", audit)
        wallets.cash_out(tx, first, 1_000, "teller", audit)
        wallets.cash_in(tx, second, 700, "teller", audit)
        return first, second

    first, second = await migrated.write(book)
    moves = "SELECT wallet_id, kind, amount FROM wallet_moves ORDER BY wallet_id, kind"
    counted = await migrated.read(lambda tx: tx.fetchall(moves))

    def undo(tx: Tx) -> None:
        tx.execute("DROP TABLE wallet_moves")
        tx.execute("DELETE FROM schema_migrations WHERE name = '0023_wallet_moves'")

    await migrated.write(undo)
    assert await migrated.migrate() == ["0023_wallet_moves"]
    backfilled = await migrated.read(lambda tx: tx.fetchall(moves))
    assert [dict(row) for row in backfilled] == [dict(row) for row in counted]
    assert {(row["wallet_id"], row["kind"]): int(row["amount"]) for row in backfilled} == {
        (first, "cash_in"): 42_500, (first, "cash_out"): -1_000, (second, "cash_in"): 700}
    assert await migrated.read(journal.check_invariants) == []


async def test_dialect_and_placeholders(migrated: Database, store_dsn: str) -> None:
    dialect = dialect_of(store_dsn)

    def probe(tx: Tx) -> tuple[str, Any]:
        return tx.dialect, tx.fetchone("SELECT ? || '%' AS v, ? AS n", ("a", 7))

    found_dialect, row = await migrated.read(probe)
    assert found_dialect == dialect
    assert row is not None and dict(row) == {"v": "a%", "n": 7}
    assert await migrated.ping() is True


async def test_write_commits_and_read_sees_it(migrated: Database) -> None:
    assert (
        await migrated.write(
            lambda tx: tx.execute(
                "INSERT INTO users (username, role, password_hash, created_at) VALUES (?, ?, ?, ?)",
                ("alice", "teller", "x", "t"),
            )
        )
        == 1
    )
    row = await migrated.read(lambda tx: tx.fetchone("SELECT username, role FROM users WHERE username = ?", ("alice",)))
    assert row is not None and dict(row) == {"username": "alice", "role": "teller"}
    rows = await migrated.read(lambda tx: tx.fetchall("SELECT username FROM users ORDER BY username"))
    assert [r["username"] for r in rows] == ["alice"]
    assert (
        await migrated.read(lambda tx: tx.fetchone("SELECT username FROM users WHERE username = ?", ("bob",))) is None
    )


async def test_raising_write_rolls_back(migrated: Database) -> None:
    def half_done(tx: Tx) -> None:
        add_user(tx, "carol")
        add_user(tx, "dave")
        raise Boom("changed my mind")

    with pytest.raises(Boom):
        await migrated.write(half_done)
    assert await migrated.read(count_users) == 0
    # The connection is usable again afterwards.
    await migrated.write(lambda tx: add_user(tx, "carol"))
    assert await migrated.read(count_users) == 1


async def test_unique_violation_is_already_exists(migrated: Database, store_dsn: str) -> None:
    await migrated.write(lambda tx: add_user(tx, "erin"))
    with pytest.raises(AlreadyExists) as caught:
        await migrated.write(lambda tx: add_user(tx, "erin"))
    assert "already exists" in caught.value.detail

    await migrated.write(lambda tx: add_key(tx, "k1", "label-1", b"\x04"))

    def second_key_same_label(tx: Tx) -> None:
        add_user(tx, "frank")  # rolled back with the failing insert
        add_key(tx, "k2", "label-1", b"\x04")

    with pytest.raises(AlreadyExists) as caught:
        await migrated.write(second_key_same_label)
    assert "label" in caught.value.detail  # SQLite: keys.label; PostgreSQL: keys_label_key
    if store_dsn.startswith("postgresql"):
        assert "keys_label_key" in caught.value.detail
    assert await migrated.read(count_users) == 1


async def test_bytes_round_trip(migrated: Database) -> None:
    every_byte = bytes(range(256))
    await migrated.write(lambda tx: add_key(tx, "k-bytes", "bytes", every_byte))
    await migrated.write(lambda tx: add_key(tx, "k-empty", "empty", b""))
    one = await migrated.read(lambda tx: tx.fetchone("SELECT public_key FROM keys WHERE key_id = ?", ("k-bytes",)))
    assert one is not None
    assert type(one["public_key"]) is bytes and one["public_key"] == every_byte
    rows = await migrated.read(lambda tx: tx.fetchall("SELECT key_id, public_key FROM keys ORDER BY key_id"))
    assert [(r["key_id"], r["public_key"]) for r in rows] == [("k-bytes", every_byte), ("k-empty", b"")]
    assert all(type(r["public_key"]) is bytes for r in rows)
    # bytes as a query parameter too
    found = await migrated.read(lambda tx: tx.fetchone("SELECT key_id FROM keys WHERE public_key = ?", (every_byte,)))
    assert found is not None and found["key_id"] == "k-bytes"


def entry(n: int) -> AuditEntry:
    return AuditEntry(
        "tester",
        "admin",
        "test.event",
        "allowed",
        reasons=[f"r{n}"],
        result={"n": n},
        payload_hash="ab" * 32,
        request_id=f"req-{n}",
    )


async def appended(database: Database, entries: list[AuditEntry]) -> list[int]:
    """Append in one transaction; on PostgreSQL, where append stages them, chain them too: their numbers."""
    numbers = await database.write(lambda tx: append(tx, entries))
    if await database.read(lambda tx: tx.dialect) == "postgresql":
        assert numbers == [0] * len(entries)  # staged, numbered by the chainer
        numbers = await database.write(lambda tx: chain_staged(tx, 1000))
    return numbers


async def test_audit_chain_verifies(migrated: Database) -> None:
    assert await appended(migrated, [entry(1), entry(2)]) == [1, 2]
    for n in range(3, 6):
        assert await appended(migrated, [entry(n)]) == [n]
    report = await migrated.read(verify_chain)
    assert report.ok, report.problem
    assert (report.entries, report.head_seq, report.first_bad_seq, report.pending) == (5, 5, None, 0)

    # Tampering is seen (so a passing verification above means something).
    await migrated.write(lambda tx: tx.execute("UPDATE audit_log SET actor = ? WHERE seq = ?", ("mallory", 3)))
    report = await migrated.read(verify_chain)
    assert not report.ok and report.first_bad_seq == 3


async def test_concurrent_audit_appends_have_no_gaps(migrated: Database) -> None:
    results = await asyncio.gather(*(migrated.write(lambda tx, n=n: append(tx, [entry(n)])) for n in range(20)))
    numbers = [seq for batch in results for seq in batch]
    if await migrated.read(lambda tx: tx.dialect) == "postgresql":
        assert await migrated.read(pending_count) == 20
        numbers = await migrated.write(lambda tx: chain_staged(tx, 1000))
    assert sorted(numbers) == list(range(1, 21))
    report = await migrated.read(verify_chain)
    assert report.ok, report.problem
    assert report.entries == 20 and report.head_seq == 20 and report.pending == 0


def queue_user(tx: Tx, username: str) -> None:
    tx.queue(
        "INSERT INTO users (username, role, password_hash, created_at) VALUES (?, ?, ?, ?)",
        (username, "teller", "x", "2024-01-01T00:00:00Z"),
    )


async def test_queued_statements_commit_with_the_transaction(migrated: Database) -> None:
    def work(tx: Tx) -> int:
        queue_user(tx, "quinn")
        queue_user(tx, "rosa")
        # A statement whose answer is read sees what was queued before it (same transaction, in order).
        return count_users(tx)

    assert await migrated.write(work) == 2
    await migrated.write(lambda tx: queue_user(tx, "sam"))  # queued, then only the commit
    assert await migrated.read(count_users) == 3


async def test_a_raising_function_rolls_back_what_it_queued(migrated: Database) -> None:
    def half_done(tx: Tx) -> None:
        queue_user(tx, "tess")
        raise Boom("changed my mind")

    with pytest.raises(Boom):
        await migrated.write(half_done)
    assert await migrated.read(count_users) == 0
    await migrated.write(lambda tx: add_user(tx, "tess"))  # the connection works afterwards
    assert await migrated.read(count_users) == 1


async def test_after_queued_statements_a_unique_violation_is_still_already_exists(migrated: Database) -> None:
    """The idempotency race depends on it: the INSERT that collides is the one the caller waits
    for, after statements it queued."""
    await migrated.write(lambda tx: add_user(tx, "uma"))

    def collide(tx: Tx) -> None:
        queue_user(tx, "victor")
        tx.lock("some-lock")
        add_user(tx, "uma")

    with pytest.raises(AlreadyExists):
        await migrated.write(collide)
    assert await migrated.read(count_users) == 1


@pytest.mark.postgres
async def test_a_queued_failure_is_never_another_statements_already_exists(postgres_server: PostgresServer) -> None:
    """A queued statement that fails is reported as such (StoreUnavailable), not as the
    AlreadyExists of the statement the caller is waiting for — which the caller may be catching —
    and nothing of the transaction stays."""
    database = await PostgresDatabase.open(postgres_server.create_database(), size=1)
    try:
        await database.migrate()
        await database.write(lambda tx: add_user(tx, "wendy"))
        caught: list[BaseException] = []

        def work(tx: Tx, pause: float) -> None:
            queue_user(tx, "xavier")
            queue_user(tx, "wendy")  # fails
            # With a pause the failure has arrived before the next statement is sent, and psycopg
            # raises it while sending; without one, at the Sync that follows.
            time.sleep(pause)
            try:
                add_user(tx, "yusuf")  # would succeed; the caller catches AlreadyExists here
            except AlreadyExists as exc:
                caught.append(exc)
                raise

        for pause in (0.0, 0.2):
            with pytest.raises(StoreUnavailable, match="queued statement failed") as failure:
                await database.write(lambda tx, pause=pause: work(tx, pause))
            assert caught == []
            assert "users_pkey" in failure.value.detail and "wendy" not in failure.value.detail
            assert await database.read(count_users) == 1
        # The same failure met at COMMIT (nothing read after it) is reported the same way.
        with pytest.raises(StoreUnavailable, match="queued statement failed"):
            await database.write(lambda tx: queue_user(tx, "wendy"))
        await database.write(lambda tx: queue_user(tx, "zoe"))  # the connection is fine afterwards
        assert await database.read(count_users) == 2
    finally:
        await database.close()


def make_counter(tx: Tx) -> None:
    tx.execute("CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
    tx.execute("INSERT INTO counters (name, value) VALUES (?, ?)", ("c", 0))


def increment(tx: Tx, locked: bool = True) -> None:
    if locked:
        tx.lock("counter")
    row = tx.fetchone("SELECT value FROM counters WHERE name = ?", ("c",))
    assert row is not None
    time.sleep(0.05)  # we are in a worker thread: give other transactions every chance to interleave
    tx.execute("UPDATE counters SET value = ? WHERE name = ?", (int(row["value"]) + 1, "c"))


async def read_counter(database: Database) -> int:
    row = await database.read(lambda tx: tx.fetchone("SELECT value FROM counters WHERE name = ?", ("c",)))
    assert row is not None
    return int(row["value"])


async def test_lock_serialises_read_modify_write(migrated: Database) -> None:
    await migrated.write(make_counter)
    await asyncio.gather(*(migrated.write(increment) for _ in range(10)))
    assert await read_counter(migrated) == 10


async def test_read_sees_one_snapshot(migrated: Database) -> None:
    """A read transaction does not see what commits while it runs (the audit verifier depends on it)."""
    reading, committed = threading.Event(), threading.Event()

    def two_counts(tx: Tx) -> tuple[int, int]:
        first = count_users(tx)
        reading.set()
        assert committed.wait(10)
        return first, count_users(tx)

    reader = asyncio.ensure_future(migrated.read(two_counts))
    assert await asyncio.get_running_loop().run_in_executor(None, reading.wait, 10)
    await migrated.write(lambda tx: add_user(tx, "grace"))
    committed.set()
    assert await reader == (0, 0)
    assert await migrated.read(count_users) == 1


@pytest.mark.postgres
async def test_without_the_lock_updates_are_lost(postgres_server: PostgresServer) -> None:
    """The control for the lock test: on PostgreSQL, READ COMMITTED alone does lose updates."""
    database = await PostgresDatabase.open(postgres_server.create_database())
    try:
        await database.write(make_counter)
        await asyncio.gather(*(database.write(lambda tx: increment(tx, locked=False)) for _ in range(8)))
        assert await read_counter(database) < 8
    finally:
        await database.close()


@pytest.mark.postgres
async def test_pool_recovers_when_connections_are_killed(postgres_server: PostgresServer) -> None:
    dsn = postgres_server.create_database()
    database = await PostgresDatabase.open(dsn, size=2)
    try:
        await database.migrate()
        await asyncio.gather(*(database.read(lambda tx: time.sleep(0.05)) for _ in range(4)))  # open both
        killer = await PostgresDatabase.open(postgres_server.dsn(), size=1)
        try:
            dbname = dsn.rsplit("/", 1)[1]
            await killer.write(
                lambda tx: tx.fetchall(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = ?", (dbname,)
                )
            )
        finally:
            await killer.close()
        # The first write after the kill succeeds: each dead connection fails at BEGIN and is discarded,
        # and the transaction runs on a fresh one instead of failing once per dead connection.
        await database.write(lambda tx: add_user(tx, "heidi"))
        assert await database.read(count_users) == 1
    finally:
        await database.close()


async def test_unreachable_server_is_store_unavailable() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(StoreUnavailable) as caught:
        await open_database(f"postgresql://test:s3cret-pw@127.0.0.1:{port}/nowhere?connect_timeout=2")
    message = caught.value.detail
    assert f"127.0.0.1:{port}/nowhere" in message
    assert "s3cret-pw" not in message and "s3cret-pw" not in repr(caught.value)


@pytest.mark.postgres
async def test_stopped_server_is_store_unavailable() -> None:
    server = PostgresServer().start()
    try:
        database = await PostgresDatabase.open(server.create_database(), size=2, acquire_timeout=0.5)
        try:
            await database.migrate()
            server.stop()

            async def refused() -> None:
                with pytest.raises(StoreUnavailable):
                    await database.write(lambda tx: add_user(tx, "ivan"))
                with pytest.raises(StoreUnavailable):
                    await database.read(count_users)
                assert await database.ping() is False

            await asyncio.wait_for(refused(), timeout=60)  # an answer, not a hang
        finally:
            await database.close()
    finally:
        server.stop()


def test_lock_key_is_stable_and_signed_64_bit() -> None:
    assert lock_key("audit-chain") == lock_key("audit-chain") != lock_key("schema-migrations")
    keys = [lock_key(f"name-{n}") for n in range(200)]
    assert all(-(2**63) <= key < 2**63 for key in keys)
    assert any(key < 0 for key in keys)


@pytest.mark.postgres
async def test_the_configured_pool_size_bounds_the_connections(postgres_server: PostgresServer) -> None:
    """``[store] pool_size`` reaches the PostgreSQL store: under more concurrent transactions than
    connections it opens exactly that many, and every transaction still runs."""
    dsn = postgres_server.create_database()
    dbname = dsn.rsplit("/", 1)[-1].split("?")[0]
    database = await open_database(dsn, pool_size=3)
    observer = await PostgresDatabase.open(postgres_server.dsn(), size=1)
    try:
        await database.migrate()
        seen: list[int] = []
        lock = threading.Lock()
        inside = 0

        def hold(tx: Tx) -> None:
            nonlocal inside
            with lock:
                inside += 1
                seen.append(inside)
            time.sleep(0.05)
            with lock:
                inside -= 1

        await asyncio.gather(*(database.read(hold) for _ in range(12)))
        row = await observer.read(lambda tx: tx.fetchone(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = ? AND pid <> pg_backend_pid()", (dbname,)))
        assert row is not None and row["n"] == 3
        assert max(seen) == 3 and len(seen) == 12
    finally:
        await observer.close()
        await database.close()


def test_pool_size_is_a_checked_setting() -> None:
    assert load_settings(None, environ={"ECNY_STORE__POOL_SIZE": "3"}).store.pool_size == 3
    with pytest.raises(ConfigError, match="ECNY_STORE__POOL_SIZE"):
        load_settings(None, environ={"ECNY_STORE__POOL_SIZE": "0"})


@pytest.mark.postgres
async def test_the_gateway_opens_its_store_with_the_configured_pool_size(
    postgres_server: PostgresServer, softhsm_token: Token
) -> None:
    gateway = await start_gateway(make_settings(softhsm_token, postgres_server.create_database(),
                                                store={"pool_size": 2}))
    try:
        database = gateway.client.server.app[RUNTIME].database
        assert isinstance(database, PostgresDatabase) and database.size == 2
    finally:
        await gateway.client.close()


# --- the transaction layer over libpq, against psycopg's cursors ---------------------------------------------

ORACLE_QUERIES: list[tuple[str, tuple[Any, ...]]] = [
    ("SELECT ?::text AS t, ?::bigint AS b, ?::integer AS i, ? AS n", ("零钱 ✓", 2**62, -7, None)),
    ("SELECT ?::bytea AS raw, length(?::bytea) AS len", (b"\x00\xff\x80" * 50, b"\x00" * 3)),
    ("SELECT ?::bigint[] AS a, ?::text[] AS s", ([1, -2, 2**40], ["x", "", "y'z"])),
    ("SELECT ?::boolean AS yes, ?::numeric AS dec, ?::double precision AS f", (True, 10**30, 0.25)),
    ("SELECT ?::jsonb AS doc, '{\"a\": 1}'::jsonb AS lit, '100%' AS pct", ('{"k": [1, 2]}',)),
    ("SELECT g AS n, g * 2 AS twice FROM generate_series(1, ?) g", (5,)),
    ("SELECT 1 AS one WHERE false", ()),
    ("SELECT now() - now() AS zero, 'a'::text || ? AS joined", ("b",)),
]


@pytest.mark.postgres
async def test_the_libpq_transaction_answers_as_psycopg_cursors_do(postgres_server: PostgresServer) -> None:
    """PostgresTx sends through psycopg's libpq binding, not its cursors: the same statements answer the
    same rows, value for value and type for type (psycopg's cursors are the oracle), whether the statement
    is sent unnamed or, from its second use on one connection, prepared."""
    import psycopg
    from psycopg.rows import dict_row

    dsn = postgres_server.create_database()
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as oracle:
        expected = [oracle.execute(sql.replace("%", "%%").replace("?", "%s"), params).fetchall()
                    for sql, params in ORACLE_QUERIES]
    database = await PostgresDatabase.open(dsn, size=1)
    try:
        for _ in range(3):  # unnamed, then prepared, then run by name
            answers = await database.read(lambda tx: [tx.fetchall(sql, params) for sql, params in ORACLE_QUERIES])
            assert answers == expected
            assert [[{k: type(v) for k, v in row.items()} for row in rows] for rows in answers] == \
                   [[{k: type(v) for k, v in row.items()} for row in rows] for rows in expected]
    finally:
        await database.close()


@pytest.mark.postgres
async def test_a_statement_whose_prepare_was_skipped_is_prepared_again(postgres_server: PostgresServer) -> None:
    """A batch that fails makes PostgreSQL skip what was sent behind the failure — a statement's prepare
    included. The connection must not believe it prepared: the next use of that statement works."""
    database = await PostgresDatabase.open(postgres_server.create_database(), size=1)
    try:
        await database.migrate()
        await database.write(lambda tx: add_user(tx, "ada"))
        probe = "SELECT COUNT(*) AS n FROM users WHERE username <> ?"
        await database.read(lambda tx: tx.fetchone(probe, ("x",)))  # seen once: prepared at its next use

        def fail_before_the_prepare(tx: Tx) -> None:
            queue_user(tx, "ada")  # fails: the prepare and the statement behind it are skipped
            tx.fetchone(probe, ("x",))

        with pytest.raises(StoreUnavailable, match="queued statement failed"):
            await database.write(fail_before_the_prepare)
        for _ in range(3):
            row = await database.read(lambda tx: tx.fetchone(probe, ("x",)))
            assert row is not None and row["n"] == 1
        prepared = await database.read(lambda tx: tx.fetchall(
            "SELECT statement FROM pg_prepared_statements WHERE name LIKE '\\_ecny\\_%'"))
        assert any("username <> $1" in row["statement"] for row in prepared)
    finally:
        await database.close()


@pytest.mark.postgres
async def test_a_batch_larger_than_the_socket_buffers_is_sent_whole(postgres_server: PostgresServer) -> None:
    """Queued statements are sent without waiting; a batch of many megabytes whose statements answer
    megabytes too must not deadlock: the server blocks writing answers nobody reads, stops reading, and
    the client blocks writing (libpq's pipeline deadlock) — unless the client reads while it writes."""
    database = await PostgresDatabase.open(postgres_server.create_database(), size=1)
    try:
        await database.write(lambda tx: tx.execute("CREATE TABLE blobs (n INTEGER PRIMARY KEY, data BYTEA NOT NULL)"))
        blob = bytes(range(256)) * 1024  # 256 KiB, sent as 512 KiB of hex

        def many(tx: Tx) -> int:
            for n in range(64):  # 32 MiB on the wire each way: every statement echoes its blob
                tx.queue("INSERT INTO blobs (n, data) VALUES (?, ?) RETURNING data", (n, blob))
            row = tx.fetchone("SELECT COUNT(*) AS n, SUM(length(data)) AS size FROM blobs")
            assert row is not None
            return int(row["size"])

        assert await database.write(many) == 64 * len(blob)
    finally:
        await database.close()


@pytest.mark.postgres
async def test_a_refused_transaction_rolls_back_in_the_round_trip_of_its_last_queued_statements(
        postgres_server: PostgresServer) -> None:
    """A function that queues and then refuses (raises) leaves nothing, and its ROLLBACK travels with the
    answers still due: one round trip, counted on the wire by the delay proxy."""
    from bench.delay_proxy import DelayProxy

    proxy = DelayProxy("127.0.0.1", postgres_server.port, 0.01)
    port = await proxy.start()
    dsn = postgres_server.create_database()
    database = await PostgresDatabase.open(dsn.replace(f":{postgres_server.port}/", f":{port}/"), size=1)
    try:
        await database.migrate()
        await database.read(count_users)  # the pool's connection is open

        def refuse(tx: Tx) -> None:
            queue_user(tx, "bob")
            raise Boom("refused")

        before = proxy.turns
        with pytest.raises(Boom):
            await database.write(refuse)
        assert proxy.turns - before == 1
        assert await database.read(count_users) == 0
    finally:
        await database.close()
        await proxy.close()


@pytest.mark.postgres
async def test_a_constraint_checked_at_commit_is_already_exists(postgres_server: PostgresServer) -> None:
    """A deferred constraint fails at the COMMIT — sent by the store, or right behind the statement that
    ends the transaction (``then_commit``): AlreadyExists, the transaction's own failure, not a queued
    statement's StoreUnavailable; nothing stays."""
    database = await PostgresDatabase.open(postgres_server.create_database(), size=1)
    try:
        await database.write(lambda tx: tx.execute(
            "CREATE TABLE pairs (n INTEGER, CONSTRAINT pairs_n UNIQUE (n) DEFERRABLE INITIALLY DEFERRED)"))

        def twice(tx: Tx) -> None:
            tx.queue("INSERT INTO pairs (n) VALUES (1)")
            tx.queue("INSERT INTO pairs (n) VALUES (1)")  # allowed until the COMMIT checks it

        def twice_then_commit(tx: Tx) -> None:
            tx.queue("INSERT INTO pairs (n) VALUES (2)")
            tx.fetchone("INSERT INTO pairs (n) VALUES (2) RETURNING n", then_commit=True)

        for work in (twice, twice_then_commit):
            with pytest.raises(AlreadyExists, match="pairs_n"):
                await database.write(work)
        rows = await database.read(lambda tx: tx.fetchall("SELECT n FROM pairs"))
        assert rows == []
        assert (await database.write(lambda tx: tx.fetchone("INSERT INTO pairs (n) VALUES (3) RETURNING n",
                                                            then_commit=True))) == {"n": 3}
    finally:
        await database.close()
