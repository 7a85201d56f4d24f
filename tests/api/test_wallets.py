"""Wallets, the double-entry ledger, signed transfers and approvals — on SQLite and on a real
PostgreSQL server. Envelopes are verified with pycose, an independent COSE implementation."""

from __future__ import annotations

import asyncio
import base64
import uuid
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from pycose.keys import EC2Key
from pycose.messages import Sign1Message

from gateway.auth.roles import Role
from gateway.ledger.journal import check_invariants
from gateway.runtime import RUNTIME
from gateway.wallets.ids import is_valid_wallet_id, luhn_check_digit
from tests.api.support import approve_as_second_person, approve_opened_tier
from tests.conftest import Gateway, login

pytestmark = pytest.mark.softhsm


def idem() -> dict[str, str]:
    return {"Idempotency-Key": uuid.uuid4().hex}


async def open_wallet(gw: Gateway, tier: int = 4, **extra: Any) -> str:
    body = {"holder_name": "Li Lei", "phone": "13800138000", "tier": tier, "kind": "personal", **extra}
    response = await gw.client.post("/v1/wallets", json=body, headers=gw.auth(Role.TELLER))
    assert response.status == 201, await response.text()
    wallet_id: str = (await approve_opened_tier(gw, await response.json()))["wallet_id"]
    return wallet_id


async def cash_in(gw: Gateway, wallet_id: str, amount: int) -> None:
    """Cash in as a teller; above the cash-in approval threshold a second supervisor approves it."""
    response = await gw.client.post(
        f"/v1/wallets/{wallet_id}/cash-in", json={"amount_fen": amount}, headers={**gw.auth(Role.TELLER), **idem()}
    )
    if amount > gw.settings.approvals.cash_in_threshold_fen:
        await approve_as_second_person(gw, response)
        return
    assert response.status == 200, await response.text()


async def wallet(gw: Gateway, wallet_id: str) -> dict[str, Any]:
    response = await gw.client.get(f"/v1/wallets/{wallet_id}", headers=gw.auth(Role.TELLER))
    assert response.status == 200
    document: dict[str, Any] = await response.json()
    return document


async def transfer(
    gw: Gateway, source: str, target: str, amount: Any, headers: dict[str, str] | None = None, **extra: Any
) -> Any:
    body = {"from_wallet": source, "to_wallet": target, "amount_fen": amount, **extra}
    return await gw.client.post("/v1/transfers", json=body, headers={**(headers or gw.auth(Role.BACKEND)), **idem()})


async def ledger_problems(gw: Gateway) -> list[str]:
    problems: list[str] = await gw.client.server.app[RUNTIME].database.read(check_invariants)
    return problems


def verify_with_pycose(envelope_b64: str, public_key_pem: str) -> dict[str, Any]:
    raw = base64.b64decode(envelope_b64)
    tagged = cbor2.loads(raw)
    assert isinstance(tagged, cbor2.CBORTag) and tagged.tag == 18
    # pycose 1.1 cannot decode cbor2 6 output directly (tuples inside tags): hand it the array.
    items = list(tagged.value)
    items[1] = dict(items[1])
    message = Sign1Message.from_cose_obj(items, True)
    public = serialization.load_pem_public_key(public_key_pem.encode())
    numbers = public.public_numbers()  # type: ignore[union-attr]
    message.key = EC2Key(crv="P_256", x=numbers.x.to_bytes(32, "big"), y=numbers.y.to_bytes(32, "big"))
    assert message.verify_signature()
    claims: dict[str, Any] = cbor2.loads(message.payload)
    return claims


async def test_wallet_ids_are_luhn_checked(ledger_gateway: Gateway) -> None:
    wallet_id = await open_wallet(ledger_gateway)
    assert is_valid_wallet_id(wallet_id) and wallet_id[15] == luhn_check_digit(wallet_id[:15])
    document = await wallet(ledger_gateway, wallet_id)
    assert document["balance_fen"] == 0 and document["offline_reserve_fen"] == 0 and document["tier"] == 4


