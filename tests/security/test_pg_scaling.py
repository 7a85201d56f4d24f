"""Scale-out on PostgreSQL (issue 19, docs/scaling.md): audit chaining off the hot path, two round trips
for a transfer, and locks no wider than a wallet — without losing what they protect.

Real parts only: a throw-away PostgreSQL server (``postgres_server``), the real store, the real chainer
in real processes killed with SIGKILL, and bench/delay_proxy.py counting the network round trips a
client waits for (a delay of 2.5 ms each way: whatever psycopg pipelines travels together).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import cbor2
import psycopg
import pytest

from bench.delay_proxy import DelayProxy
from gateway.audit.chain import CHAIN_LOCK, AuditEntry, AuditLog, append, chain_staged, pending_count
from gateway.audit.verify import verify_chain
from gateway.auth.credentials import Authenticator, add_user
from gateway.auth.roles import Role
from gateway.config import load_settings
from gateway.errors import (
    IdempotencyConflict,
    IdempotencyRaced,
    InsufficientFunds,
    KeyDisabled,
    LimitExceeded,
    Unauthenticated,
    WalletNotActive,
    WalletNotFound,
)
from gateway.keys import KeyStatus, Usage, set_status
from gateway.ledger import journal
from gateway.ledger.postgres import PostgresDatabase, lock_key
from gateway.ledger.store import Tx
from gateway.offline.devices import Devices, LoadResult
from gateway.operations import idempotency
from gateway.operations.idempotency import IdempotentRequest
from gateway.operations.signed import SignedOperation, ToSign
from gateway.schemes.offline import Voucher
from gateway.wallets.accounts import (
    Ending,
    TransferIntent,
    TransferSigning,
    Wallets,
    bigint_array,
    transfer_payload,
    transfer_payload_parts,
)
from tests.pg import PostgresServer

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[2]
DELAY_S = 0.0025


def entry(n: int, action: str = "test.event") -> AuditEntry:
    return AuditEntry("tester", "admin", action, "allowed", result={"n": n}, request_id=f"r{n}")


def wallets_on(database: PostgresDatabase, **wallet_settings: Any) -> Wallets:
    settings = load_settings(None, environ={})
    settings.store.dsn = database.dsn
    for key, value in wallet_settings.items():
        setattr(settings.wallets, key, value)
    # Transfers neither sign nor read the HSM profile inside their transaction.
    return Wallets(database, cast(Any, None), cast(Any, None), settings)


def open_wallet(wallets: Wallets, tx: Tx, tier: int = 1) -> str:
    document = wallets.open_in(tx, {"holder_name": "Test Holder", "phone": "13800000000", "tier": tier,
                                    "kind": "personal"}, entry(0, "wallets.open"))
    return str(document["wallet_id"])


@pytest.fixture
async def database(postgres_server: PostgresServer) -> AsyncIterator[PostgresDatabase]:
    database = await PostgresDatabase.open(postgres_server.create_database(), size=4)
    await database.migrate()
    try:
        yield database
    finally:
        await database.close()


def ecny_key(tx: Tx) -> None:
    """An e-CNY key record, as `POST /v1/keys` leaves it (transfers read it; they do not sign here)."""
    key_id = os.urandom(16).hex()
    tx.execute("INSERT INTO keys (key_id, label, algorithm, usages, public_key, created_at, created_by, family_id) "
               "VALUES (?, ?, 'ecdsa-p256', 'ecny', ?, 'now', 'admin', ?)", (key_id, f"ecny-{key_id[:8]}",
                                                                            b"\x04" + os.urandom(64), key_id))
    tx.execute("INSERT INTO key_usage_active (usage, key_id, since) VALUES ('ecny', ?, 'now')", (key_id,))


async def funded_pair(database: PostgresDatabase, wallets: Wallets, fen: int = 1_000_000,
                      tiers: tuple[int, int] = (3, 3)) -> tuple[str, str]:
    def setup(tx: Tx) -> tuple[str, str]:
        payer, payee = open_wallet(wallets, tx, tiers[0]), open_wallet(wallets, tx, tiers[1])
        journal.post(tx, "cash_in", payer, [(journal.wallet_account(payer), fen), (journal.ISSUANCE, -fen)], "t")
        return payer, payee

    return await database.write(setup)


# --- the server-built payload is the payload ---------------------------------------------------------------


async def test_the_server_built_envelope_payload_is_the_canonical_cbor(database: PostgresDatabase) -> None:
    """A transfer envelope whose payload the database assembled differs from the canonical CBOR a verifier
    rebuilds (a wrong seq encoding would make every envelope unverifiable, or two transfers alike)."""
    for seq in (0, 1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1):
        head, tail = transfer_payload_parts("t_" + "ab" * 12, "1234567812345670", "8765432187654321", 12345,
                                            1_700_000_000_000)
        server = await database.read(lambda tx, seq=seq: tx.fetchone("SELECT ecny_cbor_uint(?::bigint) AS c",
                                                                     (seq,)))
        assert server is not None and bytes(server["c"]) == cbor2.dumps(seq)
        expected = transfer_payload("t_" + "ab" * 12, "1234567812345670", "8765432187654321", 12345,
                                    1_700_000_000_000, seq)
        assert head + bytes(server["c"]) + tail == expected
        assert cbor2.loads(expected)["seq"] == seq
    # The function's advisory locks are the very ones the Python code takes.
    names = ["wallet:1234567812345670", "audit-chain", "wallet:", "device:设备-7", *(f"n{i}" for i in range(12))]
    assert {lock_key(name) < 0 for name in names} == {True, False}  # both signs of the 64-bit key
    for name in names:
        row = await database.read(lambda tx, name=name: tx.fetchone("SELECT ecny_lock_key(?) AS k", (name,)))
        assert row is not None and row["k"] == lock_key(name)


async def test_the_tier_limits_sent_as_array_literals_are_the_limits(database: PostgresDatabase) -> None:
    """The server-side checks take the tier limits as ``bigint[]`` literals written by the gateway: each must
    be, element for element (unlimited = NULL), the array psycopg's own list adapter sends."""
    for values in ([500_000, None, 2**62, 0], [None, None, None, None], [1, -1, 10**15, 7]):
        row = await database.read(lambda tx, values=values: tx.fetchone(
            "SELECT ?::bigint[] AS literal, ?::bigint[] AS adapted", (bigint_array(values), values)))
        assert row is not None and row["literal"] == row["adapted"] == values


