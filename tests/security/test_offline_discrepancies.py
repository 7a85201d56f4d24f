"""Offline discrepancies as an insider or a tampered device would drive them (issue 14, items 9 and 11).

Real gateway (SQLite and PostgreSQL) with a real SoftHSM token, in-process simulated hard wallets
built as the other device tests build them (tests/device/flows.py). A "tampered" device is a
simulator whose state the test edits — what an attacker with the device's key could sign.

- A payment a device signed after its unload is held outside its budget: ``reject`` closes it (was
  a 500 ``ledger-invariant``), the device's outstanding value never goes negative.
- Every resolution on every discrepancy kind the engine can raise answers 2xx or 4xx, never 5xx,
  and the ledger's invariants (``ledger check``) hold after each.
- Offline credits obey the payee's tier balance cap: above it they are held, never posted over the
  cap and never lost.
- Malformed log bytes are a finding of every device whose log holds them.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from gateway import cli
from gateway.auth.roles import Role
from gateway.errors import GatewayError
from gateway.hardwallet.simulator import SimulatedDevice
from gateway.offline.devices import RESOLUTIONS
from gateway.offline.rules import KINDS
from gateway.runtime import RUNTIME
from gateway.schemes import offline
from tests.api.support import assert_problem
from tests.conftest import Gateway
from tests.device.flows import (
    device_doc,
    discrepancies,
    ensure_voucher_key,
    idem,
    issue_load,
    ledger_problems,
    load,
    open_wallet,
    pay,
    post_sync,
    register,
    sync,
    wallet,
)
from tests.offline_harness import OfflineHarness

pytestmark = pytest.mark.softhsm

RESOLVE = "/v1/reconciliation/discrepancies/{}/resolve"
MALFORMED = bytes.fromhex("a1") + b"not a payment at all"  # a CBOR map head and garbage: no COSE_Sign1
TIER4_CAP = 1_000_000  # docs/spec.md §7: a tier-4 wallet holds at most ¥10,000


@pytest_asyncio.fixture(scope="module")
async def gw(ledger_gateway: Gateway) -> AsyncIterator[Gateway]:
    await ensure_voucher_key(ledger_gateway)
    yield ledger_gateway


async def pair(gw: Gateway, tier: int = 1, cash: int = 1_000_000, loaded: int = 100_000, payee_tier: int | None = None,
               payee_cash: int = 0) -> tuple[SimulatedDevice, SimulatedDevice, str, str]:
    """Two registered devices on two wallets; the first loaded with ``loaded`` fen."""
    payer_wallet = await open_wallet(gw, tier, cash)
    payee_wallet = await open_wallet(gw, payee_tier or tier, payee_cash)
    payer, payee = SimulatedDevice.create(), SimulatedDevice.create()
    await register(gw, payer, payer_wallet)
    await register(gw, payee, payee_wallet)
    if loaded:
        await load(gw, payer, loaded)
    return payer, payee, payer_wallet, payee_wallet


async def resolve(gw: Gateway, discrepancy_id: str, resolution: str) -> Any:
    return await gw.client.post(RESOLVE.format(discrepancy_id), json={"resolution": resolution, "note": "decided"},
                                headers={**gw.auth(Role.SUPERVISOR), **idem()})


async def unload(gw: Gateway, device: SimulatedDevice) -> dict[str, Any]:
    body = {"statement": base64.b64encode(device.unload()["statement"]).decode()}
    response = await gw.client.post(f"/v1/devices/{device.state.device_id}/unload", json=body,
                                    headers=gw.auth(Role.TELLER))
    assert response.status == 200, await response.text()
    result: dict[str, Any] = await response.json()
    return result


def tamper_resume_spending(device: SimulatedDevice) -> None:
    """The device's holder drops its final statement: the device signs payments again (its key still works)."""
    device.state.statement = ""


def inject_receipt(device: SimulatedDevice, envelope: bytes) -> None:
    """Put bytes into the device's receipt log, as a faulty or tampered device would; its export still signs."""
    device.state.rx += 1
    device.state.receipts.append({"rx": device.state.rx, "envelope": envelope.hex()})


async def balances(gw: Gateway, *wallet_ids: str) -> list[tuple[int, int]]:
    return [(document["balance_fen"], document["offline_reserve_fen"])
            for document in [await wallet(gw, wallet_id) for wallet_id in wallet_ids]]