async def test_transfer_posts_once_and_its_envelope_verifies_with_pycose(ledger_gateway: Gateway) -> None:
    gw = ledger_gateway
    payer, payee = await open_wallet(gw), await open_wallet(gw)
    await cash_in(gw, payer, 50_000)
    response = await transfer(gw, payer, payee, 12_345, memo="lunch")
    assert response.status == 201, await response.text()
    document = await response.json()
    assert document["status"] == "posted"
    key = await (await gw.client.get(f"/v1/keys/{document['kid']}", headers=gw.auth(Role.BACKEND))).json()
    claims = verify_with_pycose(document["envelope"], key["public_key_pem"])
    assert claims["v"] == 1 and claims["id"] == document["transfer_id"]
    assert (claims["from"], claims["to"], claims["amount"], claims["ccy"]) == (payer, payee, 12_345, "CNY")
    assert isinstance(claims["ts"], int) and claims["seq"] == 1
    assert (await wallet(gw, payer))["balance_fen"] == 50_000 - 12_345
    assert (await wallet(gw, payee))["balance_fen"] == 12_345
    shown = await (await gw.client.get(f"/v1/transfers/{document['transfer_id']}", headers=gw.auth(Role.TELLER))).json()
    assert shown["envelope"] == document["envelope"]
    assert await ledger_problems(gw) == []


async def test_cbor_transfer_request(ledger_gateway: Gateway) -> None:
    gw = ledger_gateway
    payer, payee = await open_wallet(gw), await open_wallet(gw)
    await cash_in(gw, payer, 1_000)
    body = cbor2.dumps({"from_wallet": payer, "to_wallet": payee, "amount_fen": 400})
    response = await gw.client.post(
        "/v1/transfers", data=body, headers={**gw.auth(Role.BACKEND), **idem(), "Content-Type": "application/cbor"}
    )
    assert response.status == 201, await response.text()
    assert (await wallet(gw, payee))["balance_fen"] == 400


async def test_transfer_replay_returns_the_same_response_and_posts_once(ledger_gateway: Gateway) -> None:
    gw = ledger_gateway
    payer, payee = await open_wallet(gw), await open_wallet(gw)
    await cash_in(gw, payer, 1_000)
    headers = {**gw.auth(Role.BACKEND), "Idempotency-Key": uuid.uuid4().hex}
    body = {"from_wallet": payer, "to_wallet": payee, "amount_fen": 300}
    first = await gw.client.post("/v1/transfers", json=body, headers=headers)
    again = await gw.client.post("/v1/transfers", json=body, headers=headers)
    assert first.status == again.status == 201
    assert await first.read() == await again.read()
    assert (await wallet(gw, payer))["balance_fen"] == 700
    other = await gw.client.post("/v1/transfers", json={**body, "amount_fen": 301}, headers=headers)
    assert other.status == 409


async def test_a_transfer_replay_is_answered_as_recorded_not_judged_again(ledger_gateway: Gateway) -> None:
    """Threat: the key of a transfer is read in the transfer's own transaction (no read before it): a replay
    must still be answered as recorded, never re-checked against today's balance (a 422 for a transfer
    that was made) nor posted again; ten at once with one key post once."""
    gw = ledger_gateway
    payer, payee = await open_wallet(gw), await open_wallet(gw)
    await cash_in(gw, payer, 1_000)
    headers = {**gw.auth(Role.BACKEND), "Idempotency-Key": uuid.uuid4().hex}
    body = {"from_wallet": payer, "to_wallet": payee, "amount_fen": 1_000}  # all of it
    first = await gw.client.post("/v1/transfers", json=body, headers=headers)
    assert first.status == 201, await first.text()
    again = await gw.client.post("/v1/transfers", json=body, headers=headers)
    assert again.status == 201 and again.headers.get("Idempotent-Replayed") == "true"
    assert await again.read() == await first.read()
    assert (await wallet(gw, payer))["balance_fen"] == 0
    # Positive control: a new key with the same body is judged, and refused (nothing left to pay).
    refused = await gw.client.post("/v1/transfers", json=body, headers={**gw.auth(Role.BACKEND), **idem()})
    assert refused.status == 422
    # Concurrent requests with one fresh key: one posts, the others answer as it did.
    await cash_in(gw, payer, 500)
    headers = {**gw.auth(Role.BACKEND), "Idempotency-Key": uuid.uuid4().hex}
    body = {**body, "amount_fen": 100}
    responses = await asyncio.gather(*(gw.client.post("/v1/transfers", json=body, headers=headers) for _ in range(10)))
    assert {r.status for r in responses} == {201}
    assert len({await r.read() for r in responses}) == 1
    assert (await wallet(gw, payer))["balance_fen"] == 400