@pytest.mark.parametrize("one_round_trip", [False, True], ids=["check-then-commit", "commit-with-the-check"])
async def test_a_transfer_posted_by_the_server_keeps_every_invariant(database: PostgresDatabase,
                                                                      one_round_trip: bool) -> None:
    """A server-side check that drifts from the Python policy: an overdraft, a limit passed, a frozen
    wallet paid, or an unknown wallet must be refused with the same problem types — and a sound one
    posted with balanced entries and the envelope payload of the Python path. Both ways: the check read
    before the COMMIT is sent, and the check that refuses by raising, with the COMMIT behind it (a
    refusal then rolls back the audit entry and the risk signal sent before it)."""
    wallets = wallets_on(database)
    payer, payee = await funded_pair(database, wallets, fen=150_000, tiers=(4, 4))
    await database.write(ecny_key)
    ends = Ending(None) if one_round_trip else None

    async def transfer(amount: int, source: str = payer, target: str = payee) -> dict[str, Any]:
        return await database.write(lambda tx: wallets.transfer_in(
            tx, TransferIntent(source, target, amount, "m"), entry(1, "transfers.create"), ends))

    async def written() -> tuple[int, int]:
        return await database.read(lambda tx: (pending_count(tx), int(tx.fetchone(
            "SELECT COUNT(*) AS n FROM risk_outbox")["n"])))

    row = await transfer(1000)
    assert row["status"] == "posted" and row["seq"] == 1
    assert row["active_ecny_key"] is not None  # the key that will sign rode along (and was checked)
    assert bytes(row["payload"]) == transfer_payload(row["transfer_id"], payer, payee, 1000, row["ts"], 1)
    stored = await database.read(lambda tx: tx.fetchone("SELECT payload, entry_id FROM transfers WHERE "
                                                        "transfer_id = ?", (row["transfer_id"],)))
    assert stored is not None and bytes(stored["payload"]) == bytes(row["payload"])
    assert (await transfer(2000))["seq"] == 2
    after_posting = await written()
    with pytest.raises(LimitExceeded) as single:  # tier 4: 200,000 fen a payment
        await transfer(200_001)
    assert single.value.reasons == ["insufficient-funds", "single-limit-exceeded"]  # the Python path's order
    with pytest.raises(InsufficientFunds):
        await transfer(150_000 - 3000 + 1)
    with pytest.raises(WalletNotFound):
        await transfer(1, target="1234567812345670")
    await database.write(lambda tx: tx.execute("UPDATE wallets SET status = 'frozen' WHERE wallet_id = ?", (payee,)))
    with pytest.raises(WalletNotActive) as frozen:
        await transfer(1)
    assert frozen.value.reasons == ["payee-wallet-frozen"]
    assert await written() == after_posting  # no audit entry, no risk signal of a refused transfer
    assert await database.read(journal.check_invariants) == []
    balances = await database.read(lambda tx: (journal.balance(tx, journal.wallet_account(payer)),
                                               journal.balance(tx, journal.wallet_account(payee))))
    assert balances == (150_000 - 3000, 3000)  # the refused ones moved nothing


async def test_the_daily_limit_counts_what_the_server_posted(database: PostgresDatabase) -> None:
    """Splitting a payment to pass the daily limit: the server-side check must count the day's spend
    it recorded itself."""
    wallets = wallets_on(database)
    payer, payee = await funded_pair(database, wallets, fen=2_000_000, tiers=(4, 3))
    for _ in range(2):  # tier 4: 500,000 fen a day, 200,000 a payment
        await database.write(lambda tx: wallets.transfer_in(tx, TransferIntent(payer, payee, 200_000, ""),
                                                            entry(2)))
    with pytest.raises(LimitExceeded) as daily:
        await database.write(lambda tx: wallets.transfer_in(tx, TransferIntent(payer, payee, 100_001, ""),
                                                            entry(3)))
    assert daily.value.reasons == ["daily-limit-exceeded"]


# --- round trips ---------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def behind_proxy(postgres_server: PostgresServer) -> AsyncIterator[tuple[PostgresDatabase, DelayProxy]]:
    """A migrated store with one connection, reached through the delay proxy (which counts the turns)."""
    dsn = postgres_server.create_database()
    proxy = DelayProxy("127.0.0.1", postgres_server.port, DELAY_S)
    port = await proxy.start()
    database = await PostgresDatabase.open(dsn.replace(f":{postgres_server.port}/", f":{port}/"), size=1)
    try:
        await database.migrate()
        yield database, proxy
    finally:
        await database.close()
        await proxy.close()


