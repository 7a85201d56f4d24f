"""Attacks on risk monitoring: an insider splitting amounts across wallets to stay under the approval
thresholds, a person clearing the alarm about themselves (under another identity too), a teller or a
backend client triaging, a client reading the bank's other alarms."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from argon2 import PasswordHasher

from gateway.auth.credentials import add_user
from gateway.auth.roles import Role
from gateway.runtime import RUNTIME
from tests.api.support import assert_problem, new_client
from tests.api.test_risk import rejected_cash_in
from tests.api.test_wallets import cash_in, open_wallet
from tests.conftest import Gateway, Token, login
from tests.risk_support import JUST_UNDER, STRUCTURING_COUNT, all_events, events_where, idem, start_risk_gateway

pytestmark = pytest.mark.softhsm


@pytest_asyncio.fixture(scope="module")
async def gw(softhsm_token: Token, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    gateway = await start_risk_gateway(softhsm_token, f"sqlite:///{tmp_path_factory.mktemp('risk-security') / 'gw.db'}")
    yield gateway
    await gateway.client.close()


async def test_an_insider_splitting_cash_outs_across_wallets_is_caught(gw: Gateway) -> None:
    """An insider structures cash-outs across customers' wallets to stay under every approval threshold."""
    wallets = []
    for _ in range(3):
        wallet_id = await open_wallet(gw, tier=2)
        await cash_in(gw, wallet_id, 10_000_000)  # approved by a second person
        wallets.append(wallet_id)
    entries = []
    for wallet_id in wallets:  # two each: under the single (¥50,000) and the daily (¥100,000) thresholds
        for _ in range(2):
            response = await gw.client.post(f"/v1/wallets/{wallet_id}/cash-out", json={"amount_fen": JUST_UNDER},
                                            headers={**gw.auth(Role.TELLER), **idem()})
            assert response.status == 200, await response.text()  # no approval was needed for any of them
            entries.append((await response.json())["entry_id"])
    assert STRUCTURING_COUNT == len(entries)
    found = await events_where(gw, lambda e: e["rule"] == "structuring")
    assert len(found) == 1, found  # one event about the teller; none per wallet (two each is not structuring)
    event = found[0]
    assert event["subject"] == "user:teller1" and event["evidence"]["by"] == "actor"
    assert event["evidence"]["ids"] == entries and event["evidence"]["wallets"] == sorted(wallets)
    assert event["severity"] == "high"
    # The teller it is about can neither read nor clear it.
    response = await gw.client.post(f"/v1/risk/events/{event['event_id']}/close", json={},
                                    headers=gw.auth(Role.TELLER))
    await assert_problem(response, 403, "forbidden")
    response = await gw.client.get("/v1/risk/events", headers=gw.auth(Role.TELLER))
    await assert_problem(response, 403, "forbidden")


async def test_nobody_triages_an_event_that_names_them(gw: Gateway) -> None:
    """A supervisor clears the alarm raised by their own decision (directly, by assignment, or under an alias)."""
    wallet_id = await open_wallet(gw, tier=2)
    approval_id = await rejected_cash_in(gw, wallet_id, rejecter="supervisor1")
    found = await events_where(gw, lambda e: e["rule"] == "notable" and e["evidence"]["id"] == approval_id)
    assert len(found) == 1
    base = f"/v1/risk/events/{found[0]['event_id']}"
    shown = await (await gw.client.get(base, headers=gw.auth(Role.AUDITOR))).json()
    assert shown["parties"] == ["user:supervisor1", "user:teller1"]  # the decider and the requester

    response = await gw.client.post(base + "/close", json={"note": "nothing to see"}, headers=gw.auth(Role.SUPERVISOR))
    await assert_problem(response, 403, "risk-triage-own-event")
    response = await gw.client.post(base + "/assign", json={"assignee": "supervisor1"}, headers=gw.auth(Role.AUDITOR))
    await assert_problem(response, 403, "risk-triage-own-event")
    # The same person under another user name (owner supervisor1) is the same person.
    database = gw.client.server.app[RUNTIME].database
    await database.write(lambda tx: add_user(tx, PasswordHasher(), "sup-alias", Role.SUPERVISOR,
                                             "alias-password-123", owner="supervisor1"))
    gw.passwords["sup-alias"] = "alias-password-123"
    response = await gw.client.post(base + "/acknowledge", json={}, headers=await login(gw, "sup-alias"))
    await assert_problem(response, 403, "risk-triage-own-event")
    assert (await (await gw.client.get(base, headers=gw.auth(Role.AUDITOR))).json())["status"] == "open"
    # The positive control: another supervisor closes it.
    response = await gw.client.post(base + "/close", json={"note": "reviewed"}, headers=await login(gw, "supervisor2"))
    assert response.status == 200 and (await response.json())["status"] == "closed"


async def test_tellers_and_backend_clients_cannot_triage(gw: Gateway) -> None:
    """A teller or a backend client acknowledges an alarm to silence it."""
    events = await events_where(gw, lambda e: e["status"] != "closed")
    assert events
    base = f"/v1/risk/events/{events[0]['event_id']}"
    for role in (Role.TELLER, Role.BACKEND, Role.ADMIN):
        response = await gw.client.post(base + "/acknowledge", json={}, headers=gw.auth(role))
        await assert_problem(response, 403, "forbidden")


async def test_a_backend_client_reads_only_the_events_that_name_it(gw: Gateway) -> None:
    """A backend client reads the bank's alarms about others (tellers, other clients)."""
    _, headers = await new_client(gw, Role.BACKEND, "reader")
    everything = await events_where(gw, lambda e: True)
    assert everything
    assert await all_events(gw, headers) == []
    for event in everything:
        response = await gw.client.get(f"/v1/risk/events/{event['event_id']}", headers=headers)
        await assert_problem(response, 404, "risk-event-not-found")
    response = await gw.client.get("/v1/risk/events", params={"rule": "structuring"}, headers=headers)
    assert (await response.json())["events"] == []


async def test_a_failed_audit_verification_is_a_critical_event(gw: Gateway) -> None:
    """Someone rewrites an audit entry: the next verification fails, and the failure reaches the risk feed."""
    database = gw.client.server.app[RUNTIME].database
    original = await database.read(lambda tx: tx.fetchone("SELECT result FROM audit_log WHERE seq = 1"))
    assert original is not None
    await database.write(lambda tx: tx.execute("UPDATE audit_log SET result = '{\"forged\":true}' WHERE seq = 1"))
    try:
        report = await (await gw.client.get("/v1/audit/verify", headers=gw.auth(Role.AUDITOR))).json()
        assert report["ok"] is False and report["first_bad_seq"] == 1
        found = await events_where(gw, lambda e: e["rule"] == "notable"
                                   and e["evidence"]["kind"] == "audit.verify_failed")
        assert len(found) == 1 and found[0]["severity"] == "critical", found
        assert found[0]["evidence"]["detail"]["first_bad_seq"] == 1
    finally:  # the rest of the module's gateway keeps a sound chain
        await database.write(lambda tx: tx.execute("UPDATE audit_log SET result = ? WHERE seq = 1",
                                                   (original["result"],)))