async def open_of_kind(gw: Gateway, device_id: str, kind: str) -> list[dict[str, Any]]:
    return [d for d in await discrepancies(gw, device_id) if d["kind"] == kind]


# --- after-unload payments (item 9) -----------------------------------------------------------------


async def unloaded_then_paid(gw: Gateway, amount: int) -> tuple[SimulatedDevice, SimulatedDevice, str, str, bytes]:
    """A device pays 20,000 of its 50,000, syncs, is unloaded (30,000 back), then — tampered — pays again."""
    payer, payee, payer_wallet, payee_wallet = await pair(gw, cash=200_000, loaded=50_000)
    pay(payer, payee, 20_000)
    await sync(gw, payer)
    await sync(gw, payee)
    assert (await unload(gw, payer))["returned_fen"] == 30_000
    tamper_resume_spending(payer)
    after = pay(payer, payee, amount, misbehave="overspend" if amount > 30_000 else None)
    await sync(gw, payer)
    await sync(gw, payee)
    return payer, payee, payer_wallet, payee_wallet, bytes(after["hash"])


@pytest.mark.parametrize("amount", [10_000, 30_000, 45_000])  # within, equal to and beyond the value returned
async def test_after_unload_payment_rejected_closes_and_outstanding_stays_zero(gw: Gateway, amount: int) -> None:
    """Payment signed after unload counted against the device budget (reject → 500, outstanding negative)."""
    payer, _, payer_wallet, payee_wallet, after = await unloaded_then_paid(gw, amount)
    device_id = payer.state.device_id
    document = await device_doc(gw, device_id)
    assert document["status"] == "unloaded"
    assert (document["spent_fen"], document["returned_fen"], document["outstanding_fen"]) == (20_000, 30_000, 0)
    [found] = await open_of_kind(gw, device_id, "device-unloaded")
    assert found["held_payments"] == [after.hex()] and found["amount_fen"] == amount
    assert found["evidence"]["outside_budget"] is True
    before = await balances(gw, payer_wallet, payee_wallet)
    assert before == [(180_000, 0), (20_000, 0)]
    # The supervisor cannot post it from the payer's reserve: that value went back at unload.
    await assert_problem(await resolve(gw, found["discrepancy_id"], "post"), 422, "resolution-refused")
    response = await resolve(gw, found["discrepancy_id"], "reject")
    assert response.status == 200, await response.text()
    assert (await response.json())["status"] == "resolved"
    assert await balances(gw, payer_wallet, payee_wallet) == before  # rejected: nothing moves
    assert (await device_doc(gw, device_id))["outstanding_fen"] == 0
    assert await open_of_kind(gw, device_id, "device-unloaded") == []
    await assert_problem(await resolve(gw, found["discrepancy_id"], "reject"), 409, "discrepancy-not-open")
    assert await ledger_problems(gw) == []


async def test_held_payment_rejected_after_unload_goes_back_to_the_wallet(gw: Gateway) -> None:
    """Value of a payment held at unload, then rejected, stranded in the reserve or paid twice."""
    payer, payee, payer_wallet, payee_wallet = await pair(gw, cash=200_000, loaded=50_000)
    pay(payer, payee, 1_000)
    pay(payer, payee, 4_000, misbehave="break-chain")  # within the loaded value, held
    await sync(gw, payer)
    await sync(gw, payee)
    assert (await unload(gw, payer))["returned_fen"] == 45_000
    assert await balances(gw, payer_wallet, payee_wallet) == [(195_000, 4_000), (1_000, 0)]
    [found] = await open_of_kind(gw, payer.state.device_id, "broken-chain")
    response = await resolve(gw, found["discrepancy_id"], "reject")
    assert response.status == 200, await response.text()
    assert await balances(gw, payer_wallet, payee_wallet) == [(199_000, 0), (1_000, 0)]
    document = await device_doc(gw, payer.state.device_id)
    assert (document["spent_fen"], document["returned_fen"], document["outstanding_fen"]) == (1_000, 49_000, 0)
    assert await ledger_problems(gw) == []


async def test_outstanding_cannot_go_negative_in_the_store(gw: Gateway) -> None:
    """A code path that would write spent + returned above issued (negative outstanding) is refused by the store."""
    payer, _, _, _ = await pair(gw, loaded=10_000)
    database = gw.client.server.app[RUNTIME].database
    with pytest.raises(GatewayError):
        await database.write(lambda tx: tx.execute(
            "UPDATE devices SET spent_fen = 6000, returned_fen = 5000 WHERE device_id = ?", (payer.state.device_id,)))
    assert (await device_doc(gw, payer.state.device_id))["outstanding_fen"] == 10_000
    assert await ledger_problems(gw) == []