async def test_a_transfer_costs_two_round_trips(postgres_server: PostgresServer) -> None:
    """A database a network hop away multiplies every round trip inside the wallet lock: the check and
    post of a transfer, with its audit entry and Idempotency-Key record, is at most 2 round trips (counted
    on the wire by the delay proxy) where the transfer does not end its transaction itself (outside the
    signed operation, or with a pinned key family); a replayed key still answers IdempotencyRaced."""
    async with behind_proxy(postgres_server) as (database, proxy):
        wallets = wallets_on(database)
        payer, payee = await funded_pair(database, wallets)
        await database.write(ecny_key)
        # As POST /v1/transfers sends it: nothing read the key before the operation (the guard is queued).
        request = IdempotentRequest("client:test", "key-1", b"h" * 32, looked_up=False)

        def check_and_record(tx: Tx) -> dict[str, Any]:  # what SignedOperation.run does in step 1
            idempotency.guard_in(tx, request)
            intent = TransferIntent(payer, payee, 100, "")
            outcome = wallets.record_transfer_in(tx, intent, entry(5, "transfers.create"))
            assert isinstance(outcome, ToSign) and outcome.subject.key is not None  # the e-CNY key rode along
            idempotency.refer_in(tx, request, outcome.reference)
            row: dict[str, Any] = outcome.subject.row
            return row

        pending_before = await database.read(pending_count)
        before = proxy.turns
        started = time.monotonic()
        row = await database.write(check_and_record)
        elapsed = time.monotonic() - started
        turns = proxy.turns - before
        assert row["status"] == "posted"
        assert turns <= 2, f"{turns} round trips"
        assert elapsed < 2 * 2 * DELAY_S + 0.5 * 2 * DELAY_S + 0.05  # and the clock agrees: no hidden waits
        # The same key again: the duplicate insert travels with the COMMIT and still means "raced".
        with pytest.raises(IdempotencyRaced):
            await database.write(check_and_record)
        assert await database.read(pending_count) == pending_before + 1  # the second one's entry rolled back
        # Races again and again on one connection: a statement psycopg prepares in a batch the race
        # aborted must not break the next transaction ("prepared statement does not exist", a 500).
        for n in range(12):
            request = IdempotentRequest("client:test", f"key-loop-{n}", b"h" * 32, looked_up=False)
            assert (await database.write(check_and_record))["status"] == "posted"
            with pytest.raises(IdempotencyRaced):
                await database.write(check_and_record)


async def test_a_signed_transfers_decision_costs_one_round_trip_with_its_commit(
        postgres_server: PostgresServer) -> None:
    """Step 1 of POST /v1/transfers as the signed operation runs it: the Idempotency-Key guard, the audit
    entry, the risk signal and the reference sent before the check, the COMMIT right behind it — one round
    trip on the wire in all. A replayed key is still IdempotencyRaced and writes nothing; a disabled e-CNY
    key refuses the transfer (KeyDisabled) and rolls back what was sent with it."""
    async with behind_proxy(postgres_server) as (database, proxy):
        wallets = wallets_on(database)
        payer, payee = await funded_pair(database, wallets)
        await database.write(ecny_key)
        step = StopBeforeSigning()
        operation = SignedOperation(database, step)

        async def step_one(request: IdempotentRequest) -> Any:  # SignedOperation.run, up to the HSM
            intent = TransferIntent(payer, payee, 100, "")
            with pytest.raises(StopBeforeSigning.Stopped):
                await operation.run(request, lambda tx: wallets.record_transfer_in(
                    tx, intent, entry(5, "transfers.create"), Ending(request)))
            return step.subject

        request = IdempotentRequest("client:test", "key-1", b"h" * 32, looked_up=False)
        pending_before = await database.read(pending_count)
        before = proxy.turns
        subject = await step_one(request)
        assert subject.key is not None  # the e-CNY key rode along, checked by the database
        assert proxy.turns - before == 1
        assert request.recorded_in_transaction
        stored = await database.read(lambda tx: idempotency.lookup_in(tx, request))
        assert stored is not None and bytes(stored["body"]) == subject.row["transfer_id"].encode()  # committed
        # The same key again: nothing of the second one stays.
        with pytest.raises(IdempotencyRaced):
            await operation.run(IdempotentRequest("client:test", "key-1", b"h" * 32, looked_up=False),
                                lambda tx: wallets.record_transfer_in(tx, TransferIntent(payer, payee, 100, ""),
                                                                      entry(6), Ending(None)))
        assert await database.read(pending_count) == pending_before + 1
        # A disabled key: refused, and the transfer, its audit entry and its reference rolled back.
        await database.write(lambda tx: tx.execute("UPDATE keys SET status = 'disabled', status_changed_at = 'now' "
                                                   "WHERE key_id IN (SELECT key_id FROM key_usage_active)"))
        fresh = IdempotentRequest("client:test", "key-2", b"h" * 32, looked_up=False)
        with pytest.raises(KeyDisabled):
            await operation.run(fresh, lambda tx: wallets.record_transfer_in(
                tx, TransferIntent(payer, payee, 100, ""), entry(7), Ending(fresh)))
        assert not fresh.recorded_in_transaction
        assert await database.read(lambda tx: idempotency.lookup_in(tx, fresh)) is None
        assert await database.read(pending_count) == pending_before + 1
        balance = await database.read(lambda tx: journal.balance(tx, journal.wallet_account(payee)))
        assert balance == 100


