"""Reconciliation in bulk, as bench/reconcile.py drives it: one journal entry per (sync, payer's wallet,
payee's wallet) with every payment naming its entry; a payment can never get a second entry; exports
read in worker processes (pickled compactly) reconcile exactly as exports read here."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import GatewayError
from gateway.hardwallet.simulator import SimulatedDevice
from gateway.ledger.journal import check_invariants
from gateway.offline.invariants import check_offline_entries, offline_entry_id
from gateway.offline.settings import OfflineSettings
from gateway.offline.upload import read_uploads
from gateway.offline.verify import PoolVerifier
from gateway.schemes import offline
from tests.offline_harness import OfflineHarness


def world(path: Path, settings: OfflineSettings | None = None,
          verifier: PoolVerifier | None = None) -> tuple[OfflineHarness, list[SimulatedDevice]]:
    harness = OfflineHarness(str(path), settings, verifier)
    devices = [harness.device(harness.wallet(cash=10**9)) for _ in range(3)]
    for device in devices:
        harness.load(device, 1_000_000)
    return harness, devices


def pay(payer: SimulatedDevice, payee: SimulatedDevice, amount: int) -> bytes:
    made = payer.pay(payee.state.device_id, amount)
    payee.receive(made["payment"], made["certificate"])
    return bytes(made["hash"])


def wallet_of(harness: OfflineHarness, device: SimulatedDevice) -> str:
    row = harness.read(lambda tx: tx.fetchone("SELECT wallet_id FROM devices WHERE device_id = ?",
                                              (device.state.device_id,)))
    assert row is not None
    return str(row["wallet_id"])


def entries(harness: OfflineHarness) -> list[dict[str, Any]]:
    return [dict(row) for row in harness.read(lambda tx: tx.fetchall(
        "SELECT j.entry_id, j.reference, j.memo, p.account_id, p.amount FROM journal j JOIN postings p "
        "ON p.entry_id = j.entry_id WHERE j.kind = 'offline' AND p.amount > 0 ORDER BY p.amount"))]


def test_one_entry_per_sync_and_wallet_pair_each_payment_names_it(tmp_path: Path) -> None:
    harness, (a, b, c) = world(tmp_path / "offline.db")
    a_to_b = [pay(a, b, amount) for amount in (100, 200, 300)]
    c_to_b = pay(c, b, 50)
    reports = harness.sync([a, c, b])
    assert sum(r["payments"]["posted"] + r["receipts"]["posted"] for r in reports) == 4
    found = entries(harness)
    # C → B: one payment, its own entry as before (id from its hash, reference its hash).
    assert found[0] == {"entry_id": offline_entry_id(c_to_b), "reference": c_to_b.hex(),
                        "memo": f"offline {c.state.device_id}#1 to {b.state.device_id}",
                        "account_id": f"w:{wallet_of(harness, b)}", "amount": 50}
    # A → B: three payments, one entry; reference: the sync that posted them (B's, whose receipts matched).
    group = found[1]
    assert group["amount"] == 600 and group["reference"] == reports[2]["sync_id"]
    assert group["memo"] == f"offline, 3 payments from {a.state.device_id} to {b.state.device_id}"
    named = harness.read(lambda tx: {bytes(r["payment_hash"]): r["entry_id"] for r in tx.fetchall(
        "SELECT payment_hash, entry_id FROM offline_payments")})
    assert {named[digest] for digest in a_to_b} == {group["entry_id"]}
    assert named[c_to_b] == found[0]["entry_id"]
    assert harness.read(check_invariants) == [] and harness.read(check_offline_entries) == []
    harness.close()


def test_payments_posted_in_different_syncs_get_different_entries(tmp_path: Path) -> None:
    harness, (a, b, _) = world(tmp_path / "offline.db")
    first = [pay(a, b, amount) for amount in (10, 20)]
    harness.sync([a, b])
    second = [pay(a, b, amount) for amount in (30, 40)]
    harness.sync([a, b])
    named = harness.read(lambda tx: {bytes(r["payment_hash"]): r["entry_id"] for r in tx.fetchall(
        "SELECT payment_hash, entry_id FROM offline_payments")})
    assert len({named[d] for d in first}) == 1 and len({named[d] for d in second}) == 1
    assert named[first[0]] != named[second[0]]
    assert [e["amount"] for e in entries(harness)] == [30, 70]
    assert harness.read(check_invariants) == [] and harness.read(check_offline_entries) == []
    harness.close()


def test_a_payment_with_an_entry_never_gets_another(tmp_path: Path) -> None:
    """The row's entry_id is the database's own guard: even with its status wrongly reset, a posted payment
    cannot be posted again (the whole sync rolls back)."""
    harness, (a, b, _) = world(tmp_path / "offline.db")
    digest = pay(a, b, 700)
    harness.sync([a])
    harness.sync([b], ack=False)
    harness.write(lambda tx: tx.execute("UPDATE offline_payments SET status = 'awaiting_payee', payee_seen = 0 "
                                        "WHERE payment_hash = ?", (digest,)))
    before = entries(harness)
    with pytest.raises(GatewayError, match="already has a journal entry"):
        harness.sync([b])  # a fresh export of B holding the same receipt
    assert entries(harness) == before
    harness.close()


@pytest.fixture(scope="module")
def pool() -> Iterator[PoolVerifier]:
    with PoolVerifier(workers=1, inline_below=0) as verifier:
        yield verifier


def ring_exports(harness: OfflineHarness, devices: list[SimulatedDevice]) -> list[tuple[str, bytes]]:
    for index, device in enumerate(devices):
        for amount in (11, 22, 33):
            pay(device, devices[(index + 1) % len(devices)], amount)
    exports = []
    for device in devices:
        device.export_log(0)
        exports.append((device.state.device_id, device.export()))
    return exports


@pytest.mark.parametrize("mode", ["endorsed", "each"])
def test_reading_in_workers_reconciles_as_reading_here(tmp_path: Path, pool: PoolVerifier, mode: str) -> None:
    settings = OfflineSettings(signature_checks=mode)  # type: ignore[arg-type]
    outcomes = []
    for read_ahead in (0, 2):
        harness = OfflineHarness(str(tmp_path / f"offline-{read_ahead}.db"), settings, pool)
        devices = [harness.device(harness.wallet(cash=10**9)) for _ in range(5)]
        for device in devices:
            harness.load(device, 1_000_000)
        reports, _ = harness.reconcile_batches(ring_exports(harness, devices), batch=2, read_ahead=read_ahead)
        assert harness.read(check_invariants) == [] and harness.read(check_offline_entries) == []
        outcomes.append([{key: r[key] for key in ("payments", "receipts", "posted_fen", "held_fen")}
                         for r in reports])
        harness.close()
    assert outcomes[0] == outcomes[1]
    assert sum(r["posted_fen"] for r in outcomes[1]) == 5 * 66


def test_uploads_pickle_compactly_and_keep_what_reconciliation_uses(tmp_path: Path) -> None:
    harness, (a, b, _) = world(tmp_path / "offline.db")
    pay(a, b, 5)
    exports = []
    for device in (a, b):
        device.export_log(0)
        exports.append((device.state.device_id, device.export()))
    here = read_uploads(exports)
    there = pickle.loads(pickle.dumps(here))
    for mine, theirs in zip(here, there, strict=True):
        assert (theirs.device_id, theirs.export_hash, theirs.signed) == (mine.device_id, mine.export_hash,
                                                                        mine.signed)
        assert theirs.export.payments == theirs.export.receipts == []  # in .payments and .receipts, parsed
        assert (theirs.export.counter, theirs.export.rx, theirs.export.loads) == (mine.export.counter, mine.export.rx,
                                                                                 mine.export.loads)
        for ours, copied in zip((*mine.payments, *mine.receipts), (*theirs.payments, *theirs.receipts), strict=True):
            assert copied.message is None and copied.envelope_message() == ours.message
            assert (copied.envelope, copied.index, copied.payment, copied.hash, copied.error, copied.alg) == (
                ours.envelope, ours.index, ours.payment, ours.hash, ours.error, ours.alg)
    # A payment in both its payer's and its payee's log crosses over once: one envelope, one payment.
    sent, received = there[0].payments[0], there[1].receipts[0]
    assert sent.envelope is received.envelope and sent.payment is received.payment
    # What the export's signature check needs (its Sig_structure's digest), not the export a second time.
    pickled = pickle.dumps(here)
    for upload, (_, blob) in zip(here, exports, strict=True):
        message = offline.open_envelope(blob)
        assert upload.signed == (message.to_be_signed(), message.signature)
        assert message.payload not in pickled and pickled.count(sent.envelope) == 1
    harness.close()


@pytest.mark.parametrize("batched", [True, False])
def test_fresh_exports_repeating_reconciled_payments_change_nothing(tmp_path: Path, batched: bool) -> None:
    """New exports (new hashes: not replays) whose payments and receipts were all reconciled before: every record
    is known (found by its payer and counter), nothing is posted or held again."""
    harness, (a, b, c) = world(tmp_path / "offline.db")
    for payer, payee in ((a, b), (b, c), (c, a), (a, c)):
        pay(payer, payee, 100)
    harness.sync([a, b, c], ack=False)
    before = entries(harness), harness.read(lambda tx: [dict(r) for r in tx.fetchall(
        "SELECT payment_hash, status, entry_id FROM offline_payments ORDER BY payment_hash")])
    reports = harness.sync([a, b, c]) if batched else [r for d in (c, b, a) for r in harness.sync([d])]
    assert not any(r["replayed"] for r in reports)
    assert sum(r["payments"]["known"] + r["receipts"]["known"] for r in reports) == 8
    assert sum(r["payments"]["new"] + r["receipts"]["new"] + r["payments"]["posted"] + r["receipts"]["posted"]
               for r in reports) == 0
    after = entries(harness), harness.read(lambda tx: [dict(r) for r in tx.fetchall(
        "SELECT payment_hash, status, entry_id FROM offline_payments ORDER BY payment_hash")])
    assert after == before and all(row["status"] == "posted" for row in after[1])
    assert harness.read(check_invariants) == [] and harness.read(check_offline_entries) == []
    harness.close()