# --- every resolution on every kind (item 9) ------------------------------------------------------------

Scenario = Callable[[Gateway], Awaitable[str]]
"""Builds a fresh situation that raises one kind of discrepancy; returns the device it is recorded for."""


async def malformed_record(gw: Gateway) -> str:
    _, payee, _, _ = await pair(gw, loaded=0)
    inject_receipt(payee, MALFORMED)
    await sync(gw, payee)
    return payee.state.device_id


async def invalid_signature(gw: Gateway) -> str:
    payer, payee, _, _ = await pair(gw)
    forged = pay(payer, payee, 5_000, receive=False, misbehave="forge-signature")
    payee.receive(forged["payment"], forged["certificate"], misbehave="accept-anything")
    await sync(gw, payer)
    await sync(gw, payee)
    return payer.state.device_id


async def invalid_certificate(gw: Gateway) -> str:
    payer, payee, _, _ = await pair(gw)
    pay(payer, payee, 1_000)
    payer.state.certificate = payee.state.certificate
    await sync(gw, payer)
    return payer.state.device_id


async def invalid_voucher(gw: Gateway) -> str:
    payer, _, _, _ = await pair(gw)
    payer.state.loads.append({"load_seq": 99, "amount": 7_000, "exp": offline.MAX_UINT, "at": 0})
    await sync(gw, payer)
    return payer.state.device_id


async def invalid_export_signature(gw: Gateway) -> str:
    payer, payee, _, _ = await pair(gw)
    pay(payer, payee, 1_000)
    other = SimulatedDevice.create(payer.state.device_id)
    other.state = payer.state.__class__(**{**payer.state.__dict__, "private_key_pem": other.state.private_key_pem})
    response = await post_sync(gw, payer.state.device_id, SimulatedDevice(other.state).export())
    await assert_problem(response, 422, "device-signature-invalid")
    return payer.state.device_id


async def unknown_device(gw: Gateway) -> str:
    payer, _, _, _ = await pair(gw)
    pay(payer, None, 1_000, payee_id=f"ghost-{secrets.token_hex(4)}")
    await sync(gw, payer)
    return payer.state.device_id


async def double_spend(gw: Gateway) -> str:
    payer, payee, _, _ = await pair(gw)
    pay(payer, payee, 1_000)
    pay(payer, payee, 2_000, misbehave="reuse-counter")
    await sync(gw, payer)
    await sync(gw, payee)
    return payer.state.device_id


async def counter_gap(gw: Gateway) -> str:
    payer, payee, _, _ = await pair(gw)
    pay(payer, payee, 1_000)
    pay(payer, payee, 2_000, misbehave="skip-counter")
    await sync(gw, payer)
    await sync(gw, payee)
    return payer.state.device_id


async def broken_chain(gw: Gateway) -> str:
    payer, payee, _, _ = await pair(gw)
    pay(payer, payee, 1_000)
    pay(payer, payee, 2_000, misbehave="break-chain")
    await sync(gw, payer)
    await sync(gw, payee)
    return payer.state.device_id


async def device_frozen(gw: Gateway) -> str:
    payer, payee, _, _ = await pair(gw)
    pay(payer, payee, 1_000)
    pay(payer, payee, 2_000, misbehave="reuse-counter")
    await sync(gw, payer)  # the double spend freezes it
    pay(payer, payee, 500)
    await sync(gw, payer)
    await sync(gw, payee)
    return payer.state.device_id


async def device_revoked(gw: Gateway) -> str:
    payer, payee, _, _ = await pair(gw)
    response = await gw.client.post(f"/v1/devices/{payer.state.device_id}/revoke", json={"reason": "reported lost"},
                                    headers=gw.auth(Role.SUPERVISOR))
    assert response.status == 200, await response.text()
    pay(payer, payee, 2_000, ts=payer.clock() + 1_000)
    await sync(gw, payer)
    await sync(gw, payee)
    return payer.state.device_id


async def device_unloaded(gw: Gateway) -> str:
    payer, _, _, _, _ = await unloaded_then_paid(gw, 10_000)
    return payer.state.device_id