class StopBeforeSigning:
    """A signing step that keeps what step 1 recorded and stops where the HSM would be asked."""

    class Stopped(Exception):
        pass

    subject: Any = None

    async def load(self, reference: str) -> Any:
        raise AssertionError("not a replay")

    def answered(self, subject: Any) -> None:
        return None

    async def sign(self, subject: Any) -> Any:
        self.subject = subject
        raise self.Stopped

    def store_in(self, tx: Tx, subject: Any, signature: Any) -> Any:
        raise AssertionError("never signed")


class StandInSignature(TransferSigning):
    """The transfers' signing step with the HSM left out: ``sign`` answers fixed bytes (these tests are
    about what the store keeps and answers, not the signature: the HSM tests verify real envelopes)."""

    def __init__(self, wallets: Wallets, envelope: bytes) -> None:
        super().__init__(wallets)
        self.envelope = envelope

    async def sign(self, subject: Any) -> tuple[bytes, str]:
        return self.envelope, "stand-in-kid"


async def test_a_signature_is_stored_with_its_answer_in_one_round_trip_and_a_lost_race_answers_the_kept_one(
        postgres_server: PostgresServer) -> None:
    """Step 4 of a signed operation (store the signature, complete the Idempotency-Key record, COMMIT) is
    one round trip on the wire, so a signed transfer costs two in all. Two finishers racing over one
    recorded transfer — a read that signs it (no key) and the key's replay, which loaded the transfer
    before the read stored its envelope: the replay's signature is not kept, and it answers, and completes
    its key's record, with the envelope that was kept — never with its own."""
    async with behind_proxy(postgres_server) as (database, proxy):
        wallets = wallets_on(database)
        payer, payee = await funded_pair(database, wallets)
        await database.write(ecny_key)

        def record(request: IdempotentRequest) -> Any:
            return lambda tx: wallets.record_transfer_in(tx, TransferIntent(payer, payee, 100, ""),
                                                         entry(5, "transfers.create"), Ending(request))

        first = IdempotentRequest("client:test", "key-1", b"h" * 32, looked_up=False)
        before = proxy.turns
        answer = await SignedOperation(database, StandInSignature(wallets, b"envelope-A")).run(first, record(first))
        assert proxy.turns - before == 2  # step 1 with its COMMIT, then step 4 with its COMMIT
        assert answer.status == 201 and base64.b64decode(answer.document["envelope"]) == b"envelope-A"
        stored = await database.read(lambda tx: idempotency.lookup_in(tx, first))
        assert stored is not None and bytes(stored["body"]) == answer.body

        # The race: step 1 of a second transfer, then the two finishers.
        second = IdempotentRequest("client:test", "key-2", b"h" * 32, looked_up=False)
        stop = StopBeforeSigning()
        with pytest.raises(StopBeforeSigning.Stopped):
            await SignedOperation(database, stop).run(second, record(second))
        transfer_id = stop.subject.row["transfer_id"]
        replay = StandInSignature(wallets, b"envelope-C")
        loaded_early = await replay.load(transfer_id)  # awaits its envelope when the replay loads it
        assert replay.answered(loaded_early) is None
        read = await SignedOperation(database, StandInSignature(wallets, b"envelope-B")).reference(transfer_id)
        assert base64.b64decode(read.document["envelope"]) == b"envelope-B"
        late = await SignedOperation(database, replay).finish(transfer_id, loaded_early, second)
        assert late.document == read.document  # the kept envelope, not the replay's own
        row = await database.read(lambda tx: tx.fetchone("SELECT envelope FROM transfers WHERE transfer_id = ?",
                                                         (transfer_id,)))
        assert row is not None and bytes(row["envelope"]) == b"envelope-B"
        record_of_key = await database.read(lambda tx: idempotency.lookup_in(tx, second))
        assert record_of_key is not None and record_of_key["status"] == 201
        assert json.loads(bytes(record_of_key["body"])) == read.document  # a replay of key-2 answers envelope B


def add_device(tx: Tx, device_id: str, wallet_id: str, cap_balance: int, exp_ms: int) -> None:
    """A registered device, as registration leaves it (its certificate is not read by a load)."""
    tx.execute(
        "INSERT INTO devices (device_id, wallet_id, model, public_key, tier, cap_per_payment, cap_balance, "
        "cap_payments_per_sync, cert_iat, cert_exp, certificate, kid, status, chain_hash, created_at, created_by, "
        "updated_at) VALUES (?, ?, 'test', ?, 3, 1000, ?, 10, 0, ?, ?, 'kid', 'active', ?, 'now', 'registrar', 'now')",
        (device_id, wallet_id, os.urandom(65), cap_balance, exp_ms, b"cert", b""),
    )