async def test_a_cash_out_replay_is_answered_as_recorded_not_judged_again(ledger_gateway: Gateway) -> None:
    """Threat: a cash movement's key is read in its own transaction (no read before it, a round trip less):
    a replay must still be answered as recorded — not refused against today's balance, not paid twice —
    a reused key with another body is a conflict, and ten at once with one key pay once."""
    gw = ledger_gateway
    wallet_id = await open_wallet(gw)
    await cash_in(gw, wallet_id, 1_000)
    teller = gw.auth(Role.TELLER)
    key = {"Idempotency-Key": uuid.uuid4().hex}
    path = f"/v1/wallets/{wallet_id}/cash-out"
    first = await gw.client.post(path, json={"amount_fen": 1_000}, headers={**teller, **key})  # all of it
    assert first.status == 200, await first.text()
    again = await gw.client.post(path, json={"amount_fen": 1_000}, headers={**teller, **key})
    assert again.status == 200 and again.headers.get("Idempotent-Replayed") == "true"
    assert await again.read() == await first.read()
    assert (await wallet(gw, wallet_id))["balance_fen"] == 0
    other = await gw.client.post(path, json={"amount_fen": 999}, headers={**teller, **key})
    assert other.status == 409
    # Positive control: a new key with the same body is judged, and refused (nothing left).
    refused = await gw.client.post(path, json={"amount_fen": 1_000}, headers={**teller, **idem()})
    assert refused.status == 422
    await cash_in(gw, wallet_id, 500)
    key = {"Idempotency-Key": uuid.uuid4().hex}
    responses = await asyncio.gather(*(gw.client.post(path, json={"amount_fen": 100}, headers={**teller, **key})
                                       for _ in range(10)))
    assert {r.status for r in responses} == {200}
    assert len({await r.read() for r in responses}) == 1
    assert (await wallet(gw, wallet_id))["balance_fen"] == 400
    assert await ledger_problems(gw) == []


async def test_money_moving_requests_need_an_idempotency_key(ledger_gateway: Gateway) -> None:
    gw = ledger_gateway
    payer, payee = await open_wallet(gw), await open_wallet(gw)
    response = await gw.client.post(
        "/v1/transfers", json={"from_wallet": payer, "to_wallet": payee, "amount_fen": 1}, headers=gw.auth(Role.BACKEND)
    )
    assert response.status == 400
    assert (await response.json())["type"].endswith("/idempotency-key-required")
    response = await gw.client.post(
        f"/v1/wallets/{payer}/cash-in", json={"amount_fen": 1}, headers=gw.auth(Role.TELLER)
    )
    assert response.status == 400


@pytest.mark.parametrize(
    ("amount", "problem"),
    [
        (1.5, "validation-failed"),
        (100.0, "validation-failed"),
        (-5, "validation-failed"),
        (0, "validation-failed"),
        (10**16, "invalid-amount"),
        ("100", "validation-failed"),
        (True, "validation-failed"),
    ],
)
async def test_bad_amounts_are_refused_and_nothing_posts(ledger_gateway: Gateway, amount: Any, problem: str) -> None:
    gw = ledger_gateway
    payer, payee = await open_wallet(gw), await open_wallet(gw)
    await cash_in(gw, payer, 1_000)
    response = await transfer(gw, payer, payee, amount)
    assert response.status == 400, await response.text()
    assert (await response.json())["type"].endswith("/" + problem)
    assert (await wallet(gw, payer))["balance_fen"] == 1_000


