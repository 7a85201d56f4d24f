"""Hard wallets through the API: registration, loads, sync and reconciliation, unload, revocation and
the discrepancy API — with in-process simulated devices, on SQLite and on PostgreSQL.

One test per misbehaviour mode of the simulator and per rule of docs/spec.md §8: each must produce the
expected discrepancy and no wrong posting. Certificates, vouchers, payments and acknowledgements
are verified with pycose, an independent COSE implementation.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from gateway.auth.roles import Role
from gateway.errors import DeviceRefused
from gateway.hardwallet.simulator import SimulatedDevice
from gateway.offline.devices import Devices, load_document
from gateway.schemes import offline
from tests.api.support import approve_as_second_person, assert_problem, audit_entries, runtime
from tests.conftest import Gateway
from tests.device.flows import (
    device_doc,
    discrepancies,
    ensure_voucher_key,
    issue_load,
    ledger_problems,
    load,
    open_wallet,
    pay,
    post_sync,
    register,
    sync,
    verify_with_pycose,
    wallet,
)

pytestmark = pytest.mark.softhsm

DAY_MS = 86_400_000


@pytest_asyncio.fixture(scope="module")
async def gw(ledger_gateway: Gateway) -> AsyncIterator[Gateway]:
    await ensure_voucher_key(ledger_gateway)
    yield ledger_gateway


async def pair(gw: Gateway, tier: int = 1, cash: int = 1_000_000, loaded: int = 100_000
               ) -> tuple[SimulatedDevice, SimulatedDevice, str, str]:
    """Two registered devices on two wallets; the first loaded with ``loaded`` fen."""
    payer_wallet, payee_wallet = await open_wallet(gw, tier, cash), await open_wallet(gw, tier)
    payer, payee = SimulatedDevice.create(), SimulatedDevice.create()
    await register(gw, payer, payer_wallet)
    await register(gw, payee, payee_wallet)
    if loaded:
        await load(gw, payer, loaded)
    return payer, payee, payer_wallet, payee_wallet


def kinds(found: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in found)


async def test_pay_offline_and_reconcile_both_sides_posts_exactly_once(gw: Gateway) -> None:
    payer, payee, payer_wallet, payee_wallet = await pair(gw)
    assert (await wallet(gw, payer_wallet))["balance_fen"] == 900_000
    assert (await wallet(gw, payer_wallet))["offline_reserve_fen"] == 100_000
    pay(payer, payee, 1_500)
    pay(payer, payee, 2_500)
    unacknowledged = await sync(gw, payer, ack=False)
    first = await sync(gw, payer)  # a new export (new time) repeating the same payments: nothing new
    assert first["payments"]["known"] == 2 and first["payments"]["new"] == 0 and first["discrepancies"] == []
    first = unacknowledged
    assert first["payments"] == {"received": 2, "new": 2, "known": 0, "posted": 0, "awaiting_payee": 2, "held": 0,
                                 "invalid": 0}
    assert (await wallet(gw, payee_wallet))["balance_fen"] == 0  # not before the payee's record is in
    second = await sync(gw, payee)
    assert second["receipts"]["posted"] == 2 and second["posted_fen"] == 4_000 and second["discrepancies"] == []
    assert (await wallet(gw, payee_wallet))["balance_fen"] == 4_000
    assert (await wallet(gw, payer_wallet))["offline_reserve_fen"] == 96_000
    # Uploading the same logs again changes nothing.
    for report in (first, second):
        again = await post_sync(gw, report["device_id"], report["export"])
        assert again.status == 200 and (await again.json())["replayed"] is True
    assert (await wallet(gw, payee_wallet))["balance_fen"] == 4_000
    document = await device_doc(gw, payer.state.device_id)
    assert document["spent_fen"] == 4_000 and document["chain_counter"] == 2 and document["outstanding_fen"] == 96_000
    # After the acknowledgement the device's log is empty; a new export repeats nothing.
    assert payer.info()["pending_payments"] == 0 and payee.info()["pending_receipts"] == 0
    assert await discrepancies(gw, payer.state.device_id) == []
    assert await ledger_problems(gw) == []


async def test_certificate_voucher_payment_and_ack_verify_with_pycose(gw: Gateway) -> None:
    key = await ensure_voucher_key(gw)
    payer, payee, payer_wallet, _ = await pair(gw, loaded=0)
    document = await device_doc(gw, payer.state.device_id)
    assert document["kid"] == key["key_id"] and document["issuer_public_key_pem"] == key["public_key_pem"]
    claims = verify_with_pycose(base64.b64decode(document["certificate"]), key["public_key_pem"])
    assert claims["type"] == "certificate" and claims["device_id"] == payer.state.device_id
    assert claims["wallet_id"] == payer_wallet and claims["tier"] == 1
    assert claims["caps"] == {"per_payment": 1_000_000, "balance": 5_000_000, "payments_per_sync": 1_000}
    assert offline.point_from_cose_key(dict(claims["pub"])) == payer.point and claims["exp"] > claims["iat"]
    voucher = await load(gw, payer, 12_345)
    claims = verify_with_pycose(base64.b64decode(voucher["voucher"]), key["public_key_pem"])
    assert (claims["device_id"], claims["load_seq"], claims["amount"]) == (payer.state.device_id, 1, 12_345)
    made = pay(payer, payee, 345)
    claims = verify_with_pycose(made["payment"], offline.pem_from_point(payer.point))
    assert (claims["payer"], claims["counter"], claims["payee"], claims["amount"]) == (
        payer.state.device_id, 1, payee.state.device_id, 345)
    assert claims["prev"] == offline.GENESIS and isinstance(claims["ts"], int)
    report = await sync(gw, payer)
    claims = verify_with_pycose(base64.b64decode(report["ack"]), key["public_key_pem"])
    assert claims["type"] == "ack" and claims["counter"] == 1 and report["kid"] == key["key_id"]


# --- one test per misbehaviour mode -------------------------------------------------------------


async def held(gw: Gateway, device_id: str, kind: str) -> dict[str, Any]:
    """The one open discrepancy of ``kind`` for ``device_id``."""
    found = [d for d in await discrepancies(gw, device_id) if d["kind"] == kind]
    assert len(found) == 1, kinds(await discrepancies(gw, device_id))
    return found[0]


async def test_reused_counter_is_a_double_spend_and_freezes_the_payer(gw: Gateway) -> None:
    payer, payee, _, payee_wallet = await pair(gw)
    first = pay(payer, payee, 1_000)
    second = pay(payer, payee, 2_000, misbehave="reuse-counter")
    assert second["counter"] == first["counter"] == 1
    report = await sync(gw, payer)
    assert [d["kind"] for d in report["discrepancies"]] == ["double-spend"]
    assert report["device"]["status"] == "frozen"
    await sync(gw, payee)
    assert (await wallet(gw, payee_wallet))["balance_fen"] == 0  # neither payment posts
    found = await held(gw, payer.state.device_id, "double-spend")
    assert sorted(found["held_payments"]) == sorted(h.hex() for h in (first["hash"], second["hash"]))
    assert (await device_doc(gw, payer.state.device_id))["status"] == "frozen"
    # A frozen device can be loaded no more.
    response = await gw.client.post(f"/v1/devices/{payer.state.device_id}/loads", json={"amount_fen": 1},
                                    headers={**gw.auth(Role.TELLER), "Idempotency-Key": "frozen-load"})
    await assert_problem(response, 422, "device-not-active")
    assert await ledger_problems(gw) == []


async def test_skipped_counter_is_a_gap_and_the_payment_after_it_is_held(gw: Gateway) -> None:
    payer, payee, _, payee_wallet = await pair(gw)
    pay(payer, payee, 1_000)
    gap = pay(payer, payee, 2_000, misbehave="skip-counter")
    assert gap["counter"] == 3
    pay(payer, payee, 3_000)
    await sync(gw, payer)
    await sync(gw, payee)
    found = await held(gw, payer.state.device_id, "counter-gap")
    assert found["evidence"]["missing_from"] == 2 and found["evidence"]["missing_to"] == 2
    assert found["held_payments"] == [gap["hash"].hex()] and found["amount_fen"] == 2_000
    assert (await wallet(gw, payee_wallet))["balance_fen"] == 4_000  # counters 1 and 4, not the one after the gap
    assert await ledger_problems(gw) == []


async def test_broken_hash_chain_is_held(gw: Gateway) -> None:
    payer, payee, _, payee_wallet = await pair(gw)
    pay(payer, payee, 1_000)
    broken = pay(payer, payee, 2_000, misbehave="break-chain")
    await sync(gw, payer)
    await sync(gw, payee)
    found = await held(gw, payer.state.device_id, "broken-chain")
    assert found["held_payments"] == [broken["hash"].hex()]
    assert (await wallet(gw, payee_wallet))["balance_fen"] == 1_000
    assert await ledger_problems(gw) == []


async def test_forged_signature_is_flagged_and_never_posts(gw: Gateway) -> None:
    payer, payee, _, payee_wallet = await pair(gw)
    forged = pay(payer, payee, 5_000, receive=False, misbehave="forge-signature")
    with pytest.raises(DeviceRefused):  # an honest payee refuses it offline
        payee.receive(forged["payment"], forged["certificate"])
    payee.receive(forged["payment"], forged["certificate"], misbehave="accept-anything")  # a careless one takes it
    report = await sync(gw, payer)
    assert report["payments"]["invalid"] == 1 and [d["kind"] for d in report["discrepancies"]] == ["invalid-signature"]
    report = await sync(gw, payee)
    assert report["receipts"]["invalid"] == 1
    found = await held(gw, payer.state.device_id, "invalid-signature")
    assert found["evidence"]["envelope"] == forged["payment"].hex() and found["amount_fen"] == 5_000
    assert (await wallet(gw, payee_wallet))["balance_fen"] == 0
    assert await ledger_problems(gw) == []


async def test_spending_more_than_loaded_is_overspent(gw: Gateway) -> None:
    payer, payee, payer_wallet, payee_wallet = await pair(gw, loaded=10_000)
    pay(payer, payee, 8_000)
    over = pay(payer, payee, 5_000, misbehave="overspend")
    await sync(gw, payer)
    await sync(gw, payee)
    found = await held(gw, payer.state.device_id, "overspent")
    assert found["held_payments"] == [over["hash"].hex()]
    assert (await wallet(gw, payee_wallet))["balance_fen"] == 8_000
    assert (await wallet(gw, payer_wallet))["offline_reserve_fen"] == 2_000
    assert await ledger_problems(gw) == []


async def test_payment_over_the_cap_is_held(gw: Gateway) -> None:
    payer, payee, _, payee_wallet = await pair(gw, tier=4, cash=100_000, loaded=100_000)  # tier 4: ¥500 a payment
    over = pay(payer, payee, 60_000, careless=True, misbehave="exceed-cap")
    pay(payer, payee, 100)
    await sync(gw, payer)
    await sync(gw, payee)
    found = await held(gw, payer.state.device_id, "over-payment-cap")
    assert found["held_payments"] == [over["hash"].hex()] and found["evidence"]["cap_fen"] == 50_000
    assert (await wallet(gw, payee_wallet))["balance_fen"] == 100
    assert await ledger_problems(gw) == []


async def test_more_payments_than_allowed_between_syncs(gw: Gateway) -> None:
    payer, payee, _, payee_wallet = await pair(gw, tier=4, cash=100_000, loaded=100_000)  # tier 4: 100 a sync
    for _ in range(100):
        pay(payer, payee, 10)
    extra = pay(payer, payee, 10, misbehave="too-many-payments")
    await sync(gw, payer)
    await sync(gw, payee)
    found = await held(gw, payer.state.device_id, "too-many-payments")
    assert found["held_payments"] == [extra["hash"].hex()] and found["evidence"]["allowed"] == 100
    assert (await wallet(gw, payee_wallet))["balance_fen"] == 1_000
    assert await ledger_problems(gw) == []


async def test_voucher_loaded_after_expiry_is_flagged_and_its_value_not_spendable(gw: Gateway) -> None:
    payer, payee, _, payee_wallet = await pair(gw, loaded=0)
    voucher = await issue_load(gw, payer.state.device_id, 20_000)
    payer.set_clock(2 * DAY_MS)  # the voucher is valid for a day
    with pytest.raises(DeviceRefused):
        payer.load(base64.b64decode(voucher["voucher"]))
    payer.load(base64.b64decode(voucher["voucher"]), misbehave="expired-voucher")
    spent = pay(payer, payee, 5_000)
    await sync(gw, payer)
    await sync(gw, payee)
    found = [d for d in await discrepancies(gw, payer.state.device_id) if d["kind"] == "voucher-expired"]
    assert len(found) == 2  # the load itself, and the payment spending its value
    assert {d["amount_fen"] for d in found} == {20_000, 5_000}
    assert [spent["hash"].hex()] in [d["held_payments"] for d in found]
    assert (await device_doc(gw, payer.state.device_id))["expired_fen"] == 20_000
    assert (await wallet(gw, payee_wallet))["balance_fen"] == 0
    assert await ledger_problems(gw) == []


async def test_payment_after_the_certificate_expired(gw: Gateway) -> None:
    payer, payee, _, payee_wallet = await pair(gw)
    made = pay(payer, payee, 1_000, ts=offline.MAX_UINT // 2, careless=True,
               misbehave="expired-certificate")
    await sync(gw, payer)
    await sync(gw, payee)
    found = await held(gw, payer.state.device_id, "certificate-expired")
    assert found["held_payments"] == [made["hash"].hex()]
    assert (await wallet(gw, payee_wallet))["balance_fen"] == 0
    assert await ledger_problems(gw) == []


# --- the other rules --------------------------------------------------------------------------


async def test_revoked_device_payments_after_revocation_are_held(gw: Gateway) -> None:
    payer, payee, _, payee_wallet = await pair(gw)
    before = pay(payer, payee, 1_000, ts=1)  # dated before the revocation
    response = await gw.client.post(f"/v1/devices/{payer.state.device_id}/revoke", json={"reason": "reported lost"},
                                    headers=gw.auth(Role.TELLER))
    await assert_problem(response, 403, "forbidden")  # supervisors revoke
    response = await gw.client.post(f"/v1/devices/{payer.state.device_id}/revoke", json={"reason": "reported lost"},
                                    headers=gw.auth(Role.SUPERVISOR))
    assert response.status == 200 and (await response.json())["status"] == "revoked"
    # Dated a second after now, so that it is after the revocation even within the same millisecond.
    after = pay(payer, payee, 2_000, ts=payer.clock() + 1_000)
    await sync(gw, payer)
    await sync(gw, payee)
    found = await held(gw, payer.state.device_id, "device-revoked")
    assert found["held_payments"] == [after["hash"].hex()]
    assert before["hash"].hex() not in found["held_payments"]
    assert (await wallet(gw, payee_wallet))["balance_fen"] == 1_000
    assert await ledger_problems(gw) == []


async def test_unknown_devices_are_flagged(gw: Gateway) -> None:
    payer, payee, _, payee_wallet = await pair(gw)
    to_ghost = pay(payer, None, 1_000, payee_id="ghost-device")
    stranger = SimulatedDevice.create()
    issuer = offline.pem_from_point(stranger.point)  # a certificate it made itself
    certificate = offline.Certificate(stranger.state.device_id, "1" * 16, stranger.point, 1,
                                      offline.Caps(10**6, 10**6, 100), 0, offline.MAX_UINT)
    stranger.certify(offline.device_sign1(stranger._key, b"self", certificate.payload()), issuer)
    stranger.state.loads.append({"load_seq": 1, "amount": 5_000, "exp": offline.MAX_UINT, "at": 0})
    pay(stranger, payee, 700, receive=False)
    payee.receive(stranger.pay(payee.state.device_id, 800)["payment"], b"", misbehave="accept-anything")
    await sync(gw, payer)
    report = await sync(gw, payee)
    assert report["receipts"]["invalid"] == 1
    found = await discrepancies(gw, payer.state.device_id)
    assert [d["kind"] for d in found] == ["unknown-device"] and found[0]["held_payments"] == [to_ghost["hash"].hex()]
    found = await discrepancies(gw, payee.state.device_id)
    assert [d["kind"] for d in found] == ["unknown-device"]
    assert found[0]["evidence"]["unknown_payer"] == stranger.state.device_id
    assert (await wallet(gw, payee_wallet))["balance_fen"] == 0
    assert await ledger_problems(gw) == []


async def test_unmatched_payer_record_is_held_until_the_payee_reports_it(gw: Gateway) -> None:
    payer, payee, _, payee_wallet = await pair(gw)
    made = pay(payer, payee, 1_000, receive=False)  # the payee does not log it (yet)
    await sync(gw, payer)
    payee.set_clock(3_600_000)  # the payee's export is an hour after the payment: it should have it
    await sync(gw, payee)
    found = await held(gw, payer.state.device_id, "unmatched-payer-record")
    assert found["held_payments"] == [made["hash"].hex()]
    assert (await wallet(gw, payee_wallet))["balance_fen"] == 0
    payee.receive(made["payment"], made["certificate"])  # it turns up after all
    report = await sync(gw, payee)
    assert report["receipts"]["posted"] == 1
    assert (await wallet(gw, payee_wallet))["balance_fen"] == 1_000
    resolved = [d for d in await discrepancies(gw, payer.state.device_id, status="resolved")
                if d["discrepancy_id"] == found["discrepancy_id"]]
    assert resolved[0]["resolution"] == "matched" and resolved[0]["resolved_by"] == "system"
    assert await ledger_problems(gw) == []


async def test_unmatched_payee_record_inside_a_payers_gap(gw: Gateway) -> None:
    payer, payee, _, payee_wallet = await pair(gw)
    pay(payer, payee, 1_000)
    hidden_state = (payer.state.counter, payer.state.prev)
    pay(payer, payee, 2_000, misbehave="skip-counter")  # counter 3: counter 2 never appears in its log
    await sync(gw, payer)
    # A payment with the skipped counter, signed by the payer's key, turns up in the payee's log.
    ghost = offline.Payment(payer.state.device_id, 2, payee.state.device_id, 500, 5, bytes.fromhex(hidden_state[1]))
    envelope = offline.device_sign1(payer._key, payer.state.device_id.encode(), ghost.payload())
    payee.receive(envelope, b"", misbehave="accept-anything")
    await sync(gw, payee)
    found = await held(gw, payer.state.device_id, "unmatched-payee-record")
    assert found["amount_fen"] == 500
    assert (await wallet(gw, payee_wallet))["balance_fen"] == 1_000
    assert await ledger_problems(gw) == []


async def test_export_with_a_bad_signature_is_refused_and_kept(gw: Gateway) -> None:
    payer, payee, _, _ = await pair(gw)
    pay(payer, payee, 1_000)
    other = SimulatedDevice.create(payer.state.device_id)
    other.state = payer.state.__class__(**{**payer.state.__dict__, "private_key_pem": other.state.private_key_pem})
    blob = SimulatedDevice(other.state).export()  # the same log, signed by another key
    response = await post_sync(gw, payer.state.device_id, blob)
    await assert_problem(response, 422, "device-signature-invalid")
    assert kinds(await discrepancies(gw, payer.state.device_id)) == ["invalid-export-signature"]
    response = await post_sync(gw, payer.state.device_id, b"\xa1garbage")
    await assert_problem(response, 400, "invalid-offline-record")
    response = await gw.client.post(f"/v1/devices/{payer.state.device_id}/sync", json={"x": 1},
                                    headers=gw.auth(Role.TELLER))
    await assert_problem(response, 415)
    response = await post_sync(gw, "no-such-device", blob)
    await assert_problem(response, 404, "device-not-found")


async def test_device_presenting_another_certificate(gw: Gateway) -> None:
    payer, payee, _, payee_wallet = await pair(gw)
    pay(payer, payee, 1_000)
    payer.state.certificate = payee.state.certificate  # not its own
    await sync(gw, payer)
    await sync(gw, payee)
    assert kinds(await discrepancies(gw, payer.state.device_id)) == ["invalid-certificate"]
    assert (await wallet(gw, payee_wallet))["balance_fen"] == 1_000  # its payments are still its own


# --- unload, resolutions, permissions -----------------------------------------------------------------


async def test_unload_returns_the_unspent_value_after_a_full_sync(gw: Gateway) -> None:
    payer, payee, payer_wallet, payee_wallet = await pair(gw, cash=200_000, loaded=50_000)
    pay(payer, payee, 20_000)
    statement = payer.unload()["statement"]
    with pytest.raises(DeviceRefused):
        pay(payer, payee, 1)  # it stops spending
    body = {"statement": base64.b64encode(statement).decode()}
    url = f"/v1/devices/{payer.state.device_id}/unload"
    await assert_problem(await gw.client.post(url, json=body, headers=gw.auth(Role.TELLER)), 409,
                         "device-sync-required")
    await sync(gw, payer)
    response = await gw.client.post(url, json=body, headers=gw.auth(Role.TELLER))
    assert response.status == 200, await response.text()
    result = await response.json()
    assert result["returned_fen"] == 30_000 and result["statement_mismatch"] is None
    document = await wallet(gw, payer_wallet)
    assert document["balance_fen"] == 180_000 and document["offline_reserve_fen"] == 20_000  # 20,000 awaits the payee
    await sync(gw, payee)
    assert (await wallet(gw, payee_wallet))["balance_fen"] == 20_000
    assert (await wallet(gw, payer_wallet))["offline_reserve_fen"] == 0
    assert (await device_doc(gw, payer.state.device_id))["status"] == "unloaded"
    await assert_problem(await gw.client.post(url, json=body, headers=gw.auth(Role.TELLER)), 422, "device-not-active")
    assert await ledger_problems(gw) == []


async def test_load_checks(gw: Gateway) -> None:
    payer, _, payer_wallet, _ = await pair(gw, tier=4, cash=150_000, loaded=0)
    url = f"/v1/devices/{payer.state.device_id}/loads"
    response = await gw.client.post(url, json={"amount_fen": 100}, headers=gw.auth(Role.TELLER))
    await assert_problem(response, 400, "idempotency-key-required")
    response = await gw.client.post(url, json={"amount_fen": 100_001},
                                    headers={**gw.auth(Role.TELLER), "Idempotency-Key": f"cap-{payer_wallet}"})
    problem = await assert_problem(response, 422, "limit-exceeded")  # tier 4: ¥1,000 on the device
    assert problem["reasons"] == ["offline-balance-cap-exceeded"]
    headers = {**gw.auth(Role.TELLER), "Idempotency-Key": f"load-{payer_wallet}"}
    first = await gw.client.post(url, json={"amount_fen": 60_000}, headers=headers)
    again = await gw.client.post(url, json={"amount_fen": 60_000}, headers=headers)
    assert first.status == again.status == 201 and await first.read() == await again.read()
    assert (await wallet(gw, payer_wallet))["balance_fen"] == 90_000  # loaded once
    # The answer is built from the load as recorded and the voucher as signed: it is what the stored row gives.
    document = await first.json()
    row = await runtime(gw).database.read(lambda tx: Devices._load_row(tx, payer.state.device_id,
                                                                       document["load_seq"]))
    assert load_document(row) == document
    response = await gw.client.post(url, json={"amount_fen": 90_001},
                                    headers={**gw.auth(Role.TELLER), "Idempotency-Key": f"funds-{payer_wallet}"})
    await assert_problem(response, 422)
    response = await gw.client.post(url, json={"amount_fen": 1.5},
                                    headers={**gw.auth(Role.TELLER), "Idempotency-Key": f"float-{payer_wallet}"})
    await assert_problem(response, 400, "validation-failed")


async def test_registration_checks(gw: Gateway) -> None:
    wallet_id = await open_wallet(gw)
    device = SimulatedDevice.create()
    await register(gw, device, wallet_id)
    info = device.info()
    body = {"wallet_id": wallet_id, "device_id": info["device_id"], "public_key_pem": info["public_key_pem"],
            "model": "x"}
    await assert_problem(await gw.client.post("/v1/devices", json=body, headers=gw.auth(Role.TELLER)), 409)
    other = SimulatedDevice.create()
    body = {**body, "device_id": other.state.device_id}  # another id with the same key
    await assert_problem(await gw.client.post("/v1/devices", json=body, headers=gw.auth(Role.TELLER)), 409)
    body = {**body, "public_key_pem": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n" + "x" * 20}
    await assert_problem(await gw.client.post("/v1/devices", json=body, headers=gw.auth(Role.TELLER)), 400)
    await assert_problem(await gw.client.post("/v1/devices", json=body, headers=gw.auth(Role.BACKEND)), 403)


async def test_resolutions_move_money_as_decided_and_are_audited(gw: Gateway) -> None:
    payer, payee, payer_wallet, payee_wallet = await pair(gw, tier=4, cash=100_000, loaded=10_000)
    pay(payer, payee, 2_000, misbehave="break-chain")  # within the loaded value
    over = pay(payer, payee, 9_000, misbehave="overspend")  # beyond it
    await sync(gw, payer)
    await sync(gw, payee)
    by_kind = {d["kind"]: d for d in await discrepancies(gw, payer.state.device_id)}
    assert set(by_kind) == {"overspent", "broken-chain"}
    url = "/v1/reconciliation/discrepancies/{}/resolve"
    over_url = url.format(by_kind["overspent"]["discrepancy_id"])
    chain_url = url.format(by_kind["broken-chain"]["discrepancy_id"])
    body = {"resolution": "post", "note": "checked with the customer"}
    await assert_problem(await gw.client.post(chain_url, json=body, headers=gw.auth(Role.TELLER)), 403)
    await assert_problem(await gw.client.post(chain_url, json={**body, "resolution": "acknowledge"},
                                              headers=gw.auth(Role.SUPERVISOR)), 422, "resolution-refused")
    await assert_problem(await gw.client.post(over_url, json=body, headers=gw.auth(Role.SUPERVISOR)), 422,
                         "resolution-refused")  # beyond the loaded value: cannot come from the reserve
    response = await gw.client.post(chain_url, json=body, headers=gw.auth(Role.SUPERVISOR))
    assert response.status == 200, await response.text()
    assert (await response.json())["resolution"] == "post"
    assert (await wallet(gw, payee_wallet))["balance_fen"] == 2_000
    assert (await wallet(gw, payer_wallet))["offline_reserve_fen"] == 8_000
    response = await gw.client.post(over_url, json={"resolution": "honour", "note": "bank pays"},
                                    headers=gw.auth(Role.SUPERVISOR))
    # Dual control: an honour is only requested; nothing is paid until a second supervisor approves.
    assert response.status == 202, await response.text()
    assert (await wallet(gw, payee_wallet))["balance_fen"] == 2_000
    decided = await approve_as_second_person(gw, response)
    assert decided["result"]["resolution"] == "honour"
    assert (await wallet(gw, payee_wallet))["balance_fen"] == 11_000  # the bank paid from suspense
    assert (await wallet(gw, payer_wallet))["offline_reserve_fen"] == 8_000
    await assert_problem(await gw.client.post(over_url, json=body, headers=gw.auth(Role.SUPERVISOR)), 409,
                         "discrepancy-not-open")
    resolved = {d["discrepancy_id"]: d for d in await discrepancies(gw, payer.state.device_id, status="resolved")}
    assert resolved[by_kind["overspent"]["discrepancy_id"]]["resolved_by"] == "user:supervisor1"
    entries = [e for e in await audit_entries(gw) if e["action"] == "reconciliation.resolve"
               and e["decision"] in ("allowed", "approved")]  # honour: carried out on approval
    assert {e["result"]["resolution"] for e in entries} >= {"post", "honour"}
    assert over["hash"].hex() in [p for e in entries for p in e["result"]["payments"]]
    assert await ledger_problems(gw) == []


async def test_rejected_double_spend_gives_the_value_back_to_the_device(gw: Gateway) -> None:
    payer, payee, payer_wallet, payee_wallet = await pair(gw, loaded=10_000)
    pay(payer, payee, 1_000)
    pay(payer, payee, 2_000, misbehave="reuse-counter")
    await sync(gw, payer)
    await sync(gw, payee)
    found = await held(gw, payer.state.device_id, "double-spend")
    assert (await device_doc(gw, payer.state.device_id))["spent_fen"] == 3_000
    response = await gw.client.post(f"/v1/reconciliation/discrepancies/{found['discrepancy_id']}/resolve",
                                    json={"resolution": "reject", "note": "fraud"}, headers=gw.auth(Role.SUPERVISOR))
    assert response.status == 200, await response.text()
    assert (await device_doc(gw, payer.state.device_id))["spent_fen"] == 0
    assert (await wallet(gw, payee_wallet))["balance_fen"] == 0
    assert (await wallet(gw, payer_wallet))["offline_reserve_fen"] == 10_000
    assert await ledger_problems(gw) == []


async def test_roles_and_listing(gw: Gateway) -> None:
    response = await gw.client.get("/v1/reconciliation/discrepancies", headers=gw.auth(Role.AUDITOR))
    assert response.status == 200
    response = await gw.client.get("/v1/reconciliation/discrepancies?status=nope", headers=gw.auth(Role.AUDITOR))
    await assert_problem(response, 400)
    response = await gw.client.get("/v1/reconciliation/discrepancies", headers=gw.auth(Role.BACKEND))
    await assert_problem(response, 403)
    response = await gw.client.get("/v1/reconciliation/discrepancies/d_nope", headers=gw.auth(Role.AUDITOR))
    await assert_problem(response, 404, "discrepancy-not-found")
    response = await gw.client.get("/v1/devices/nope-device", headers=gw.auth(Role.AUDITOR))
    await assert_problem(response, 404, "device-not-found")


async def test_the_same_export_twice_at_once_posts_once(gw: Gateway) -> None:
    payer, payee, _, payee_wallet = await pair(gw)
    pay(payer, payee, 700)
    await sync(gw, payer)
    payee.export_log(0)
    blob = payee.export()
    responses = [await r.json() for r in await asyncio.gather(*(post_sync(gw, payee.state.device_id, blob)
                                                                for _ in range(4)))]
    assert sorted(r["replayed"] for r in responses) == [False, True, True, True]
    assert (await wallet(gw, payee_wallet))["balance_fen"] == 700
    assert await ledger_problems(gw) == []