async def test_cash_and_a_load_cost_two_round_trips(postgres_server: PostgresServer) -> None:
    """The same multiplication for cash-in, cash-out and a device load: at most 2 round trips each on the
    wire, with their checks intact (a load above the device's offline cap is refused, nothing written)."""
    async with behind_proxy(postgres_server) as (database, proxy):
        settings = load_settings(None, environ={})
        wallets = wallets_on(database)
        devices = Devices(database, cast(Any, None), cast(Any, None), settings)
        wallet_id = await database.write(lambda tx: open_wallet(wallets, tx, 3))
        await database.write(lambda tx: add_device(tx, "dev-1", wallet_id, 50_000, journal.epoch_millis() + 86_400_000))
        turns: dict[str, int] = {}

        async def counted(name: str, fn: Any) -> Any:
            before = proxy.turns
            result = await database.write(fn)
            turns[name] = proxy.turns - before
            return result

        cashed = await counted("cash_in", lambda tx: wallets.cash_in(tx, wallet_id, 100_000, "teller",
                                                                     entry(1, "wallets.cash_in")))
        assert cashed["balance_fen"] == 100_000
        out = await counted("cash_out", lambda tx: wallets.cash_out(tx, wallet_id, 10_000, "teller",
                                                                    entry(2, "wallets.cash_out")))
        assert out["balance_fen"] == 90_000
        loaded = await counted("load", lambda tx: devices.load_in(tx, "dev-1", 30_000, entry(3, "devices.load")))
        assert isinstance(loaded, LoadResult) and loaded.load_seq == 1
        assert max(turns.values()) <= 2, turns
        stored = await database.read(lambda tx: tx.fetchone("SELECT * FROM device_loads WHERE device_id = 'dev-1'"))
        assert stored is not None and bytes(stored["payload"]) == loaded.payload
        assert loaded.payload == Voucher("dev-1", 1, 30_000, int(stored["iat"]), int(stored["exp"])).payload()
        with pytest.raises(LimitExceeded) as cap:  # 30,000 loaded of a 50,000 cap
            await database.write(lambda tx: devices.load_in(tx, "dev-1", 20_001, entry(4, "devices.load")))
        assert cap.value.reasons == ["offline-balance-cap-exceeded"]
        with pytest.raises(InsufficientFunds):
            await database.write(lambda tx: wallets.cash_out(tx, wallet_id, 60_001, "teller", entry(5)))
        assert await database.read(journal.check_invariants) == []
        reserve = await database.read(lambda tx: journal.balance(tx, journal.reserve_account(wallet_id)))
        assert reserve == 30_000


async def test_a_session_and_a_recorded_answer_are_read_in_one_round_trip_each(
        postgres_server: PostgresServer) -> None:
    """Every teller request reads its session, and a request whose key is looked up first reads the key's
    record: each a read transaction of one statement, which cost two round trips (the statement, then
    the ROLLBACK waited for). Counted on the wire: one each. What they answer is unchanged — an expired
    session, an unknown token and a key used with another body are still refused (the controls)."""
    async with behind_proxy(postgres_server) as (database, proxy):
        authenticator = Authenticator(database, session_ttl=3600, cache_seconds=0)
        await database.write(lambda tx: add_user(tx, authenticator.hasher, "teller9", Role.TELLER,
                                                    "a long enough password"))
        token, principal, _ = await authenticator.login("teller9", "a long enough password")
        before = proxy.turns
        assert await authenticator.authenticate(token) == principal
        assert proxy.turns - before == 1
        with pytest.raises(Unauthenticated):
            await authenticator.authenticate(token + "x")
        await database.write(lambda tx: tx.execute("UPDATE user_sessions SET expires_at = '2000-01-01T00:00:00Z'"))
        with pytest.raises(Unauthenticated):
            await authenticator.authenticate(token)
        request = IdempotentRequest("user:teller9", "k-1", b"h" * 32)
        before = proxy.turns
        assert await idempotency.find(database, request) is None
        assert proxy.turns - before == 1
        await database.write(lambda tx: idempotency.answer_in(tx, request, idempotency.Answer(200, {"ok": 1})))
        before = proxy.turns
        found = await idempotency.find(database, request)
        assert proxy.turns - before == 1 and found is not None and found.status == 200
        with pytest.raises(IdempotencyConflict):
            await idempotency.find(database, IdempotentRequest("user:teller9", "k-1", b"other body hash!" * 2))


def raw_key(tx: Tx) -> str:
    """A raw key record, as `POST /v1/keys` leaves it (nothing signs with it here: the audit log confirms it)."""
    key_id = os.urandom(16).hex()
    tx.execute("INSERT INTO keys (key_id, label, algorithm, usages, public_key, created_at, created_by, family_id) "
               "VALUES (?, ?, 'ecdsa-p256', 'raw', ?, 'now', 'admin', ?)", (key_id, f"raw-{key_id[:8]}",
                                                                           b"\x04" + os.urandom(64), key_id))
    return key_id


async def test_a_group_of_signatures_confirms_its_keys_in_one_read(postgres_server: PostgresServer) -> None:
    """A database a network hop away: raw signatures confirm their keys in the group commit that releases
    them. One read per signature would make a group of 30 wait 30 round trips inside its transaction; the
    group reads every key at once, so it costs what one signature costs. A key disabled beforehand refuses
    only its own entries, each written as its refusal."""
    async with behind_proxy(postgres_server) as (database, proxy):
        keys = [await database.write(raw_key) for _ in range(3)]
        await database.write(lambda tx: set_status(tx, keys[2], KeyStatus.DISABLED))
        audit = AuditLog(database, cast(Any, None), 10**9, 1000, None)  # no checkpoint: its signer is never asked

        def record(n: int) -> Any:
            return audit.record_with(entry(n, "keys.sign"), lambda tx: n, signed_by=(keys[n % 2], Usage.RAW))

        before = proxy.turns
        assert (await record(0))[1] == 0
        alone = proxy.turns - before
        before = proxy.turns
        outcomes = await asyncio.gather(*(record(n) for n in range(1, 31)),
                                        audit.record_with(entry(31, "keys.sign"), lambda tx: 31,
                                                          signed_by=(keys[2], Usage.RAW)),
                                        return_exceptions=True)
        grouped = proxy.turns - before
        assert alone <= 2 and grouped == alone, (alone, grouped)
        assert [o[1] for o in outcomes[:30] if isinstance(o, tuple)] == list(range(1, 31))
        refused = outcomes[30]
        assert isinstance(refused, KeyDisabled) and refused.audited_in_transaction
        await audit.chain_pending()
        rows = await database.read(lambda tx: tx.fetchall(
            "SELECT decision, reasons FROM audit_log WHERE action = 'keys.sign' ORDER BY seq"))
        assert [row["decision"] for row in rows] == ["allowed"] * 31 + ["refused"]
        assert json.loads(rows[-1]["reasons"]) == ["key-disabled"]
        report = await database.read(verify_chain)
        assert report.ok and report.pending == 0 and report.entries == 32