async def certificate_expired(gw: Gateway) -> str:
    payer, payee, _, _ = await pair(gw)
    pay(payer, payee, 1_000, ts=offline.MAX_UINT // 2, careless=True, misbehave="expired-certificate")
    await sync(gw, payer)
    await sync(gw, payee)
    return payer.state.device_id


async def over_payment_cap(gw: Gateway) -> str:
    payer, payee, _, _ = await pair(gw, tier=4, cash=100_000, loaded=100_000)
    pay(payer, payee, 60_000, careless=True, misbehave="exceed-cap")
    await sync(gw, payer)
    await sync(gw, payee)
    return payer.state.device_id


async def too_many_payments(gw: Gateway) -> str:
    payer, payee, _, _ = await pair(gw, tier=4, cash=100_000, loaded=100_000)  # tier 4: 100 payments a sync
    for _ in range(100):
        pay(payer, payee, 10)
    pay(payer, payee, 10, misbehave="too-many-payments")
    await sync(gw, payer)
    await sync(gw, payee)
    return payer.state.device_id


async def voucher_expired(gw: Gateway) -> str:
    payer, payee, _, _ = await pair(gw, loaded=0)
    voucher = await issue_load(gw, payer.state.device_id, 20_000)
    payer.set_clock(2 * 86_400_000)
    payer.load(base64.b64decode(voucher["voucher"]), misbehave="expired-voucher")
    pay(payer, payee, 5_000)
    await sync(gw, payer)
    await sync(gw, payee)
    return payer.state.device_id


async def overspent(gw: Gateway) -> str:
    payer, payee, _, _ = await pair(gw, loaded=10_000)
    pay(payer, payee, 8_000)
    pay(payer, payee, 5_000, misbehave="overspend")
    await sync(gw, payer)
    await sync(gw, payee)
    return payer.state.device_id


async def payee_wallet_not_active(gw: Gateway) -> str:
    payer, payee, _, payee_wallet = await pair(gw)
    pay(payer, payee, 1_000)
    response = await gw.client.post(f"/v1/wallets/{payee_wallet}/status", json={"status": "frozen", "reason": "aml"},
                                    headers=gw.auth(Role.TELLER))
    assert response.status == 200, await response.text()
    await sync(gw, payer)
    await sync(gw, payee)
    return payer.state.device_id


async def payee_balance_cap(gw: Gateway) -> str:
    payer, payee, _, _ = await pair(gw, payee_tier=4, payee_cash=TIER4_CAP - 5_000)
    pay(payer, payee, 10_000)
    await sync(gw, payer)
    await sync(gw, payee)
    return payer.state.device_id


async def unmatched_payer_record(gw: Gateway) -> str:
    payer, payee, _, _ = await pair(gw)
    pay(payer, payee, 1_000, receive=False)
    await sync(gw, payer)
    payee.set_clock(3_600_000)
    await sync(gw, payee)
    return payer.state.device_id


async def unmatched_payee_record(gw: Gateway) -> str:
    payer, payee, _, _ = await pair(gw)
    pay(payer, payee, 1_000)
    hidden_prev = payer.state.prev
    pay(payer, payee, 2_000, misbehave="skip-counter")
    await sync(gw, payer)
    ghost = offline.Payment(payer.state.device_id, 2, payee.state.device_id, 500, 5, bytes.fromhex(hidden_prev))
    payee.receive(offline.device_sign1(payer._key, payer.state.device_id.encode(), ghost.payload()), b"",
                  misbehave="accept-anything")
    await sync(gw, payee)
    return payer.state.device_id


async def statement_mismatch(gw: Gateway) -> str:
    payer, payee, _, _ = await pair(gw, loaded=10_000)
    pay(payer, payee, 1_000)
    await sync(gw, payer)
    payer.state.spent += 300  # its final statement claims more spent than it logged
    assert (await unload(gw, payer))["statement_mismatch"] is not None
    return payer.state.device_id


SCENARIOS: dict[str, Scenario] = {
    "malformed-record": malformed_record, "invalid-signature": invalid_signature,
    "invalid-certificate": invalid_certificate, "invalid-voucher": invalid_voucher,
    "invalid-export-signature": invalid_export_signature, "unknown-device": unknown_device,
    "double-spend": double_spend, "counter-gap": counter_gap, "broken-chain": broken_chain,
    "device-frozen": device_frozen, "device-revoked": device_revoked, "device-unloaded": device_unloaded,
    "certificate-expired": certificate_expired, "over-payment-cap": over_payment_cap,
    "too-many-payments": too_many_payments, "voucher-expired": voucher_expired, "overspent": overspent,
    "payee-wallet-not-active": payee_wallet_not_active, "payee-balance-cap": payee_balance_cap,
    "unmatched-payer-record": unmatched_payer_record, "unmatched-payee-record": unmatched_payee_record,
    "statement-mismatch": statement_mismatch,
}


def test_the_matrix_covers_every_kind_and_resolution() -> None:
    """A discrepancy kind or resolution added without a test of every decision on it."""
    assert set(SCENARIOS) == set(KINDS)
    assert set(RESOLUTIONS) == {"post", "honour", "reject", "acknowledge"}


@pytest.mark.parametrize("resolution", sorted(RESOLUTIONS))
@pytest.mark.parametrize("kind", sorted(SCENARIOS))
async def test_every_resolution_on_every_kind_is_2xx_or_4xx(gw: Gateway, kind: str, resolution: str) -> None:
    """A supervisor's decision on a discrepancy that the engine cannot carry out (500, stuck open, broken ledger)."""
    device_id = await SCENARIOS[kind](gw)
    found = await open_of_kind(gw, device_id, kind)
    assert found, f"the scenario raised no {kind}: {[d['kind'] for d in await discrepancies(gw, device_id)]}"
    for discrepancy in found:
        response = await resolve(gw, discrepancy["discrepancy_id"], resolution)
        text = await response.text()
        assert response.status < 500, text
        document = next(d for d in await discrepancies(gw, device_id, status="all")
                        if d["discrepancy_id"] == discrepancy["discrepancy_id"])
        if response.status >= 400:
            assert response.content_type == "application/problem+json", text
            assert document["status"] == "open", text  # a refusal changes nothing
        elif resolution != "honour":  # honour may await a second supervisor's approval (202)
            assert response.status == 200, text
            assert document["status"] == "resolved" and document["resolution"] == resolution
        if resolution == "acknowledge" and not discrepancy["held_payments"]:
            assert response.status == 200, text  # a finding that holds no payment can always be closed
        if resolution == "reject" and discrepancy["held_payments"]:
            assert response.status == 200, text  # a held payment can always be rejected
        assert await ledger_problems(gw) == [], (kind, resolution)
        assert (await device_doc(gw, device_id))["outstanding_fen"] >= 0


# --- the payee's tier balance cap (item 11) -------------------------------------------------------------


async def test_offline_credit_above_the_payees_tier_cap_is_held_not_posted(gw: Gateway) -> None:
    """Offline credits skip the payee's tier balance cap (a tier-4 wallet filled above ¥10,000 offline)."""
    payer, payee, payer_wallet, payee_wallet = await pair(gw, payee_tier=4, payee_cash=TIER4_CAP - 10_000)
    first = pay(payer, payee, 6_000)  # fits: 4,000 of room left
    second = pay(payer, payee, 6_000)  # together they would not
    await sync(gw, payer)
    report = await sync(gw, payee)
    assert report["receipts"]["posted"] == 1 and report["posted_fen"] == 6_000
    assert await balances(gw, payee_wallet) == [(TIER4_CAP - 4_000, 0)]
    [found] = await open_of_kind(gw, payer.state.device_id, "payee-balance-cap")
    assert found["held_payments"] == [second["hash"].hex()] and first["hash"].hex() not in found["held_payments"]
    assert found["evidence"]["cap_fen"] == TIER4_CAP and found["evidence"]["balance_fen"] == TIER4_CAP - 4_000
    assert (await wallet(gw, payer_wallet))["offline_reserve_fen"] == 94_000  # held, not lost: still in reserve
    # A supervisor cannot push it over the cap either.
    problem = await assert_problem(await resolve(gw, found["discrepancy_id"], "post"), 422, "resolution-refused")
    assert problem["reasons"] == ["balance-cap-exceeded"]
    honour = await resolve(gw, found["discrepancy_id"], "honour")
    assert 200 <= honour.status < 500, await honour.text()
    assert (await wallet(gw, payee_wallet))["balance_fen"] <= TIER4_CAP
    # Once the wallet has room, the same decision posts it: exactly once.
    response = await gw.client.post(f"/v1/wallets/{payee_wallet}/cash-out", json={"amount_fen": 50_000},
                                    headers={**gw.auth(Role.TELLER), **idem()})
    assert response.status == 200, await response.text()
    if honour.status != 200:  # refused, or awaiting a second supervisor (202): the supervisor posts it now
        response = await resolve(gw, found["discrepancy_id"], "post")
        if response.status != 409:  # 409: an approved honour already paid it
            assert response.status == 200, await response.text()
    assert (await wallet(gw, payee_wallet))["balance_fen"] == TIER4_CAP - 4_000 - 50_000 + 6_000
    assert (await wallet(gw, payer_wallet))["offline_reserve_fen"] == 88_000
    assert await ledger_problems(gw) == []


async def test_rejected_credit_above_the_cap_goes_back_to_the_payer(gw: Gateway) -> None:
    """Offline value held at the payee's cap lost when a supervisor rejects it."""
    payer, payee, payer_wallet, payee_wallet = await pair(gw, payee_tier=4, payee_cash=TIER4_CAP)
    pay(payer, payee, 3_000)
    await sync(gw, payer)
    await sync(gw, payee)
    [found] = await open_of_kind(gw, payer.state.device_id, "payee-balance-cap")
    response = await resolve(gw, found["discrepancy_id"], "reject")
    assert response.status == 200, await response.text()
    assert (await device_doc(gw, payer.state.device_id))["outstanding_fen"] == 100_000  # back on the device's budget
    assert await balances(gw, payer_wallet, payee_wallet) == [(900_000, 100_000), (TIER4_CAP, 0)]
    assert await ledger_problems(gw) == []


async def test_normal_sync_credits_the_payee(gw: Gateway) -> None:
    """Positive control: a payment within every rule and within the payee's cap posts once, at once."""
    payer, payee, payer_wallet, payee_wallet = await pair(gw, payee_tier=4, payee_cash=TIER4_CAP - 10_000)
    pay(payer, payee, 10_000)  # exactly up to the cap
    await sync(gw, payer)
    report = await sync(gw, payee)
    assert report["receipts"]["posted"] == 1 and report["discrepancies"] == []
    assert await balances(gw, payer_wallet, payee_wallet) == [(900_000, 90_000), (TIER4_CAP, 0)]
    assert await discrepancies(gw, payer.state.device_id) == []
    assert await ledger_problems(gw) == []


# --- malformed bytes from a second device (item 11) -------------------------------------------------------


async def test_the_same_malformed_bytes_are_a_finding_of_each_device(gw: Gateway) -> None:
    """The same malformed log bytes from a second device raise no finding for that device."""
    _, first, _, _ = await pair(gw, loaded=0)
    _, second, _, _ = await pair(gw, loaded=0)
    for device in (first, second):
        inject_receipt(device, MALFORMED)
        report = await sync(gw, device)
        assert report["receipts"]["invalid"] == 1
        [found] = await open_of_kind(gw, device.state.device_id, "malformed-record")
        assert found["device_id"] == device.state.device_id
        assert found["evidence"]["record"] == MALFORMED.hex()
    # The same device sending the same bytes again is still one finding.
    inject_receipt(first, MALFORMED)
    await sync(gw, first)
    assert len(await open_of_kind(gw, first.state.device_id, "malformed-record")) == 1
    assert await ledger_problems(gw) == []


# --- `ledger check` sees what the store would no longer let through ---------------------------------------


def test_ledger_check_reports_a_negative_outstanding_and_a_reserve_drift(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A store written before the guard (negative outstanding, reserve off its devices) passes `ledger check`."""
    path = tmp_path / "offline.db"
    harness = OfflineHarness(str(path))
    payer, payee = harness.device(harness.wallet(cash=100_000)), harness.device(harness.wallet())
    harness.load(payer, 10_000)
    payer.pay(payee.state.device_id, 3_000)
    harness.sync([payer])  # 3,000 awaits the payee's record: spent, still in the reserve
    check = ["ledger", "check", "--db", f"sqlite:///{path}"]
    assert cli.main(check) == 0, capsys.readouterr().out
    # The old bug's footprint: the value counted in the budget twice over (a negative outstanding).
    harness.write(lambda tx: tx.execute("DROP TRIGGER devices_outstanding_update"))
    harness.write(lambda tx: tx.execute("UPDATE devices SET returned_fen = 9000 WHERE device_id = ?",
                                        (payer.state.device_id,)))
    capsys.readouterr()
    assert cli.main(check) == 1
    out = capsys.readouterr().out
    assert f"device {payer.state.device_id}: spent 3000 + returned 9000 fen exceed the 10000 fen loaded" in out
    assert "offline reserve 10000 fen, but its devices hold -2000 and 3000 awaits settlement" in out
    harness.close()
