"""Dual control (issue 14, items 3, 6 and two of 11), tried as an insider would, against a real gateway
(SoftHSM token; SQLite and PostgreSQL stores).

Every operation that moves value the bank carries — a honour of an offline overspend, a cash-in or
cash-out above its threshold, a hard-wallet load above its threshold, an upgrade to tier 1 — is only
*requested* (202 with the pending approval) until a second person approves it; then it happens exactly
once, and a rejection moves nothing. People decide approvals, never API clients; owners are compared,
not accounts; and an approval is visible to its requester's owner, supervisors and auditors only.
Each attack sits next to its positive control.
"""

from __future__ import annotations

import base64
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import ClientResponse
from argon2 import PasswordHasher

from gateway.auth.credentials import add_client, add_user
from gateway.auth.roles import Role
from gateway.hardwallet.simulator import SimulatedDevice
from gateway.ledger import journal
from tests.api.support import assert_problem, audit_entries, runtime
from tests.conftest import Gateway, Token, login, make_settings, start_gateway
from tests.device.flows import (
    device_doc,
    discrepancies,
    ensure_voucher_key,
    ledger_problems,
    open_wallet,
    pay,
    post_sync,
    wallet,
)
from tests.pg import PostgresServer

pytestmark = pytest.mark.softhsm

CASH_THRESHOLD = 5_000_000  # ¥50,000 (the default of cash_in_threshold_fen and cash_out_threshold_fen)
LOAD_THRESHOLD = 1_000_000  # ¥10,000: below a tier-1 device's ¥50,000 offline balance cap
LOAD_DAILY_THRESHOLD = 2 * LOAD_THRESHOLD  # the default ratio (daily = 2 × single), reachable below the device cap
CASH_DAILY_THRESHOLD = 10_000_000  # ¥100,000 (the default of cash_in/cash_out_daily_threshold_fen)
TELLER2_PASSWORD = "teller-password-2"
SUPERVISOR3_PASSWORD = "supervisor-password-3"
ALIAS_PASSWORD = "supervisor1-alias-password"
START = 20_000_000  # what the wallets of the cash tests hold first


def idem() -> dict[str, str]:
    return {"Idempotency-Key": uuid.uuid4().hex}