# --- locks no wider than a wallet ----------------------------------------------------------------------------


async def test_a_stalled_chainer_cannot_stall_decisions(database: PostgresDatabase) -> None:
    """One global lock on the write path: a chainer (or anyone) holding the audit-chain lock must not
    hold up transfers, which now stage their entries without it; and a lock on one wallet does not hold
    up a transfer between two others."""
    wallets = wallets_on(database)
    payer, payee = await funded_pair(database, wallets)
    other_payer, other_payee = await funded_pair(database, wallets)
    with psycopg.connect(database.dsn, autocommit=False) as holder:
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key(CHAIN_LOCK),))
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key(f"wallet:{other_payer}"),))
        started = time.monotonic()
        row = await database.write(lambda tx: wallets.transfer_in(tx, TransferIntent(payer, payee, 5, ""),
                                                                  entry(7)))
        assert row["status"] == "posted" and time.monotonic() - started < 1.0
        # The chainer that is not the lock's holder stands aside instead of waiting.
        assert await database.write(lambda tx: chain_staged(tx, 100)) is None
        # The wallet lock does hold up a transfer from that wallet (the control).
        blocked = asyncio.ensure_future(database.write(lambda tx: wallets.transfer_in(
            tx, TransferIntent(other_payer, other_payee, 5, ""), entry(8))))
        await asyncio.sleep(0.3)
        assert not blocked.done()
        holder.rollback()
    assert (await blocked)["status"] == "posted"
    assert await database.write(lambda tx: chain_staged(tx, 100))
    assert (await database.read(verify_chain)).ok


def hold_a_cash_in(holder: psycopg.Connection[Any], wallet_id: str, amount: int) -> None:
    """What a cash-in's transaction holds until its COMMIT, on a connection the test keeps open: the
    server-side check and post (``ecny_post_cash``), the wallet's lock and the issuance leg."""
    holder.execute("SELECT * FROM ecny_post_cash('cash_in', %s, %s, %s, 'teller', %s, 'now', "
                   "'{NULL,NULL,NULL,NULL}'::bigint[], NULL, NULL)",
                   (wallet_id, amount, os.urandom(12).hex(), journal.business_day()))


async def test_cash_movements_of_two_wallets_never_wait_on_the_issuance_account(database: PostgresDatabase) -> None:
    """A lock wider than a wallet: every cash-in and cash-out posts against bank:issuance, and while that
    posting updated the account's row, each one held the row until its COMMIT — every cash movement of the
    database waited for the one before it (bench/pg_scaling.py --kind cash). A cash-in left open on one
    wallet must not hold up a cash-out of another; it must hold up one of its own wallet (the control)."""
    wallets = wallets_on(database)
    held, other = await database.write(lambda tx: (open_wallet(wallets, tx, 3), open_wallet(wallets, tx, 3)))
    await database.write(lambda tx: wallets.cash_in(tx, other, 50_000, "teller", entry(1, "wallets.cash_in")))
    with psycopg.connect(database.dsn, autocommit=False) as holder:
        hold_a_cash_in(holder, held, 70_000)
        async with asyncio.timeout(20):  # waiting for the held cash-in to commit would be the failure
            out = await database.write(lambda tx: wallets.cash_out(tx, other, 20_000, "teller",
                                                                   entry(2, "wallets.cash_out")))
        assert out["balance_fen"] == 30_000
        blocked = asyncio.ensure_future(database.write(lambda tx: wallets.cash_in(
            tx, held, 5, "teller", entry(3, "wallets.cash_in"))))
        await asyncio.sleep(0.3)
        assert not blocked.done()  # the same wallet waits: its lock is the wallet's
        holder.commit()
    assert (await blocked)["balance_fen"] == 70_005
    assert await database.read(lambda tx: journal.balance(tx, journal.ISSUANCE)) == -(50_000 - 20_000 + 70_005)
    assert await database.read(journal.check_invariants) == []