async def test_refusals_have_specific_problem_types(ledger_gateway: Gateway) -> None:
    gw = ledger_gateway
    payer, payee = await open_wallet(gw), await open_wallet(gw)
    await cash_in(gw, payer, 100_000)
    bad_luhn = payee[:15] + str((int(payee[15]) + 1) % 10)
    unknown = "8" * 14 + "0" + luhn_check_digit("8" * 14 + "0")
    cases = [
        ((payer, bad_luhn, 100), 400, "invalid-wallet-id"),
        ((payer, payer, 100), 400, "same-wallet"),
        ((payer, unknown, 100), 404, "wallet-not-found"),
        ((payer, payee, 100_001), 422, "insufficient-funds"),
    ]
    for (source, target, amount), status, problem in cases:
        response = await transfer(gw, source, target, amount)
        assert response.status == status, (problem, await response.text())
        assert (await response.json())["type"].endswith("/" + problem)
    # Frozen payee, then closed payer: neither sends nor receives.
    response = await gw.client.post(
        f"/v1/wallets/{payee}/status", json={"status": "frozen", "reason": "fraud check"}, headers=gw.auth(Role.TELLER)
    )
    assert response.status == 200
    response = await transfer(gw, payer, payee, 100)
    assert response.status == 422
    problem_document = await response.json()
    assert (
        problem_document["type"].endswith("/wallet-not-active") and "payee-wallet-frozen" in problem_document["reasons"]
    )
    # A teller may freeze but not unfreeze.
    response = await gw.client.post(
        f"/v1/wallets/{payee}/status", json={"status": "active", "reason": "cleared"}, headers=gw.auth(Role.TELLER)
    )
    assert response.status == 403
    response = await gw.client.post(
        f"/v1/wallets/{payee}/status", json={"status": "active", "reason": "cleared"}, headers=gw.auth(Role.SUPERVISOR)
    )
    assert response.status == 200
    assert (await wallet(gw, payer))["balance_fen"] == 100_000
    assert await ledger_problems(gw) == []


async def test_tier_limits(ledger_gateway: Gateway) -> None:
    gw = ledger_gateway
    payer, payee = await open_wallet(gw, tier=4), await open_wallet(gw, tier=4)
    await cash_in(gw, payer, 1_000_000)  # tier 4 balance cap: ¥10,000
    response = await gw.client.post(
        f"/v1/wallets/{payer}/cash-in", json={"amount_fen": 1}, headers={**gw.auth(Role.TELLER), **idem()}
    )
    assert response.status == 422 and "balance-cap-exceeded" in (await response.json())["reasons"]
    response = await transfer(gw, payer, payee, 200_001)  # single ¥2,000
    assert response.status == 422 and "single-limit-exceeded" in (await response.json())["reasons"]
    for _ in range(2):
        assert (await transfer(gw, payer, payee, 200_000)).status == 201
    response = await transfer(gw, payer, payee, 100_001)  # daily ¥5,000
    assert response.status == 422 and (await response.json())["reasons"] == ["daily-limit-exceeded"]
    assert (await transfer(gw, payer, payee, 100_000)).status == 201
    # Lowering the payee to a tier whose cap its balance exceeds is refused.
    response = await gw.client.post(f"/v1/wallets/{payer}/tier", json={"tier": 2}, headers=gw.auth(Role.TELLER))
    assert response.status == 200 and (await response.json())["tier"] == 2