@pytest_asyncio.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def gw(request: pytest.FixtureRequest, softhsm_token: Token,
             tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    """A gateway with the default cash thresholds (¥50,000 each, ¥100,000 a day), a ¥10,000 device-load
    threshold (¥20,000 a day), `ecny`, `audit` and `voucher` keys, a second teller (teller2), a third
    supervisor (supervisor3) and a second supervisor identity of supervisor1 (supervisor1.alias)."""
    if request.param == "sqlite":
        dsn = f"sqlite:///{tmp_path_factory.mktemp('dual-control') / 'gateway.db'}"
    else:
        server: PostgresServer = request.getfixturevalue("postgres_server")
        dsn = server.create_database()
    settings = make_settings(softhsm_token, dsn, approvals={"device_load_threshold_fen": LOAD_THRESHOLD,
                                                            "device_load_daily_threshold_fen": LOAD_DAILY_THRESHOLD})
    started = await start_gateway(settings)
    assert started.settings.approvals.cash_out_threshold_fen == CASH_THRESHOLD
    assert started.settings.approvals.cash_in_threshold_fen == CASH_THRESHOLD
    assert started.settings.approvals.cash_out_daily_threshold_fen == CASH_DAILY_THRESHOLD
    assert started.settings.approvals.cash_in_daily_threshold_fen == CASH_DAILY_THRESHOLD
    for usage in ("ecny", "audit", "voucher"):
        response = await started.client.post(
            "/v1/keys", json={"label": f"dual-{usage}-{request.param}", "algorithm": "ecdsa-p256", "usage": [usage]},
            headers=started.auth(Role.ADMIN))
        assert response.status == 201, await response.text()
    await ensure_voucher_key(started)
    hasher = PasswordHasher()
    await runtime(started).database.write(lambda tx: add_user(tx, hasher, "teller2", Role.TELLER, TELLER2_PASSWORD))
    started.passwords["teller2"] = TELLER2_PASSWORD
    await runtime(started).database.write(
        lambda tx: add_user(tx, hasher, "supervisor3", Role.SUPERVISOR, SUPERVISOR3_PASSWORD))
    started.passwords["supervisor3"] = SUPERVISOR3_PASSWORD
    await runtime(started).database.write(
        lambda tx: add_user(tx, hasher, "supervisor1.alias", Role.SUPERVISOR, ALIAS_PASSWORD, owner="supervisor1"))
    started.passwords["supervisor1.alias"] = ALIAS_PASSWORD
    yield started
    await started.client.close()


async def client_of(gw: Gateway, role: Role, owner: str | None = None) -> tuple[str, dict[str, str]]:
    """A fresh API client with ``role`` (and ``owner``): its name and its Authorization header."""
    name = f"dual-{role.value}-{secrets.token_hex(4)}"
    key = await runtime(gw).database.write(lambda tx: add_client(tx, name, role, owner))
    return name, {"Authorization": f"Bearer {key}"}


async def suspense(gw: Gateway) -> int:
    """The balance of bank:suspense, where honours beyond the loaded value are paid from."""
    return await runtime(gw).database.read(lambda tx: journal.balance(tx, journal.SUSPENSE))


async def cash(gw: Gateway, direction: str, wallet_id: str, amount: int, headers: dict[str, str],
               key: dict[str, str] | None = None) -> ClientResponse:
    return await gw.client.post(f"/v1/wallets/{wallet_id}/{direction}", json={"amount_fen": amount},
                                headers={**headers, **(key or idem())})


async def decide(gw: Gateway, approval: dict[str, Any], headers: dict[str, str], verb: str = "approve"
                 ) -> ClientResponse:
    return await gw.client.post(f"/v1/approvals/{approval['approval_id']}/{verb}",
                                json={"payload_hash": approval["payload_hash"], "note": "dual control test"},
                                headers=headers)


async def pending(response: ClientResponse, kind: str) -> dict[str, Any]:
    """The 202 answer of an operation above its threshold: the pending approval of ``kind``."""
    assert response.status == 202, await response.text()
    approval: dict[str, Any] = await response.json()
    assert approval["kind"] == kind and approval["status"] == "pending", approval
    return approval


async def funded_wallet(gw: Gateway, amount: int, tier: int = 1) -> str:
    """A wallet holding ``amount`` fen, cashed in below the threshold (several cash-ins if needed; once
    the day's cash-ins pass the daily threshold, supervisor1 approves each)."""
    wallet_id = await open_wallet(gw, tier)
    while amount:
        part = min(amount, CASH_THRESHOLD)
        response = await cash(gw, "cash-in", wallet_id, part, gw.auth(Role.TELLER))
        if response.status == 202:
            response = await decide(gw, await pending(response, "cash_in"), gw.auth(Role.SUPERVISOR))
        assert response.status == 200, await response.text()
        amount -= part
    return wallet_id


# --- item 3: one supervisor cannot create money ----------------------------------------------------------


async def supervisor_device(gw: Gateway, wallet_id: str, supervisor: dict[str, str]) -> SimulatedDevice:
    """A device whose key the supervisor holds (an in-process simulator), registered by the supervisor."""
    device = SimulatedDevice.create()
    info = device.info()
    response = await gw.client.post("/v1/devices", json={"wallet_id": wallet_id, "device_id": info["device_id"],
                                                         "public_key_pem": info["public_key_pem"],
                                                         "model": info["model"]}, headers=supervisor)
    assert response.status == 201, await response.text()
    document = await response.json()
    device.certify(base64.b64decode(document["certificate"]), document["issuer_public_key_pem"])
    return device


async def supervisor_sync(gw: Gateway, device: SimulatedDevice, supervisor: dict[str, str]) -> None:
    device.export_log(0)
    response = await post_sync(gw, device.state.device_id, device.export())
    assert response.status == 200, await response.text()
    device.ack_log(base64.b64decode((await response.json())["ack"]))


async def overspent_discrepancy(gw: Gateway, supervisor: dict[str, str], amount: int, tier: int = 1,
                                loaded: int = 1_000, **options: Any) -> tuple[dict[str, Any], str, str]:
    """The supervisor's own device pays ``amount`` beyond the ``loaded`` value to another device;
    after both sync, the held discrepancy, the payee's wallet and the payer's device id."""
    payer_wallet, payee_wallet = await funded_wallet(gw, 200_000, tier), await open_wallet(gw, tier)
    payer = await supervisor_device(gw, payer_wallet, supervisor)
    payee = await supervisor_device(gw, payee_wallet, supervisor)
    response = await gw.client.post(f"/v1/devices/{payer.state.device_id}/loads", json={"amount_fen": loaded},
                                    headers={**supervisor, **idem()})
    assert response.status == 201, await response.text()
    payer.load(base64.b64decode((await response.json())["voucher"]))
    made = pay(payer, payee, amount, **options)
    await supervisor_sync(gw, payer, supervisor)
    await supervisor_sync(gw, payee, supervisor)
    found = [d for d in await discrepancies(gw, payer.state.device_id) if made["hash"].hex() in d["held_payments"]]
    assert len(found) == 1, found
    return found[0], payee_wallet, payer.state.device_id


def resolve_url(discrepancy: dict[str, Any]) -> str:
    return f"/v1/reconciliation/discrepancies/{discrepancy['discrepancy_id']}/resolve"


async def test_honour_of_a_self_made_overspend_waits_for_a_second_supervisor(gw: Gateway) -> None:
    """One supervisor creates money: registers a device whose key they hold, signs a payment beyond
    its load and honours it from bank:suspense on their own word."""
    supervisor1, supervisor2 = gw.auth(Role.SUPERVISOR), await login(gw, "supervisor2")
    _, same_person = await client_of(gw, Role.SUPERVISOR, owner="supervisor1")  # their second identity
    discrepancy, payee_wallet, _ = await overspent_discrepancy(gw, supervisor1, 9_000, misbehave="overspend")
    assert discrepancy["kind"] == "overspent" and discrepancy["amount_fen"] == 9_000
    before_payee, before_suspense = (await wallet(gw, payee_wallet))["balance_fen"], await suspense(gw)

    response = await gw.client.post(resolve_url(discrepancy), json={"resolution": "honour", "note": "pay it"},
                                    headers=supervisor1)
    approval = await pending(response, "offline_honour")
    assert approval["requested_by"] == "user:supervisor1" and approval["requested_owner"] == "supervisor1"
    assert approval["payload"]["from_suspense_fen"] == 9_000
    assert (await wallet(gw, payee_wallet))["balance_fen"] == before_payee and await suspense(gw) == before_suspense
    # Asking again while it is pending does not make a second approval.
    again = await gw.client.post(resolve_url(discrepancy), json={"resolution": "honour", "note": "pay it twice"},
                                 headers=supervisor2)
    await assert_problem(again, 409, "approval-already-pending")
    # The requester cannot approve it — neither in their session nor through their API client.
    await assert_problem(await decide(gw, approval, supervisor1), 403, "self-approval")
    await assert_problem(await decide(gw, approval, same_person), 403, "approver-not-a-person")
    assert (await wallet(gw, payee_wallet))["balance_fen"] == before_payee and await suspense(gw) == before_suspense

    # Positive control: a second supervisor approves; the payee is paid from suspense exactly once.
    response = await decide(gw, approval, supervisor2)
    assert response.status == 200, await response.text()
    decided = await response.json()
    assert decided["status"] == "executed" and decided["decided_by"] == "user:supervisor2"
    assert decided["result"]["resolution"] == "honour" and decided["result"]["amount_fen"] == 9_000
    assert (await wallet(gw, payee_wallet))["balance_fen"] == before_payee + 9_000
    assert await suspense(gw) == before_suspense - 9_000
    await assert_problem(await decide(gw, approval, supervisor2), 409, "approval-not-pending")
    await assert_problem(await gw.client.post(resolve_url(discrepancy), json={"resolution": "honour", "note": "x"},
                                              headers=supervisor2), 409, "discrepancy-not-open")
    assert (await wallet(gw, payee_wallet))["balance_fen"] == before_payee + 9_000
    resolved = [d for d in await discrepancies(gw, status="resolved")
                if d["discrepancy_id"] == discrepancy["discrepancy_id"]]
    assert resolved[0]["resolution"] == "honour" and resolved[0]["resolved_by"] == "user:supervisor1"
    assert await ledger_problems(gw) == []


async def test_rejected_honour_pays_nothing(gw: Gateway) -> None:
    """A honour the second supervisor rejects still pays: the request alone moves money."""
    supervisor1, supervisor2 = gw.auth(Role.SUPERVISOR), await login(gw, "supervisor2")
    discrepancy, payee_wallet, _ = await overspent_discrepancy(gw, supervisor1, 7_000, misbehave="overspend")
    before_payee, before_suspense = (await wallet(gw, payee_wallet))["balance_fen"], await suspense(gw)
    approval = await pending(await gw.client.post(resolve_url(discrepancy), json={"resolution": "honour",
                                                                                  "note": "pay"},
                                                  headers=supervisor1), "offline_honour")
    response = await decide(gw, approval, supervisor2, "reject")
    assert response.status == 200 and (await response.json())["status"] == "rejected"
    assert (await wallet(gw, payee_wallet))["balance_fen"] == before_payee and await suspense(gw) == before_suspense
    # The discrepancy stays open: the held payment can still be rejected for good.
    response = await gw.client.post(resolve_url(discrepancy), json={"resolution": "reject", "note": "fraud"},
                                    headers=supervisor2)
    assert response.status == 200, await response.text()
    assert (await wallet(gw, payee_wallet))["balance_fen"] == before_payee and await suspense(gw) == before_suspense
    assert await ledger_problems(gw) == []


async def test_honour_approved_after_the_discrepancy_was_closed_pays_nothing(gw: Gateway) -> None:
    """A stale honour approved late pays a second time: the discrepancy was rejected meanwhile."""
    supervisor1, supervisor2 = gw.auth(Role.SUPERVISOR), await login(gw, "supervisor2")
    discrepancy, payee_wallet, _ = await overspent_discrepancy(gw, supervisor1, 4_000, misbehave="overspend")
    before_payee, before_suspense = (await wallet(gw, payee_wallet))["balance_fen"], await suspense(gw)
    approval = await pending(await gw.client.post(resolve_url(discrepancy), json={"resolution": "honour",
                                                                                  "note": "pay"},
                                                  headers=supervisor1), "offline_honour")
    response = await gw.client.post(resolve_url(discrepancy), json={"resolution": "reject", "note": "fraud"},
                                    headers=supervisor2)
    assert response.status == 200, await response.text()
    problem = await assert_problem(await decide(gw, approval, supervisor2), 422, "resolution-refused")
    assert problem["reasons"] == ["discrepancy-not-open"]
    read = await (await gw.client.get(f"/v1/approvals/{approval['approval_id']}", headers=supervisor1)).json()
    assert read["status"] == "failed"
    assert (await wallet(gw, payee_wallet))["balance_fen"] == before_payee and await suspense(gw) == before_suspense
    assert await ledger_problems(gw) == []


async def test_honour_above_the_certificate_per_payment_cap_is_refused(gw: Gateway) -> None:
    """A honour bounded only by the amount field: the supervisor's device signs a payment far above its
    certificate's per-payment cap (and beyond its load) and asks the bank to pay it from suspense."""
    supervisor1 = gw.auth(Role.SUPERVISOR)
    before_suspense = await suspense(gw)

    def beyond_everything(device: SimulatedDevice) -> None:
        device.state.spent = -10**12  # the key holder's device believes anything

    # Tier 4: a ¥500 per-payment cap. The payment: ¥1,000,000,000, beyond the ¥100 loaded.
    payer_wallet, payee_wallet = await funded_wallet(gw, 200_000, 4), await open_wallet(gw, 4)
    payer = await supervisor_device(gw, payer_wallet, supervisor1)
    payee = await supervisor_device(gw, payee_wallet, supervisor1)
    response = await gw.client.post(f"/v1/devices/{payer.state.device_id}/loads", json={"amount_fen": 10_000},
                                    headers={**supervisor1, **idem()})
    assert response.status == 201, await response.text()
    payer.load(base64.b64decode((await response.json())["voucher"]))
    beyond_everything(payer)
    made = pay(payer, payee, 100_000_000_000, careless=True, misbehave="exceed-cap")
    await supervisor_sync(gw, payer, supervisor1)
    await supervisor_sync(gw, payee, supervisor1)
    found = [d for d in await discrepancies(gw, payer.state.device_id) if made["hash"].hex() in d["held_payments"]]
    assert len(found) == 1, await discrepancies(gw, payer.state.device_id)
    response = await gw.client.post(resolve_url(found[0]), json={"resolution": "honour", "note": "pay it"},
                                    headers=supervisor1)
    problem = await assert_problem(response, 422, "honour-above-cap")
    assert problem["reasons"] == ["above-payment-cap"]
    listed = await (await gw.client.get("/v1/approvals", params={"status": "all"}, headers=supervisor1)).json()
    assert not [a for a in listed["approvals"]
                if a["kind"] == "offline_honour" and a["payload"]["discrepancy_id"] == found[0]["discrepancy_id"]]
    assert (await wallet(gw, payee_wallet))["balance_fen"] == 0 and await suspense(gw) == before_suspense

    # Positive control: a honour at the cap (¥500 on a tier-4 device, beyond its load) is requested.
    discrepancy, _, _ = await overspent_discrepancy(gw, supervisor1, 50_000, tier=4, loaded=100,
                                                    misbehave="overspend")
    response = await gw.client.post(resolve_url(discrepancy), json={"resolution": "honour", "note": "at the cap"},
                                    headers=supervisor1)
    assert (await pending(response, "offline_honour"))["payload"]["amount_fen"] == 50_000
    assert await ledger_problems(gw) == []


# --- item 6: money leaves only with a second person ----------------------------------------------


@pytest.mark.parametrize("direction", ["cash-out", "cash-in"])
async def test_large_cash_waits_for_a_second_person_and_happens_once(gw: Gateway, direction: str) -> None:
    """Money leaves (or is issued) without a second person: a ¥60,000 cash-out or cash-in above the
    ¥50,000 threshold goes straight through."""
    teller, supervisor2 = gw.auth(Role.TELLER), await login(gw, "supervisor2")
    wallet_id = await funded_wallet(gw, START)
    sign = -1 if direction == "cash-out" else 1
    key = idem()
    first = await cash(gw, direction, wallet_id, 6_000_000, teller, key)
    approval = await pending(first, direction.replace("-", "_"))
    assert approval["payload"] == {"kind": direction.replace("-", "_"), "wallet_id": wallet_id,
                                   "amount_fen": 6_000_000}
    assert (await wallet(gw, wallet_id))["balance_fen"] == START
    # The retry with the same Idempotency-Key answers the same pending approval: no second request.
    replay = await cash(gw, direction, wallet_id, 6_000_000, teller, key)
    assert replay.status == 202 and replay.headers.get("Idempotent-Replayed") == "true"
    assert (await replay.json())["approval_id"] == approval["approval_id"]
    await assert_problem(await decide(gw, approval, teller), 403, "forbidden")  # a teller decides nothing

    response = await decide(gw, approval, supervisor2)
    assert response.status == 200, await response.text()
    decided = await response.json()
    assert decided["status"] == "executed" and decided["result"]["amount_fen"] == 6_000_000
    assert (await wallet(gw, wallet_id))["balance_fen"] == START + sign * 6_000_000
    await assert_problem(await decide(gw, approval, supervisor2), 409, "approval-not-pending")
    replay = await cash(gw, direction, wallet_id, 6_000_000, teller, key)  # still the recorded answer
    assert replay.status == 202
    assert (await wallet(gw, wallet_id))["balance_fen"] == START + sign * 6_000_000
    executed = [e for e in await audit_entries(gw) if e["action"] == f"wallets.{direction.replace('-', '_')}"
                and e["decision"] == "approved" and e["result"].get("wallet_id") == wallet_id
                and e["result"].get("amount_fen") == 6_000_000]  # not the funding's approved cash-ins
    assert len(executed) == 1 and executed[0]["actor"] == "user:teller1"

    # Rejected: nothing moves.
    approval = await pending(await cash(gw, direction, wallet_id, 6_000_000, teller), direction.replace("-", "_"))
    response = await decide(gw, approval, supervisor2, "reject")
    assert response.status == 200 and (await response.json())["status"] == "rejected"
    assert (await wallet(gw, wallet_id))["balance_fen"] == START + sign * 6_000_000

    # Positive control: at the threshold it goes straight through (on a wallet with no such movement
    # today yet: on this one, the ¥60,000 already counts towards the daily aggregate).
    other = await funded_wallet(gw, START) if direction == "cash-out" else await open_wallet(gw)
    before = (await wallet(gw, other))["balance_fen"]
    response = await cash(gw, direction, other, CASH_THRESHOLD, teller)
    assert response.status == 200, await response.text()
    assert (await wallet(gw, other))["balance_fen"] == before + sign * CASH_THRESHOLD
    assert await ledger_problems(gw) == []


async def test_large_device_load_waits_for_a_second_person_and_happens_once(gw: Gateway) -> None:
    """Money leaves without a second person: a load above the device-load threshold moves value to a
    device's offline reserve (where honours and spending follow) on one person's word."""
    teller, supervisor2 = gw.auth(Role.TELLER), await login(gw, "supervisor2")
    wallet_id = await funded_wallet(gw, 4_000_000)
    device = await supervisor_device(gw, wallet_id, teller)
    device_id = device.state.device_id
    url = f"/v1/devices/{device_id}/loads"
    key = idem()
    response = await gw.client.post(url, json={"amount_fen": 1_500_000}, headers={**teller, **key})
    approval = await pending(response, "device_load")
    assert approval["payload"]["device_id"] == device_id and approval["payload"]["amount_fen"] == 1_500_000
    assert (await device_doc(gw, device_id))["issued_fen"] == 0
    assert (await wallet(gw, wallet_id))["offline_reserve_fen"] == 0
    replay = await gw.client.post(url, json={"amount_fen": 1_500_000}, headers={**teller, **key})
    assert replay.status == 202 and (await replay.json())["approval_id"] == approval["approval_id"]

    response = await decide(gw, approval, supervisor2)
    assert response.status == 200, await response.text()
    decided = await response.json()
    assert decided["status"] == "executed" and decided["result"]["amount_fen"] == 1_500_000
    device.load(base64.b64decode(decided["result"]["voucher"]))  # the HSM-signed voucher the device accepts
    assert device.balance == 1_500_000
    assert (await device_doc(gw, device_id))["issued_fen"] == 1_500_000
    assert (await wallet(gw, wallet_id))["balance_fen"] == 2_500_000
    await assert_problem(await decide(gw, approval, supervisor2), 409, "approval-not-pending")
    assert (await device_doc(gw, device_id))["issued_fen"] == 1_500_000

    approval = await pending(await gw.client.post(url, json={"amount_fen": 1_200_000}, headers={**teller, **idem()}),
                             "device_load")
    response = await decide(gw, approval, supervisor2, "reject")
    assert response.status == 200 and (await response.json())["status"] == "rejected"
    assert (await device_doc(gw, device_id))["issued_fen"] == 1_500_000

    # Positive control: at the threshold the load is signed at once (on a wallet with no load today yet:
    # on this one, the ¥15,000 already counts towards the daily aggregate).
    other = await supervisor_device(gw, await funded_wallet(gw, 4_000_000), teller)
    response = await gw.client.post(f"/v1/devices/{other.state.device_id}/loads", json={"amount_fen": LOAD_THRESHOLD},
                                    headers={**teller, **idem()})
    assert response.status == 201, await response.text()
    assert (await device_doc(gw, other.state.device_id))["issued_fen"] == LOAD_THRESHOLD
    assert (await device_doc(gw, device_id))["issued_fen"] == 1_500_000
    assert await ledger_problems(gw) == []


async def test_upgrade_to_tier_1_waits_for_a_second_person(gw: Gateway) -> None:
    """Limits lifted without a second person: a teller upgrades a wallet to tier 1 (no limits) alone."""
    teller, supervisor2 = gw.auth(Role.TELLER), await login(gw, "supervisor2")
    wallet_id = await open_wallet(gw, 2)
    url = f"/v1/wallets/{wallet_id}/tier"
    approval = await pending(await gw.client.post(url, json={"tier": 1}, headers=teller), "wallet_tier")
    assert approval["payload"] == {"kind": "wallet_tier", "wallet_id": wallet_id, "from_tier": 2, "tier": 1}
    assert (await wallet(gw, wallet_id))["tier"] == 2
    response = await decide(gw, approval, supervisor2, "reject")
    assert response.status == 200 and (await wallet(gw, wallet_id))["tier"] == 2

    approval = await pending(await gw.client.post(url, json={"tier": 1}, headers=teller), "wallet_tier")
    response = await decide(gw, approval, supervisor2)
    assert response.status == 200, await response.text()
    assert (await response.json())["result"] == {"wallet_id": wallet_id, "tier": 1}
    assert (await wallet(gw, wallet_id))["tier"] == 1

    # Positive controls: other tier changes go straight through (tier 1 to 3 lowers the limits).
    response = await gw.client.post(url, json={"tier": 3}, headers=teller)
    assert response.status == 200 and (await response.json())["tier"] == 3
    response = await gw.client.post(url, json={"tier": 2}, headers=teller)
    assert response.status == 200 and (await response.json())["tier"] == 2


# --- people decide; owners, not accounts ----------------------------------------------------------


async def test_an_api_client_with_the_supervisor_role_cannot_decide(gw: Gateway) -> None:
    """A careless or stolen API key decides approvals: a client given the supervisor role approves."""
    teller, supervisor2 = gw.auth(Role.TELLER), await login(gw, "supervisor2")
    _, robot = await client_of(gw, Role.SUPERVISOR, owner="ops-robot")
    wallet_id = await funded_wallet(gw, 7_000_000)
    approval = await pending(await cash(gw, "cash-out", wallet_id, 6_000_000, teller), "cash_out")
    for verb in ("approve", "reject"):
        await assert_problem(await decide(gw, approval, robot, verb), 403, "approver-not-a-person")
    assert (await wallet(gw, wallet_id))["balance_fen"] == 7_000_000
    read = await gw.client.get(f"/v1/approvals/{approval['approval_id']}", headers=supervisor2)
    assert (await read.json())["status"] == "pending"
    # Positive control: a supervisor's session decides it.
    assert (await decide(gw, approval, supervisor2)).status == 200
    assert (await wallet(gw, wallet_id))["balance_fen"] == 1_000_000


async def test_one_person_cannot_approve_what_their_api_client_requested(gw: Gateway) -> None:
    """Self-approval checked per account, not per person: a supervisor's API client requests a
    ¥60,000 cash-out and the same supervisor approves it in their session."""
    supervisor1, supervisor2 = gw.auth(Role.SUPERVISOR), await login(gw, "supervisor2")
    name, their_client = await client_of(gw, Role.SUPERVISOR, owner="supervisor1")
    wallet_id = await funded_wallet(gw, 7_000_000)
    approval = await pending(await cash(gw, "cash-out", wallet_id, 6_000_000, their_client), "cash_out")
    assert approval["requested_by"] == f"client:{name}" and approval["requested_owner"] == "supervisor1"
    for verb in ("approve", "reject"):
        await assert_problem(await decide(gw, approval, supervisor1, verb), 403, "self-approval")
    assert (await wallet(gw, wallet_id))["balance_fen"] == 7_000_000
    # Positive control: another person approves it.
    response = await decide(gw, approval, supervisor2)
    assert response.status == 200 and (await response.json())["decided_by"] == "user:supervisor2"
    assert (await wallet(gw, wallet_id))["balance_fen"] == 1_000_000


async def test_the_owner_is_recorded_and_defaults_to_the_name(gw: Gateway) -> None:
    """Existing identities keep working: without an owner, a user or client is its own person."""
    teller = gw.auth(Role.TELLER)
    wallet_id = await funded_wallet(gw, 7_000_000)
    approval = await pending(await cash(gw, "cash-out", wallet_id, 6_000_000, teller), "cash_out")
    assert approval["requested_owner"] == "teller1"
    row = await runtime(gw).database.read(lambda tx: tx.fetchone(
        "SELECT requested_by, requested_owner FROM approvals WHERE approval_id = ?", (approval["approval_id"],)))
    assert row is not None and dict(row) == {"requested_by": "user:teller1", "requested_owner": "teller1"}
    owners = await runtime(gw).database.read(lambda tx: {
        r["username"]: r["owner"] for r in tx.fetchall("SELECT username, owner FROM users")})
    assert owners["supervisor1"] == "supervisor1" and owners["teller2"] == "teller2"
    response = await decide(gw, approval, gw.auth(Role.SUPERVISOR), "reject")  # supervisor1 ≠ teller1
    assert response.status == 200


# --- who reads an approval ------------------------------------------------------------------------


async def test_tellers_and_backends_see_only_their_own_approvals(gw: Gateway) -> None:
    """Every backend and teller can read every approval: amounts, wallets and who asked."""
    teller1 = gw.auth(Role.TELLER)
    teller2 = await login(gw, "teller2")
    backend = gw.auth(Role.BACKEND)
    _, backend2 = await client_of(gw, Role.BACKEND)
    _, teller1_robot = await client_of(gw, Role.BACKEND, owner="teller1")  # another identity of teller1
    wallet_id = await funded_wallet(gw, 7_000_000)
    approval = await pending(await cash(gw, "cash-out", wallet_id, 6_000_000, teller1), "cash_out")
    url = f"/v1/approvals/{approval['approval_id']}"

    async def listed(headers: dict[str, str], status: str) -> set[str]:
        response = await gw.client.get("/v1/approvals", params={"status": status}, headers=headers)
        assert response.status == 200, await response.text()
        return {a["approval_id"] for a in (await response.json())["approvals"]}

    for outsider in (teller2, backend, backend2):
        await assert_problem(await gw.client.get(url, headers=outsider), 404, "not-found")
        for status in ("pending", "all"):
            assert approval["approval_id"] not in await listed(outsider, status)
    # Positive controls: the requester (under any of their identities), supervisors and auditors see it.
    for insider in (teller1, teller1_robot, gw.auth(Role.SUPERVISOR), gw.auth(Role.AUDITOR)):
        response = await gw.client.get(url, headers=insider)
        assert response.status == 200 and (await response.json())["approval_id"] == approval["approval_id"]
        assert approval["approval_id"] in await listed(insider, "pending")
    # A backend sees its own: the pending transfer it asked for.
    payer, payee = await funded_wallet(gw, 6_000_000), await open_wallet(gw)
    response = await gw.client.post("/v1/transfers", json={"from_wallet": payer, "to_wallet": payee,
                                                           "amount_fen": 5_500_000}, headers={**backend, **idem()})
    assert response.status == 202, await response.text()
    own = (await response.json())["approval_id"]
    assert (await gw.client.get(f"/v1/approvals/{own}", headers=backend)).status == 200
    assert own in await listed(backend, "pending") and own not in await listed(teller1, "all")
    await assert_problem(await gw.client.get(f"/v1/approvals/{own}", headers=backend2), 404, "not-found")


# --- owners: set at creation, defaulted for existing identities ---------------------------------------


def test_cli_records_the_owner_of_users_and_clients(tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """One person, two identities, unnoticed: `users add` and `clients add` take --owner (default: the name)."""
    import io
    import sqlite3
    import sys

    from gateway.cli import main

    database = tmp_path / "cli.db"
    monkeypatch.setenv("ECNY_STORE__DSN", f"sqlite:///{database}")
    monkeypatch.delenv("ECNY_CONFIG", raising=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO("a-long-enough-password\n"))
    assert main(["users", "add", "--username", "wang.supervisor", "--role", "supervisor", "--owner", "wang",
                 "--password-stdin"]) == 0
    assert main(["clients", "add", "--name", "wang-batch", "--role", "supervisor", "--owner", "wang"]) == 0
    assert main(["clients", "add", "--name", "plain-backend", "--role", "backend"]) == 0
    assert main(["clients", "add", "--name", "bad", "--role", "backend", "--owner", " wang"]) != 0
    capsys.readouterr()
    with sqlite3.connect(database) as connection:
        users = dict(connection.execute("SELECT username, owner FROM users").fetchall())
        clients = dict(connection.execute("SELECT name, owner FROM clients").fetchall())
        audited = [row[0] for row in connection.execute("SELECT result FROM audit_log WHERE action LIKE '%.add'")]
    assert users == {"wang.supervisor": "wang"}
    assert clients == {"wang-batch": "wang", "plain-backend": "plain-backend"}
    assert any('"owner":"wang"' in result for result in audited)


async def test_existing_identities_and_approvals_get_their_own_name_as_owner(store_dsn: str) -> None:
    """An upgrade that locks everyone out, or lets anyone approve anything: the owner migration gives
    every existing user, client and pending approval the owner it had implicitly (its own name)."""
    from gateway import clock
    from gateway.ledger.engines import open_database
    from gateway.ledger.migrate import _statements, migration_files
    from gateway.ledger.store import Tx

    database = await open_database(store_dsn)
    dialect = "sqlite" if store_dsn.startswith("sqlite") else "postgresql"

    def before_owners(tx: Tx) -> None:
        tx.execute("CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
        for name, sql in migration_files(dialect):
            if name.endswith("_approvals"):
                continue  # the migration under test
            for statement in _statements(sql):
                tx.execute(statement)
            tx.execute("INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)", (name, clock.now_iso()))
        now = clock.now_iso()
        tx.execute("INSERT INTO users (username, role, password_hash, created_at) VALUES (?, ?, ?, ?)",
                   ("old.supervisor", "supervisor", "x", now))
        tx.execute("INSERT INTO clients (name, role, key_prefix, key_hash, created_at) VALUES (?, ?, ?, ?, ?)",
                   ("old:client", "backend", "0123456789ab", b"h", now))
        tx.execute("INSERT INTO approvals (approval_id, kind, payload, payload_hash, requested_by, status, "
                   "created_at, expires_at) VALUES ('a_old', 'transfer', '{}', 'h', 'client:old:client', 'pending', "
                   "?, ?)", (now, clock.after(3600)))

    try:
        await database.write(before_owners)
        applied = await database.migrate()
        assert [name for name in applied if name.endswith("_approvals")], applied

        def owners(tx: Tx) -> tuple[str, str, str]:
            user = tx.fetchone("SELECT owner FROM users WHERE username = 'old.supervisor'")
            client = tx.fetchone("SELECT owner FROM clients WHERE name = 'old:client'")
            approval = tx.fetchone("SELECT requested_owner FROM approvals WHERE approval_id = 'a_old'")
            assert user is not None and client is not None and approval is not None
            return user["owner"], client["owner"], approval["requested_owner"]

        assert await database.read(owners) == ("old.supervisor", "old:client", "old:client")
    finally:
        await database.close()


# --- gaps: tier 1 at opening, interested parties, split operations ----------------------------------


async def test_wallet_opened_at_tier_1_waits_for_a_second_person(gw: Gateway) -> None:
    """Limits lifted at opening: a teller opens a wallet directly at tier 1 (no limits), sidestepping
    the second person an upgrade to tier 1 needs."""
    teller, supervisor2 = gw.auth(Role.TELLER), await login(gw, "supervisor2")
    body = {"holder_name": "Tier One", "phone": "13800138000", "tier": 1, "kind": "personal"}
    key = idem()
    response = await gw.client.post("/v1/wallets", json=body, headers={**teller, **key})
    assert response.status == 201, await response.text()
    opened = await response.json()
    wallet_id = opened["wallet_id"]
    assert opened["tier"] == 2  # what the wallet really is until the upgrade is approved
    approval = opened["tier_approval"]
    assert approval["kind"] == "wallet_tier" and approval["status"] == "pending"
    assert approval["payload"] == {"kind": "wallet_tier", "wallet_id": wallet_id, "from_tier": 2, "tier": 1}
    assert approval["requested_by"] == "user:teller1"
    assert (await wallet(gw, wallet_id))["tier"] == 2
    # The retry with the same Idempotency-Key answers the same wallet and the same pending approval.
    replay = await gw.client.post("/v1/wallets", json=body, headers={**teller, **key})
    assert replay.status == 201 and replay.headers.get("Idempotent-Replayed") == "true"
    assert await replay.json() == opened
    count = await runtime(gw).database.read(lambda tx: tx.fetchone(
        "SELECT COUNT(*) AS n FROM approvals WHERE kind = 'wallet_tier' AND payload LIKE ?", (f"%{wallet_id}%",)))
    assert count is not None and int(count["n"]) == 1
    # The opener decides nothing; the wallet stays at tier 2 with its tier-2 limits.
    await assert_problem(await decide(gw, approval, teller), 403, "forbidden")
    above_tier_2_cap = 50_000_001  # tier 2 holds at most ¥500,000
    problem = await assert_problem(await cash(gw, "cash-in", wallet_id, above_tier_2_cap, teller), 422)
    assert problem["reasons"] == ["balance-cap-exceeded"]
    audited = [e for e in await audit_entries(gw) if e["result"].get("wallet_id") == wallet_id
               and e["action"] in ("wallets.open", "wallets.tier")]
    assert {(e["action"], e["decision"]) for e in audited} == {("wallets.open", "allowed"),
                                                               ("wallets.tier", "pending_approval")}
    assert next(e for e in audited if e["action"] == "wallets.open")["result"]["requested_tier"] == 1

    # Positive control: a second person approves; the wallet is tier 1, with no balance cap (the large
    # cash-in is now only a request for approval, as any above ¥50,000).
    response = await decide(gw, approval, supervisor2)
    assert response.status == 200, await response.text()
    assert (await response.json())["result"] == {"wallet_id": wallet_id, "tier": 1}
    assert (await wallet(gw, wallet_id))["tier"] == 1
    await pending(await cash(gw, "cash-in", wallet_id, above_tier_2_cap, teller), "cash_in")
    # Positive control: other tiers open at once, with no approval.
    response = await gw.client.post("/v1/wallets", json={**body, "tier": 3}, headers=teller)
    assert response.status == 201
    other = await response.json()
    assert other["tier"] == 3 and other.get("tier_approval") is None


async def test_device_registrar_cannot_approve_an_honour_someone_else_requested(gw: Gateway) -> None:
    """An interested party approves: the supervisor who registered the device (and may hold its key)
    lets a colleague request the honour of its overspend and approves it themselves."""
    supervisor1, supervisor2 = gw.auth(Role.SUPERVISOR), await login(gw, "supervisor2")
    alias, supervisor3 = await login(gw, "supervisor1.alias"), await login(gw, "supervisor3")
    discrepancy, payee_wallet, _ = await overspent_discrepancy(gw, supervisor1, 6_000, misbehave="overspend")
    before_payee, before_suspense = (await wallet(gw, payee_wallet))["balance_fen"], await suspense(gw)
    response = await gw.client.post(resolve_url(discrepancy), json={"resolution": "honour", "note": "pay it"},
                                    headers=supervisor2)
    approval = await pending(response, "offline_honour")
    assert approval["requested_owner"] == "supervisor2" and approval["interested_owners"] == ["supervisor1"]
    # The registrar, under either of their identities, decides nothing.
    for identity in (supervisor1, alias):
        for verb in ("approve", "reject"):
            await assert_problem(await decide(gw, approval, identity, verb), 403, "interested-party")
    assert (await wallet(gw, payee_wallet))["balance_fen"] == before_payee and await suspense(gw) == before_suspense

    # Positive control: a third supervisor, with no stake in it, approves; paid exactly once.
    response = await decide(gw, approval, supervisor3)
    assert response.status == 200, await response.text()
    assert (await response.json())["status"] == "executed"
    assert (await wallet(gw, payee_wallet))["balance_fen"] == before_payee + 6_000
    assert await suspense(gw) == before_suspense - 6_000
    assert await ledger_problems(gw) == []


async def test_device_registrar_cannot_approve_a_large_load_onto_it(gw: Gateway) -> None:
    """An interested party approves: the supervisor who registered a device (and may hold its key)
    approves a large load onto it that a teller requested."""
    teller, supervisor1, supervisor2 = gw.auth(Role.TELLER), gw.auth(Role.SUPERVISOR), await login(gw, "supervisor2")
    wallet_id = await funded_wallet(gw, 4_000_000)
    device = await supervisor_device(gw, wallet_id, supervisor1)
    device_id = device.state.device_id
    url = f"/v1/devices/{device_id}/loads"
    approval = await pending(await gw.client.post(url, json={"amount_fen": 1_500_000}, headers={**teller, **idem()}),
                             "device_load")
    assert approval["requested_owner"] == "teller1" and approval["interested_owners"] == ["supervisor1"]
    await assert_problem(await decide(gw, approval, supervisor1), 403, "interested-party")
    assert (await device_doc(gw, device_id))["issued_fen"] == 0

    # Positive control: a supervisor who did not register the device approves it.
    response = await decide(gw, approval, supervisor2)
    assert response.status == 200, await response.text()
    device.load(base64.b64decode((await response.json())["result"]["voucher"]))
    assert device.balance == 1_500_000 and (await device_doc(gw, device_id))["issued_fen"] == 1_500_000
    assert await ledger_problems(gw) == []


@pytest.mark.parametrize("direction", ["cash-out", "cash-in"])
async def test_cash_split_below_the_threshold_waits_once_the_day_adds_up(gw: Gateway, direction: str) -> None:
    """Operations split below the threshold: three ¥49,999 cash-outs (or cash-ins) on one wallet in a
    business day, each under the ¥50,000 single threshold, move ¥149,997 on one person's word."""
    teller, supervisor2 = gw.auth(Role.TELLER), await login(gw, "supervisor2")
    kind, part = direction.replace("-", "_"), 4_999_900
    sign = -1 if direction == "cash-out" else 1
    wallet_id = await funded_wallet(gw, START) if direction == "cash-out" else await open_wallet(gw)
    start = (await wallet(gw, wallet_id))["balance_fen"]
    # Positive control: below the daily aggregate each part goes straight through.
    for _ in range(2):
        response = await cash(gw, direction, wallet_id, part, teller)
        assert response.status == 200, await response.text()
    assert (await wallet(gw, wallet_id))["balance_fen"] == start + sign * 2 * part
    # The part that takes the day past ¥100,000 waits for a second person.
    approval = await pending(await cash(gw, direction, wallet_id, part, teller), kind)
    assert approval["payload"] == {"kind": kind, "wallet_id": wallet_id, "amount_fen": part,
                                   "day_total_fen": 3 * part}
    assert (await wallet(gw, wallet_id))["balance_fen"] == start + sign * 2 * part
    response = await decide(gw, approval, supervisor2)
    assert response.status == 200 and (await response.json())["status"] == "executed"
    assert (await wallet(gw, wallet_id))["balance_fen"] == start + sign * 3 * part
    # And so does every further one today, however small.
    await pending(await cash(gw, direction, wallet_id, 100, teller), kind)
    # Positive control: the aggregate is per wallet: another wallet's first part goes through.
    other = await funded_wallet(gw, part) if direction == "cash-out" else await open_wallet(gw)
    assert (await cash(gw, direction, other, part, teller)).status == 200
    assert await ledger_problems(gw) == []


async def test_device_loads_split_below_the_threshold_wait_once_the_day_adds_up(gw: Gateway) -> None:
    """Operations split below the threshold: loads just under the device-load threshold onto a device
    add up, in one business day, to more than the daily aggregate on one person's word."""
    teller = gw.auth(Role.TELLER)
    wallet_id = await funded_wallet(gw, 4_000_000)
    device = await supervisor_device(gw, wallet_id, teller)
    url = f"/v1/devices/{device.state.device_id}/loads"
    part = LOAD_THRESHOLD - 1
    for _ in range(2):  # positive control: ¥19,999.98 today, under the ¥20,000 daily aggregate
        response = await gw.client.post(url, json={"amount_fen": part}, headers={**teller, **idem()})
        assert response.status == 201, await response.text()
    approval = await pending(await gw.client.post(url, json={"amount_fen": part}, headers={**teller, **idem()}),
                             "device_load")
    assert approval["payload"]["day_total_fen"] == 3 * part
    assert (await device_doc(gw, device.state.device_id))["issued_fen"] == 2 * part
    assert await ledger_problems(gw) == []