async def test_the_fold_moves_what_committed_once_and_nothing_else(database: PostgresDatabase) -> None:
    """The pending amounts of the bank's accounts folded into their rows: an amount folded twice (two
    processes folding at once), one folded before its transaction committed (and so folded again, or lost
    if it rolled back), or one lost by a fold that failed half-way would each change the money in
    circulation. The balance a reader sees never moves because of a fold."""
    wallets = wallets_on(database)
    wallet_ids = await database.write(lambda tx: [open_wallet(wallets, tx, 3) for _ in range(4)])
    for n, wallet_id in enumerate(wallet_ids):
        await database.write(lambda tx, w=wallet_id, n=n: wallets.cash_in(tx, w, 1_000 * (n + 1), "teller",
                                                                           entry(n, "wallets.cash_in")))

    def issuance(tx: Tx) -> tuple[int, int, int]:
        row = tx.fetchone("SELECT balance FROM accounts WHERE account_id = ?", (journal.ISSUANCE,))
        pending = tx.fetchone("SELECT COUNT(*) AS n FROM house_pending")
        assert row is not None and pending is not None
        return journal.balance(tx, journal.ISSUANCE), int(row["balance"]), int(pending["n"])

    assert await database.read(issuance) == (-10_000, 0, 4)  # pending: the row was not touched
    with psycopg.connect(database.dsn, autocommit=False) as holder:
        hold_a_cash_in(holder, wallet_ids[0], 500)  # not committed while the fold runs

        def fold_then_fail(tx: Tx) -> None:
            assert journal.fold_house(tx) == 4
            raise RuntimeError("the fold's process dies before its COMMIT")

        with pytest.raises(RuntimeError):
            await database.write(fold_then_fail)
        assert await database.read(issuance) == (-10_000, 0, 4)  # rolled back: nothing lost
        assert await database.write(journal.fold_house) == 4  # the open cash-in's amount is not among them
        assert await database.read(issuance) == (-10_000, -10_000, 0)
        holder.commit()
    assert await database.read(issuance) == (-10_500, -10_000, 1)
    for n, wallet_id in enumerate(wallet_ids):  # more, then two folds at once
        await database.write(lambda tx, w=wallet_id, n=n: wallets.cash_out(tx, w, 100, "teller",
                                                                            entry(10 + n, "wallets.cash_out")))
    folded = await asyncio.gather(database.write(journal.fold_house), database.write(journal.fold_house))
    assert sum(folded) == 5
    assert await database.read(issuance) == (-10_100, -10_100, 0)
    assert await database.read(journal.check_invariants) == []


async def test_a_rewritten_pending_amount_or_bank_balance_fails_the_ledger_check(database: PostgresDatabase) -> None:
    """An insider with the database's password hides money in circulation: deletes a pending issuance
    amount, rewrites the folded row, or parks an amount for a wallet among the bank's pending ones. Each
    leaves the postings disagreeing with the balances, which `ledger check` reports."""
    wallets = wallets_on(database)
    wallet_id = await database.write(lambda tx: open_wallet(wallets, tx, 3))
    for n in range(3):
        await database.write(lambda tx, n=n: wallets.cash_in(tx, wallet_id, 1_000, "teller", entry(n)))
    await database.write(journal.fold_house)
    await database.write(lambda tx: wallets.cash_in(tx, wallet_id, 2_000, "teller", entry(3)))
    assert await database.read(journal.check_invariants) == []

    async def tampered(statement: str, params: tuple[Any, ...]) -> list[str]:
        with psycopg.connect(database.dsn, autocommit=False) as insider:
            insider.execute(statement, params)
            problems: list[str] = await database.read(journal.check_invariants)
            assert problems == []  # not committed yet: nothing to see
            insider.commit()
        problems = await database.read(journal.check_invariants)
        return problems

    problems = await tampered("DELETE FROM house_pending WHERE amount = -2000", ())
    assert any("bank:issuance balance -3000 != postings -5000" in p for p in problems), problems
    assert any("do not sum to zero" in p for p in problems), problems
    await database.write(lambda tx: tx.execute("INSERT INTO house_pending (account_id, amount) VALUES (?, ?)",
                                               (journal.ISSUANCE, -2_000)))  # put back
    assert await database.read(journal.check_invariants) == []
    problems = await tampered("UPDATE accounts SET balance = balance + 1000 WHERE account_id = %s",
                              (journal.ISSUANCE,))
    assert any("bank:issuance balance -4000 != postings -5000" in p for p in problems), problems
    await database.write(lambda tx: tx.execute("UPDATE accounts SET balance = balance - 1000 WHERE account_id = ?",
                                               (journal.ISSUANCE,)))
    problems = await tampered("INSERT INTO house_pending (account_id, amount) VALUES (%s, 700)",
                              (journal.wallet_account(wallet_id),))
    assert any("not a bank account" in p for p in problems), problems


async def test_the_days_cash_total_is_counted_as_posted_and_a_lowered_count_is_caught(
        database: PostgresDatabase) -> None:
    """The daily approval thresholds read a per-wallet running total (wallet_moves) instead of summing the
    wallet's postings of the day on every cash movement. An insider who lowers it (to slip the next
    cash-in under the daily threshold without a second person) leaves it disagreeing with the postings:
    `ledger check` names the wallet, the kind and the day. The count itself is the postings' (an oracle:
    the old sum over postings joined with the journal)."""
    wallets = wallets_on(database)
    settings = wallets.settings.approvals
    settings.cash_in_threshold_fen, settings.cash_in_daily_threshold_fen = 50_000, 100_000
    wallet_id = await database.write(lambda tx: open_wallet(wallets, tx, 1))
    for n in range(2):
        done = await database.write(lambda tx, n=n: wallets.cash_in(tx, wallet_id, 40_000, "teller", entry(n)))
        assert done["balance_fen"] == 40_000 * (n + 1)
    await database.write(lambda tx: wallets.cash_out(tx, wallet_id, 5_000, "teller", entry(5)))

    def counted_and_posted(tx: Tx) -> tuple[int, int]:
        posted = tx.fetchone("SELECT COALESCE(SUM(p.amount), 0) AS moved FROM postings p JOIN journal j "
                             "ON j.entry_id = p.entry_id WHERE p.account_id = ? AND j.kind = 'cash_in' "
                             "AND j.business_day = ?", (journal.wallet_account(wallet_id), journal.business_day()))
        assert posted is not None
        return journal.moved_today(tx, wallet_id, "cash_in", journal.business_day()), int(posted["moved"])

    assert await database.read(counted_and_posted) == (80_000, 80_000)
    parked = await database.write(lambda tx: wallets.cash_in(tx, wallet_id, 30_000, "teller", entry(2)))
    assert parked["status"] == "pending" and parked["payload"]["day_total_fen"] == 110_000  # (the control)
    with psycopg.connect(database.dsn, autocommit=True) as insider:
        insider.execute("UPDATE wallet_moves SET amount = 0 WHERE wallet_id = %s AND kind = 'cash_in'", (wallet_id,))
    slipped = await database.write(lambda tx: wallets.cash_in(tx, wallet_id, 30_000, "teller", entry(3)))
    assert slipped["balance_fen"] == 105_000  # the tampered count let it through on one person's word...
    problems = await database.read(journal.check_invariants)
    assert problems == [f"wallet {wallet_id} cash_in on {journal.business_day()}: counted 30000 != postings 110000"]