async def test_approval_flow_maker_checker(ledger_gateway: Gateway) -> None:
    gw = ledger_gateway
    payer, payee = await open_wallet(gw, tier=1), await open_wallet(gw, tier=1)
    await cash_in(gw, payer, 20_000_000)
    maker = await login(gw, "supervisor1")
    response = await transfer(gw, payer, payee, 6_000_000, headers=maker)  # above the ¥50,000 threshold
    assert response.status == 202, await response.text()
    pending = await response.json()
    assert pending["status"] == "pending_approval" and "envelope" not in pending
    assert (await wallet(gw, payer))["balance_fen"] == 20_000_000
    approvals = await (await gw.client.get("/v1/approvals", headers=gw.auth(Role.SUPERVISOR))).json()
    approval = next(a for a in approvals["approvals"] if a["approval_id"] == pending["approval_id"])
    assert approval["payload"]["amount_fen"] == 6_000_000 and approval["payload"]["to_wallet"] == payee
    url = f"/v1/approvals/{approval['approval_id']}/approve"
    good = {"payload_hash": approval["payload_hash"], "note": "checked"}
    # The requester cannot approve their own request; a teller cannot approve at all.
    response = await gw.client.post(url, json=good, headers=maker)
    assert response.status == 403 and (await response.json())["type"].endswith("/self-approval")
    assert (await gw.client.post(url, json=good, headers=gw.auth(Role.TELLER))).status == 403
    checker = await login(gw, "supervisor2")
    # An approval for another payload is refused.
    response = await gw.client.post(url, json={"payload_hash": "0" * 64}, headers=checker)
    assert response.status == 409 and (await response.json())["type"].endswith("/approval-payload-mismatch")
    response = await gw.client.post(url, json=good, headers=checker)
    assert response.status == 200, await response.text()
    decided = await response.json()
    assert decided["status"] == "executed" and decided["decided_by"] == "user:supervisor2"
    assert decided["result"]["status"] == "posted"
    key = await (await gw.client.get(f"/v1/keys/{decided['result']['kid']}", headers=gw.auth(Role.BACKEND))).json()
    claims = verify_with_pycose(decided["result"]["envelope"], key["public_key_pem"])
    assert claims["amount"] == 6_000_000
    assert (await wallet(gw, payer))["balance_fen"] == 14_000_000
    assert (await gw.client.post(url, json=good, headers=checker)).status == 409  # not pending any more
    assert await ledger_problems(gw) == []


async def test_rejected_approval_posts_nothing(ledger_gateway: Gateway) -> None:
    gw = ledger_gateway
    payer, payee = await open_wallet(gw, tier=1), await open_wallet(gw, tier=1)
    await cash_in(gw, payer, 10_000_000)
    pending = await (await transfer(gw, payer, payee, 5_000_001)).json()
    approval = await (
        await gw.client.get(f"/v1/approvals/{pending['approval_id']}", headers=gw.auth(Role.SUPERVISOR))
    ).json()
    response = await gw.client.post(
        f"/v1/approvals/{pending['approval_id']}/reject",
        json={"payload_hash": approval["payload_hash"], "note": "no"},
        headers=gw.auth(Role.SUPERVISOR),
    )
    assert response.status == 200 and (await response.json())["status"] == "rejected"
    assert (await wallet(gw, payer))["balance_fen"] == 10_000_000


async def test_fifty_concurrent_transfers_never_overdraw(ledger_gateway: Gateway) -> None:
    gw = ledger_gateway
    payer, payee = await open_wallet(gw, tier=2), await open_wallet(gw, tier=2)
    await cash_in(gw, payer, 10 * 7_000)
    responses = await asyncio.gather(*(transfer(gw, payer, payee, 7_000) for _ in range(50)))
    statuses = sorted(r.status for r in responses)
    assert statuses.count(201) == 10 and statuses.count(422) == 40, statuses
    assert (await wallet(gw, payer))["balance_fen"] == 0
    assert (await wallet(gw, payee))["balance_fen"] == 70_000
    assert await ledger_problems(gw) == []


