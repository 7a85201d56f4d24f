"""Fuzzing the log parser and the reconciliation engine: random bytes, truncated and bit-flipped
exports and payments. Only the protocol's own errors (OfflineFormatError, InvalidDeviceSignature),
never a crash or a hang; garbage inside a properly signed export becomes discrepancies, never
postings; the ledger's invariants hold after every example."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import InvalidDeviceSignature, OfflineFormatError
from gateway.hardwallet.simulator import SimulatedDevice
from gateway.ledger.journal import check_invariants
from gateway.offline.upload import read_upload
from gateway.schemes import offline
from tests.offline_harness import OfflineHarness

FUZZ = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow,
                                                                           HealthCheck.function_scoped_fixture])
PARSERS = (offline.parse_payment, offline.parse_voucher, offline.parse_certificate, offline.parse_export,
           offline.parse_statement, offline.parse_ack)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OfflineHarness, SimulatedDevice,
                                                                      SimulatedDevice]]:
    harness = OfflineHarness(str(tmp_path_factory.mktemp("fuzz") / "offline.db"))
    payer, payee = harness.device(harness.wallet(cash=10**9)), harness.device(harness.wallet())
    harness.load(payer, 5_000_000)
    yield harness, payer, payee
    harness.close()


def signed_export(device: SimulatedDevice, payments: list[bytes], receipts: list[bytes]) -> bytes:
    state = device.state
    log = offline.LogExport(state.device_id, device.clock(), state.counter, state.rx, bytes.fromhex(state.certificate),
                            payments, receipts, [])
    return offline.device_sign1(device._key, state.device_id.encode(), log.payload())


@FUZZ
@given(st.binary(max_size=1024))
def test_parsers_raise_only_format_errors(data: bytes) -> None:
    for parser in PARSERS:
        try:
            parser(data)
        except OfflineFormatError:
            pass
    try:
        offline.open_envelope(data)
    except OfflineFormatError:
        pass
    try:
        read_upload("dev-fuzz", data)
    except (OfflineFormatError, InvalidDeviceSignature):
        pass


@FUZZ
@given(st.dictionaries(st.sampled_from(["v", "type", "payer", "payee", "counter", "amount", "ts", "prev",
                                        "device_id", "payments", "receipts", "loads", "certificate", "rx"]),
                       st.none() | st.integers() | st.text(max_size=20) | st.binary(max_size=40)
                       | st.lists(st.binary(max_size=10), max_size=3), max_size=10))
def test_structured_garbage_raises_only_format_errors(claims: dict[str, object]) -> None:
    payload = cbor2.dumps(claims)
    for parser in PARSERS:
        try:
            parser(payload)
        except OfflineFormatError:
            pass


@FUZZ
@given(st.data())
def test_truncated_and_flipped_exports(world: tuple[OfflineHarness, SimulatedDevice, SimulatedDevice],
                                       data: st.DataObject) -> None:
    harness, payer, payee = world
    made = payer.pay(payee.state.device_id, 1)
    blob = bytearray(signed_export(payer, [made["payment"]], []))
    position = data.draw(st.integers(0, 10**6)) % len(blob)  # lengths vary a little from run to run
    if data.draw(st.booleans()):
        del blob[position:]
    else:
        blob[position] ^= 1 << data.draw(st.integers(0, 7))
    try:
        uploads = harness.prepare([(payer.state.device_id, bytes(blob))])
    except (OfflineFormatError, InvalidDeviceSignature):
        return
    if uploads[0].export_ok:  # a flip the signature does not cover cannot happen; a flip in the envelope's
        harness.reconcile(uploads)  # unprotected parts or tag can: it must still reconcile cleanly
    assert harness.read(check_invariants) == []


@FUZZ
@given(st.lists(st.binary(max_size=300), max_size=4), st.lists(st.binary(max_size=300), max_size=4), st.data())
def test_garbage_inside_a_signed_export_becomes_discrepancies(
    world: tuple[OfflineHarness, SimulatedDevice, SimulatedDevice], payments: list[bytes], receipts: list[bytes],
    data: st.DataObject,
) -> None:
    harness, payer, payee = world
    good = payer.pay(payee.state.device_id, 1)["payment"]
    mangled = bytearray(good)
    mangled[data.draw(st.integers(0, 10**6)) % len(mangled)] ^= 1 << data.draw(st.integers(0, 7))
    entries = [*payments, bytes(mangled), good[: data.draw(st.integers(0, 10**6)) % len(good)]]
    before = harness.read(lambda tx: tx.fetchone("SELECT COUNT(*) AS n FROM discrepancies"))
    uploads = harness.prepare([(payer.state.device_id, signed_export(payer, entries, receipts))])
    assert uploads[0].export_ok
    reports = harness.reconcile(uploads)
    counts = reports[0]["payments"]
    assert counts["received"] == len(entries)
    assert counts["posted"] == 0  # nothing posts without its payee's record
    assert harness.read(check_invariants) == []
    assert counts["new"] + counts["known"] + counts["invalid"] == counts["received"]  # nothing dropped
    after = harness.read(lambda tx: tx.fetchone("SELECT COUNT(*) AS n FROM discrepancies"))
    assert before is not None and after is not None
    assert after["n"] >= before["n"] + (1 if counts["invalid"] and reports[0]["discrepancies"] else 0)


def test_same_garbage_twice_raises_one_discrepancy(world: tuple[OfflineHarness, SimulatedDevice,
                                                                SimulatedDevice], tmp_path: Path) -> None:
    harness, payer, _ = world
    blob1 = signed_export(payer, [b"\x00garbage"], [])
    blob2 = signed_export(payer, [b"\x00garbage"], [])  # another export (another signature), same entry
    for blob in (blob1, blob2, blob1):
        harness.reconcile(harness.prepare([(payer.state.device_id, blob)]))
    rows = harness.read(lambda tx: tx.fetchall("SELECT kind FROM discrepancies WHERE evidence LIKE ?",
                                               ("%" + b"\x00garbage".hex() + "%",)))
    assert [r["kind"] for r in rows] == ["malformed-record"]