# --- pending entries ---------------------------------------------------------------------------------------


async def test_pending_entries_are_reported_not_hidden(database: PostgresDatabase) -> None:
    """An auditor misled by a chain that looks complete while decisions are still staged: verification
    reports them as pending (and does not call them verified), until the chainer numbers them."""
    await database.write(lambda tx: append(tx, [entry(1), entry(2), entry(3)]))
    report = await database.read(verify_chain)
    assert report.ok and report.pending == 3 and report.entries == 0
    assert any("3 entries are pending" in warning for warning in report.warnings)
    assert report.document()["pending"] == 3
    assert await database.write(lambda tx: chain_staged(tx, 100)) == [1, 2, 3]
    report = await database.read(verify_chain)
    assert (report.ok, report.pending, report.entries) == (True, 0, 3)


# --- the chainer dies --------------------------------------------------------------------------------------

CHAINER = """
import asyncio, sys
from gateway.audit.chain import chain_staged
from gateway.ledger.postgres import PostgresDatabase

async def main(dsn):
    database = await PostgresDatabase.open(dsn, size=1)
    def batch(tx):
        numbers = chain_staged(tx, 40)
        if numbers:
            tx.execute("SELECT pg_sleep(0.03)")  # keep the transaction open: a kill lands inside it
        return numbers
    while True:
        if await database.write(batch) is None:
            await asyncio.sleep(0.05)  # a follower: try to take over soon

asyncio.run(main(sys.argv[1]))
"""


def start_chainer(dsn: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", CHAINER, dsn], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


async def test_a_chainer_killed_midway_loses_and_repeats_nothing(database: PostgresDatabase) -> None:
    """A chainer killed with SIGKILL in the middle of a chaining transaction (a crash, an OOM kill): no
    staged entry may be lost, none chained twice, and another instance's chainer takes over."""
    total = 2000
    for start in range(0, total, 200):
        await database.write(lambda tx, start=start: append(tx, [entry(n) for n in range(start, start + 200)]))
    staged = await database.read(lambda tx: tx.fetchall("SELECT staged_id FROM audit_staged"))
    staged_ids = {int(row["staged_id"]) for row in staged}
    assert len(staged_ids) == total

    async def chained() -> int:
        row = await database.read(lambda tx: tx.fetchone("SELECT COUNT(*) AS n FROM audit_log"))
        return int(row["n"]) if row else 0

    leader = start_chainer(database.dsn)
    follower = None
    try:
        deadline = time.monotonic() + 60
        while await chained() < 300 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        follower = start_chainer(database.dsn)  # waits as a follower: the leader holds the lock
        await asyncio.sleep(0.2)
        leader.send_signal(signal.SIGKILL)
        leader.wait(10)
        at_kill = await chained()
        assert 300 <= at_kill < total, at_kill  # midway
        while await database.read(pending_count) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        for process in (leader, follower):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait(10)
    assert await database.read(pending_count) == 0, "the follower did not take over"
    rows = await database.read(lambda tx: tx.fetchall("SELECT seq, staged_id, request_id FROM audit_log ORDER BY seq"))
    assert [int(row["seq"]) for row in rows] == list(range(1, total + 1))  # no gap, no repeat
    assert sorted(int(row["staged_id"]) for row in rows) == sorted(staged_ids)  # each staged entry exactly once
    assert sorted(row["request_id"] for row in rows) == sorted(f"r{n}" for n in range(total))
    report = await database.read(verify_chain)
    assert report.ok and report.entries == total and report.pending == 0, report.problem


async def test_a_command_line_change_is_chained_without_a_running_gateway(database: PostgresDatabase) -> None:
    """An administrative change made from the command line while no gateway runs stays pending (out of
    the verified chain) until some gateway starts: the command chains what it staged itself."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ECNY_STORE__DSN": database.dsn}
    added = subprocess.run([sys.executable, "-m", "gateway.cli", "users", "add", "--username", "carol",
                            "--role", "teller", "--password-stdin"], input="a long enough password 1",
                           env=env, capture_output=True, text=True, timeout=120)
    assert added.returncode == 0, added.stderr
    assert await database.read(pending_count) == 0
    rows = await database.read(lambda tx: tx.fetchall("SELECT action, result FROM audit_log"))
    assert any(row["action"] == "users.add" and "carol" in row["result"] for row in rows), rows
    assert (await database.read(verify_chain)).ok