async def test_fifty_concurrent_transfers_never_pass_the_daily_limit(ledger_gateway: Gateway) -> None:
    gw = ledger_gateway
    payer = await open_wallet(gw, tier=4)
    payees = [await open_wallet(gw, tier=1) for _ in range(5)]
    await cash_in(gw, payer, 1_000_000)
    responses = await asyncio.gather(*(transfer(gw, payer, payees[i % 5], 100_000) for i in range(50)))
    statuses = [r.status for r in responses]
    assert statuses.count(201) == 5, statuses  # daily limit ¥5,000 = 5 × ¥1,000
    assert (await wallet(gw, payer))["balance_fen"] == 500_000
    assert await ledger_problems(gw) == []


async def test_transactions_history_pages(ledger_gateway: Gateway) -> None:
    gw = ledger_gateway
    payer, payee = await open_wallet(gw, tier=1), await open_wallet(gw, tier=1)
    await cash_in(gw, payer, 100_000)
    for _ in range(55):
        assert (await transfer(gw, payer, payee, 10)).status == 201
    first = await (await gw.client.get(f"/v1/wallets/{payer}/transactions", headers=gw.auth(Role.TELLER))).json()
    assert len(first["transactions"]) == 50 and first["next_cursor"]
    second = await (
        await gw.client.get(
            f"/v1/wallets/{payer}/transactions?cursor={first['next_cursor']}", headers=gw.auth(Role.TELLER)
        )
    ).json()
    assert len(second["transactions"]) == 6 and second["next_cursor"] is None
    kinds = [t["kind"] for t in first["transactions"] + second["transactions"]]
    assert kinds.count("transfer") == 55 and kinds.count("cash_in") == 1
    assert sum(t["amount_fen"] for t in first["transactions"] + second["transactions"]) == 100_000 - 550


async def test_search_and_cash_out(ledger_gateway: Gateway) -> None:
    gw = ledger_gateway
    wallet_id = await open_wallet(gw, holder_name="Han Meimei", phone="13912345678", id_number="110101199003071234")
    found = await (await gw.client.get("/v1/wallets?q=Meimei", headers=gw.auth(Role.TELLER))).json()
    assert [w["wallet_id"] for w in found["wallets"]] == [wallet_id]
    assert found["wallets"][0]["id_number"] == "1101**********1234"
    for typed in ("meimei", "HAN MEI", "han meimei"):  # as a teller types it, the same on both stores
        found = await (await gw.client.get("/v1/wallets", params={"q": typed}, headers=gw.auth(Role.TELLER))).json()
        assert [w["wallet_id"] for w in found["wallets"]] == [wallet_id], typed
    await cash_in(gw, wallet_id, 500)
    response = await gw.client.post(
        f"/v1/wallets/{wallet_id}/cash-out", json={"amount_fen": 501}, headers={**gw.auth(Role.TELLER), **idem()}
    )
    assert response.status == 422
    response = await gw.client.post(
        f"/v1/wallets/{wallet_id}/cash-out", json={"amount_fen": 500}, headers={**gw.auth(Role.TELLER), **idem()}
    )
    assert response.status == 200 and (await response.json())["balance_fen"] == 0
    response = await gw.client.post(
        f"/v1/wallets/{wallet_id}/status",
        json={"status": "closed", "reason": "moved"},
        headers=gw.auth(Role.SUPERVISOR),
    )
    assert response.status == 200 and (await response.json())["status"] == "closed"


async def test_expired_approval_cannot_be_approved(ledger_gateway: Gateway) -> None:
    gw = ledger_gateway
    payer, payee = await open_wallet(gw, tier=1), await open_wallet(gw, tier=1)
    await cash_in(gw, payer, 10_000_000)
    pending = await (await transfer(gw, payer, payee, 6_000_000)).json()
    database = gw.client.server.app[RUNTIME].database
    await database.write(
        lambda tx: tx.execute(
            "UPDATE approvals SET expires_at = ? WHERE approval_id = ?",
            ("2000-01-01T00:00:00.000000Z", pending["approval_id"]),
        )
    )
    approval = await (
        await gw.client.get(f"/v1/approvals/{pending['approval_id']}", headers=gw.auth(Role.SUPERVISOR))
    ).json()
    assert approval["status"] == "expired"
    response = await gw.client.post(
        f"/v1/approvals/{pending['approval_id']}/approve",
        json={"payload_hash": approval["payload_hash"]},
        headers=gw.auth(Role.SUPERVISOR),
    )
    assert response.status == 409 and (await response.json())["type"].endswith("/approval-expired")
    shown = await (await gw.client.get(f"/v1/transfers/{pending['transfer_id']}", headers=gw.auth(Role.TELLER))).json()
    assert shown["status"] == "expired"
    assert (await wallet(gw, payer))["balance_fen"] == 10_000_000


async def test_approval_fails_when_policy_no_longer_allows(ledger_gateway: Gateway) -> None:
    gw = ledger_gateway
    payer, payee = await open_wallet(gw, tier=1), await open_wallet(gw, tier=1)
    await cash_in(gw, payer, 6_000_000)
    pending = await (await transfer(gw, payer, payee, 6_000_000)).json()
    response = await gw.client.post(
        f"/v1/wallets/{payer}/cash-out", json={"amount_fen": 1}, headers={**gw.auth(Role.TELLER), **idem()}
    )
    assert response.status == 200
    approval = await (
        await gw.client.get(f"/v1/approvals/{pending['approval_id']}", headers=gw.auth(Role.SUPERVISOR))
    ).json()
    response = await gw.client.post(
        f"/v1/approvals/{pending['approval_id']}/approve",
        json={"payload_hash": approval["payload_hash"]},
        headers=gw.auth(Role.SUPERVISOR),
    )
    assert response.status == 422 and "insufficient-funds" in (await response.json())["reasons"]
    approval = await (
        await gw.client.get(f"/v1/approvals/{pending['approval_id']}", headers=gw.auth(Role.SUPERVISOR))
    ).json()
    assert approval["status"] == "failed"
    assert (await wallet(gw, payee))["balance_fen"] == 0


async def test_a_failure_between_posting_and_signing_is_finished_by_the_retry(
    ledger_gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The posting commits before the HSM signs the envelope. If signing fails then (here the HSM is
    unavailable; a crash looks the same), the retry with the same Idempotency-Key signs that same
    transfer and answers as the first request would have: posted once, one envelope."""
    from gateway.errors import HsmUnavailable
    from gateway.wallets.accounts import Wallets

    gw = ledger_gateway
    payer, payee = await open_wallet(gw), await open_wallet(gw)
    await cash_in(gw, payer, 1_000)
    real_seal = Wallets.seal
    calls = {"n": 0}

    async def failing_once(self: Wallets, transfer_id: str, *args: Any) -> dict[str, Any]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise HsmUnavailable("simulated failure after commit")
        return await real_seal(self, transfer_id, *args)

    monkeypatch.setattr(Wallets, "seal", failing_once)
    headers = {**gw.auth(Role.BACKEND), "Idempotency-Key": uuid.uuid4().hex}
    body = {"from_wallet": payer, "to_wallet": payee, "amount_fen": 250}
    first = await gw.client.post("/v1/transfers", json=body, headers=headers)
    assert first.status == 503
    assert (await wallet(gw, payer))["balance_fen"] == 750  # posted, not yet signed
    retry = await gw.client.post("/v1/transfers", json=body, headers=headers)
    assert retry.status == 201, await retry.text()
    document = await retry.json()
    key = await (await gw.client.get(f"/v1/keys/{document['kid']}", headers=gw.auth(Role.BACKEND))).json()
    assert verify_with_pycose(document["envelope"], key["public_key_pem"])["amount"] == 250
    again = await gw.client.post("/v1/transfers", json=body, headers=headers)
    assert again.status == 201 and await again.json() == document
    assert (await wallet(gw, payer))["balance_fen"] == 750 and (await wallet(gw, payee))["balance_fen"] == 250
