"""Risk monitoring through the API, as a bank's staff and its backend would use it: one scenario per rule,
the cursor pages, the live stream, triage and its audit entries, the metric, and bad input.

The rules run with small thresholds (tests/risk_support.py); their defaults are documented in
docs/risk.md. Time-based facts that a test cannot wait for (a wallet idle for 180 days) are arranged by
dating the wallet's earlier signals back in the store, and said so."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from gateway.app import RISK_EVALUATOR
from gateway.auth.roles import Role
from gateway.config import VelocityRule
from gateway.hardwallet.simulator import SimulatedDevice
from gateway.runtime import RUNTIME
from tests.api.support import assert_problem, audit_entries, new_client, runtime
from tests.api.test_evm import EVM_TEST_CHAIN_ID, erc20, sign
from tests.api.test_wallets import cash_in, open_wallet, transfer
from tests.conftest import Gateway, Token, login, new_evm_key
from tests.device.flows import ensure_voucher_key, load, pay, register, sync
from tests.pg import PostgresServer
from tests.risk_support import JUST_UNDER, STRUCTURING_COUNT, all_events, events_where, idem, start_risk_gateway

pytestmark = pytest.mark.softhsm


@pytest_asyncio.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def gw(request: pytest.FixtureRequest, softhsm_token: Token,
             tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    """A gateway with small rule thresholds, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        dsn = f"sqlite:///{tmp_path_factory.mktemp('risk') / 'gateway.db'}"
    else:
        server: PostgresServer = request.getfixturevalue("postgres_server")
        dsn = server.create_database()
    gateway = await start_risk_gateway(softhsm_token, dsn)
    yield gateway
    await gateway.client.close()


async def funded(gw: Gateway, amount: int, tier: int = 2) -> str:
    wallet_id = await open_wallet(gw, tier=tier)
    await cash_in(gw, wallet_id, amount)
    return wallet_id


async def posted(gw: Gateway, source: str, target: str, amount: int) -> str:
    response = await transfer(gw, source, target, amount)
    assert response.status == 201, await response.text()
    transfer_id: str = (await response.json())["transfer_id"]
    return transfer_id


# --- a scenario per rule ----------------------------------------------------------------------------


async def test_six_transfers_just_under_the_threshold_give_one_structuring_event(gw: Gateway) -> None:
    """Structuring: splitting ¥300,000 into six transfers of ¥49,999 to stay under the ¥50,000 approval."""
    assert gw.settings.approvals.transfer_threshold_fen == 5_000_000 and JUST_UNDER < 5_000_000
    payer = await funded(gw, 40_000_000, tier=1)
    payee = await open_wallet(gw, tier=1)
    ids = [await posted(gw, payer, payee, JUST_UNDER) for _ in range(STRUCTURING_COUNT)]
    found = await events_where(gw, lambda e: e["rule"] == "structuring" and e["subject"] == payer)
    assert len(found) == 1, found
    event = found[0]
    assert event["evidence"]["ids"] == ids
    assert event["evidence"]["amounts_fen"] == [JUST_UNDER] * STRUCTURING_COUNT
    assert event["evidence"]["window"]["seconds"] == 600 and event["evidence"]["count"] == STRUCTURING_COUNT
    assert (event["severity"], event["rule_version"], event["status"]) == ("high", 1, "open")
    assert 0 < event["score"] <= 100
    # The positive control: ordinary amounts from another wallet raise no structuring event.
    other = await funded(gw, 5_000_000)
    for _ in range(STRUCTURING_COUNT):
        await posted(gw, other, payee, 100_000)
    assert await events_where(gw, lambda e: e["rule"] == "structuring" and e["subject"] == other) == []


async def test_a_burst_from_one_wallet_gives_a_velocity_event(gw: Gateway) -> None:
    """Velocity: a wallet emptied by a burst of small transfers (a taken-over account)."""
    payer, payee = await funded(gw, 1_000_000), await open_wallet(gw)
    ids = [await posted(gw, payer, payee, 100) for _ in range(8)]
    found = await events_where(gw, lambda e: e["rule"] == "velocity" and e["subject"] == payer)
    assert len(found) == 1, found
    assert found[0]["evidence"]["dimension"] == "wallet" and found[0]["evidence"]["count"] == 8
    assert found[0]["evidence"]["ids"] == ids and found[0]["evidence"]["threshold"] == 8


async def test_a_burst_from_one_api_client_across_wallets_gives_a_client_velocity_event(gw: Gateway) -> None:
    """Velocity per API client: a backend credential used to drain many wallets at once (a stolen key);
    each wallet alone stays under its own limit."""
    name, headers = await new_client(gw, Role.BACKEND, "burst")
    payee = await open_wallet(gw)
    payers = [await funded(gw, 10_000) for _ in range(4)]
    gw.settings.risk.velocity.client_max = 4  # the rules read their thresholds when they evaluate
    try:
        ids = []
        for payer in payers:
            response = await transfer(gw, payer, payee, 100, headers=headers)
            assert response.status == 201, await response.text()
            ids.append((await response.json())["transfer_id"])
        found = await events_where(gw, lambda e: e["rule"] == "velocity" and e["subject"] == f"client:{name}")
    finally:
        gw.settings.risk.velocity.client_max = VelocityRule().client_max
    assert len(found) == 1, found
    assert found[0]["evidence"]["dimension"] == "client" and found[0]["evidence"]["ids"] == ids
    assert found[0]["event_id"] in {e["event_id"] for e in await all_events(gw, headers)}  # the event names it
    # The positive control: no wallet of the four reached the per-wallet limit.
    assert await events_where(gw, lambda e: e["rule"] == "velocity" and e["subject"] in payers) == []


async def test_a_burst_of_loads_onto_one_device_gives_a_device_velocity_event(gw: Gateway) -> None:
    """Velocity per hard wallet: value pushed onto one device in quick succession (cash-out by device)."""
    await ensure_voucher_key(gw)
    device = SimulatedDevice.create()
    await register(gw, device, await funded(gw, 100_000))
    gw.settings.risk.velocity.device_max = 3
    try:
        loads = [await load(gw, device, 1_000) for _ in range(3)]
        subject = device.state.device_id
        found = await events_where(gw, lambda e: e["rule"] == "velocity" and e["subject"] == subject)
    finally:
        gw.settings.risk.velocity.device_max = VelocityRule().device_max
    assert len(found) == 1, found
    assert found[0]["evidence"]["dimension"] == "device" and found[0]["evidence"]["count"] == 3
    assert len(found[0]["evidence"]["ids"]) == len(loads) == 3


async def test_a_burst_from_one_evm_address_gives_an_address_velocity_event(gw: Gateway) -> None:
    """Velocity per EVM address: a hot wallet signing transaction after transaction (a drained treasury)."""
    key = await new_evm_key(gw, f"evm-burst-{secrets.token_hex(3)}")
    gw.settings.risk.velocity.evm_address_max = 3
    try:
        ids = []
        for _ in range(3):
            response = await sign(gw, erc20(key, amount=10**6))
            assert response.status == 200, await response.text()
            ids.append((await response.json())["transaction_id"])
        found = await events_where(gw, lambda e: e["rule"] == "velocity" and e["subject"].endswith(key["address"]))
    finally:
        gw.settings.risk.velocity.evm_address_max = VelocityRule().evm_address_max
    assert len(found) == 1, found
    assert found[0]["subject"] == f"{EVM_TEST_CHAIN_ID}:{key['address']}"
    assert found[0]["evidence"]["dimension"] == "evm_address" and found[0]["evidence"]["ids"] == ids


async def test_fan_out_and_fan_in(gw: Gateway) -> None:
    """Fan-out / fan-in: one wallet spraying money to many new payees; many mule wallets feeding one."""
    payer = await funded(gw, 1_000_000)
    payees = [await open_wallet(gw) for _ in range(4)]
    for payee in payees:
        await posted(gw, payer, payee, 1_000)
    out = await events_where(gw, lambda e: e["rule"] == "fan_out" and e["subject"] == payer)
    assert len(out) == 1 and out[0]["evidence"]["payees"] == sorted(payees), out

    collector = await open_wallet(gw)
    payers = [await funded(gw, 10_000) for _ in range(4)]
    for source in payers:
        await posted(gw, source, collector, 5_000)
    fan_in = await events_where(gw, lambda e: e["rule"] == "fan_in" and e["subject"] == collector)
    assert len(fan_in) == 1 and fan_in[0]["evidence"]["payers"] == sorted(payers), fan_in


async def test_a_large_movement_out_of_a_dormant_wallet(gw: Gateway) -> None:
    """Dormant wallet: a long-idle account suddenly emptied (a sleeper or a stolen identity)."""
    sleeper, payee = await funded(gw, 3_000_000), await open_wallet(gw, tier=2)
    await events_where(gw, lambda e: False)  # its cash-in is evaluated
    # The wallet's history is dated back 200 days: a test cannot wait for the 180 days of [risk.dormant].
    database = gw.client.server.app[RUNTIME].database
    await database.write(lambda tx: tx.execute(
        "UPDATE risk_signals SET ts = '2026-01-01T00:00:00.000000Z' WHERE subject = ? OR counterparty = ?",
        (sleeper, sleeper)))
    transfer_id = await posted(gw, sleeper, payee, 2_000_000)
    found = await events_where(gw, lambda e: e["rule"] == "dormant_wallet" and e["subject"] == sleeper)
    assert len(found) == 1, found
    assert found[0]["evidence"]["id"] == transfer_id and found[0]["evidence"]["idle_days"] >= 180
    # The positive control: the next movement is from a wallet that is no longer dormant.
    await posted(gw, sleeper, payee, 1_000_000)
    assert len(await events_where(gw, lambda e: e["rule"] == "dormant_wallet" and e["subject"] == sleeper)) == 1


async def test_a_new_evm_recipient_above_the_amount(gw: Gateway) -> None:
    """New EVM recipient: stablecoins sent to an address the bank never paid (a swapped payout address)."""
    gw.settings.risk.evm_recipient.min_units = 50  # the monitor's rules read their settings when evaluating
    key = await new_evm_key(gw, f"evm-risk-{secrets.token_hex(3)}")
    recipient = "0x" + secrets.token_hex(20)
    from eth_utils import to_checksum_address

    recipient = to_checksum_address(recipient)
    response = await sign(gw, erc20(key, amount=60 * 10**6, to=recipient))
    assert response.status == 200, await response.text()
    first = (await response.json())["transaction_id"]
    response = await sign(gw, erc20(key, amount=60 * 10**6, to=recipient))
    assert response.status == 200, await response.text()
    small = to_checksum_address("0x" + secrets.token_hex(20))
    response = await sign(gw, erc20(key, amount=10 * 10**6, to=small))  # new, but below 50 tokens
    assert response.status == 200, await response.text()
    found = await events_where(gw, lambda e: e["rule"] == "new_evm_recipient")
    mine = [e for e in found if e["subject"] in (recipient, small)]
    assert len(mine) == 1 and mine[0]["subject"] == recipient, found
    assert mine[0]["evidence"]["id"] == first and mine[0]["evidence"]["amount"] == str(60 * 10**6)
    assert mine[0]["evidence"]["decimals"] == 6 and mine[0]["evidence"]["from"] == key["address"]


async def test_repeated_refusals_for_one_client_and_it_reads_only_its_own_events(gw: Gateway) -> None:
    """Repeated refusals: a client probing the policy (overdrafts) again and again."""
    name, headers = await new_client(gw, Role.BACKEND, "prober")
    payer, payee = await funded(gw, 1_000), await open_wallet(gw)
    for _ in range(5):
        response = await transfer(gw, payer, payee, 1_000_000, headers=headers)
        await assert_problem(response, 422, "insufficient-funds")
    found = await events_where(gw, lambda e: e["rule"] == "repeated_refusals" and e["subject"] == f"client:{name}")
    assert len(found) == 1 and found[0]["evidence"]["count"] == 5, found
    assert {r["code"] for r in found[0]["evidence"]["refusals"]} == {"insufficient-funds"}
    # The client reads its own event — and only events that name it.
    own = await all_events(gw, headers)
    assert [e["event_id"] for e in own] == [found[0]["event_id"]]
    shown = await gw.client.get(f"/v1/risk/events/{found[0]['event_id']}", headers=headers)
    assert shown.status == 200 and (await shown.json())["parties"] == [f"client:{name}"]


async def test_one_payee_receiving_from_several_frozen_devices(gw: Gateway) -> None:
    """Frozen devices' payee: one hard wallet collecting from several double-spending (cloned) ones."""
    await ensure_voucher_key(gw)
    collector = SimulatedDevice.create()
    await register(gw, collector, await funded(gw, 10_000))
    payers = []
    for _ in range(2):
        payer = SimulatedDevice.create()
        await register(gw, payer, await funded(gw, 10_000))
        await load(gw, payer, 5_000)
        pay(payer, collector, 1_000)
        pay(payer, collector, 2_000, misbehave="reuse-counter")  # a double spend: the sync freezes the payer
        await sync(gw, payer)
        payers.append(payer.state.device_id)
    payee = collector.state.device_id
    found = await events_where(gw, lambda e: e["rule"] == "frozen_devices_payee" and e["subject"] == payee)
    assert len(found) == 1, found
    assert found[0]["evidence"]["devices"] == sorted(payers) and found[0]["severity"] == "high"
    frozen = await events_where(gw, lambda e: e["rule"] == "notable" and e["evidence"]["kind"] == "device.frozen"
                                and e["subject"] in payers)
    assert sorted(e["subject"] for e in frozen) == sorted(payers)
    raised = await events_where(gw, lambda e: e["rule"] == "notable" and e["evidence"]["kind"] == "discrepancy.raised"
                                and e["subject"] in payers)
    assert raised and all(e["evidence"]["detail"]["discrepancy_kind"] for e in raised)


async def test_approval_requests_and_device_revocations_reach_the_feed(gw: Gateway) -> None:
    """An approval request is a signal (an event once a bank lists it as notable); a revoked device is a
    notable event by default, naming the supervisor who revoked it."""
    gw.settings.risk.notable["approval.requested"] = "info"
    try:
        wallet_id = await open_wallet(gw, tier=1)
        response = await gw.client.post(f"/v1/wallets/{wallet_id}/cash-in", json={"amount_fen": 6_000_000},
                                        headers={**gw.auth(Role.TELLER), **idem()})
        assert response.status == 202, await response.text()
        approval_id = (await response.json())["approval_id"]
        requested = await events_where(gw, lambda e: e["rule"] == "notable"
                                       and e["evidence"]["kind"] == "approval.requested"
                                       and e["evidence"]["id"] == approval_id)
    finally:
        del gw.settings.risk.notable["approval.requested"]
    assert len(requested) == 1 and requested[0]["severity"] == "info", requested
    assert requested[0]["evidence"]["amount_fen"] == 6_000_000 and requested[0]["subject"] == "user:teller1"

    await ensure_voucher_key(gw)
    device = SimulatedDevice.create()
    await register(gw, device, await funded(gw, 10_000))
    response = await gw.client.post(f"/v1/devices/{device.state.device_id}/revoke", json={"reason": "reported lost"},
                                    headers=gw.auth(Role.SUPERVISOR))
    assert response.status == 200, await response.text()
    revoked = await events_where(gw, lambda e: e["rule"] == "notable" and e["evidence"]["kind"] == "device.revoked"
                                 and e["subject"] == device.state.device_id)
    assert len(revoked) == 1 and revoked[0]["severity"] == "low", revoked
    assert revoked[0]["evidence"]["actor"].startswith("user:")


async def test_an_hsm_outage_and_its_recovery_reach_the_feed(softhsm_token: Token, tmp_path: Path) -> None:
    """An HSM outage (no store decision of its own) is a high notable event, once, and the recovery is a
    signal: the signer workers are killed while the token cannot be found, so that their replacements
    stay down until it is back."""
    gateway = await start_risk_gateway(softhsm_token, f"sqlite:///{tmp_path / 'outage.db'}")
    pool: Any = runtime(gateway).signer
    conf = os.environ["SOFTHSM2_CONF"]
    try:
        os.environ["SOFTHSM2_CONF"] = str(tmp_path / "no-such-softhsm2.conf")  # what respawned workers read
        for pid in pool.worker_pids():
            os.kill(pid, signal.SIGKILL)
        outage = await _eventually(gateway, lambda e: e["rule"] == "notable" and e["evidence"]["kind"] == "hsm.outage")
        assert len(outage) == 1 and outage[0]["severity"] == "high" and outage[0]["subject"] == "hsm", outage
        assert outage[0]["evidence"]["detail"]["workers_up"] == 0
        response = await gateway.client.get("/readyz")
        assert response.status == 503
        os.environ["SOFTHSM2_CONF"] = conf
        for pid in pool.worker_pids():  # the replacements started without the token: replace them again
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not pool.health().ready:
            assert time.monotonic() < deadline, pool.health()
            await asyncio.sleep(0.1)
        restored = ("SELECT 1 FROM risk_signals WHERE kind = 'hsm.restored' "
                    "UNION ALL SELECT 1 FROM risk_outbox WHERE kind = 'hsm.restored'")
        await _eventually(gateway, lambda e: e["rule"] == "notable" and e["evidence"]["kind"] == "hsm.outage",
                          also=lambda tx: tx.fetchone(restored))
        # Still one outage event: a recovery is no second outage.
        assert len(await events_where(gateway, lambda e: e["evidence"].get("kind") == "hsm.outage")) == 1
    finally:
        os.environ["SOFTHSM2_CONF"] = conf
        await gateway.client.close()


async def test_the_evaluator_process_evaluates_reports_and_is_restarted(softhsm_token: Token, tmp_path: Path) -> None:
    """`[risk] evaluator = "process"` (the default): the rules run in a process of their own, the HTTP
    process counts what it stored, a killed evaluator is replaced, and it ends with the gateway."""
    gateway = await start_risk_gateway(softhsm_token, f"sqlite:///{tmp_path / 'apart.db'}", evaluator="process")
    evaluator = gateway.client.server.app[RISK_EVALUATOR]
    try:
        first = await _evaluator_pid(evaluator)
        assert first != os.getpid()
        name, headers = await new_client(gateway, Role.BACKEND, "apart")
        payer, payee = await funded(gateway, 1_000), await open_wallet(gateway)

        async def refusals() -> list[dict[str, Any]]:
            for _ in range(5):
                await assert_problem(await transfer(gateway, payer, payee, 1_000_000, headers=headers), 422,
                                     "insufficient-funds")
            return await _eventually(gateway, lambda e: e["rule"] == "repeated_refusals"
                                     and e["subject"] == f"client:{name}")

        assert len(await refusals()) == 1
        metrics = await (await gateway.client.get("/metrics", headers=gateway.auth(Role.AUDITOR))).text()
        assert 'ecny_risk_events_total{rule="repeated_refusals",severity="medium"} 1.0' in metrics  # counted here
        os.kill(first, signal.SIGKILL)
        second = await _evaluator_pid(evaluator, not_pid=first)
        assert len(await refusals()) == 2  # the replacement evaluates the next five
    finally:
        await gateway.client.close()
    assert evaluator.pid() is None and not _alive(second)


async def _evaluator_pid(evaluator: Any, not_pid: int = 0, seconds: float = 30) -> int:
    deadline = time.monotonic() + seconds
    while (pid := evaluator.pid()) is None or pid == not_pid:
        assert time.monotonic() < deadline, "no evaluator process"
        await asyncio.sleep(0.1)
    return int(pid)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def _eventually(gw: Gateway, predicate: Callable[[dict[str, Any]], bool],
                      also: Callable[[Any], Any] | None = None, seconds: float = 30) -> list[dict[str, Any]]:
    """The events matching ``predicate`` once there are any (and ``also`` finds a row): signals the monitor
    writes itself (an HSM outage) are not yet committed when a request returns."""
    deadline = time.monotonic() + seconds
    while True:
        found = await events_where(gw, predicate)
        if found and (also is None or await runtime(gw).database.read(also) is not None):
            return found
        assert time.monotonic() < deadline, "the monitor wrote no such signal"
        await asyncio.sleep(0.2)


# --- pages, filters, one event ----------------------------------------------------------------------


async def test_cursor_pages_and_filters(gw: Gateway) -> None:
    everything = await all_events(gw)
    assert everything, "earlier scenarios stored events"
    seqs = [e["seq"] for e in everything]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    response = await gw.client.get("/v1/risk/events", params={"after": "0", "limit": "2"},
                                   headers=gw.auth(Role.AUDITOR))
    page = await response.json()
    assert [e["seq"] for e in page["events"]] == seqs[:2] and page["next_after"] == seqs[1]
    high = await all_events(gw, severity="high")
    assert high and all(e["severity"] == "high" for e in high)
    structuring = await all_events(gw, rule="structuring")
    assert structuring and all(e["rule"] == "structuring" for e in structuring)


@pytest.mark.parametrize("query", [
    {"after": "abc"}, {"after": "-1"}, {"after": "²"}, {"after": "9" * 30}, {"limit": "0"}, {"limit": "1001"},
    {"severity": "urgent"}, {"rule": "nope"},
])
async def test_bad_cursors_and_filters_are_problems(gw: Gateway, query: dict[str, str]) -> None:
    """Bad input to the event feed gets a problem document, never a 500."""
    response = await gw.client.get("/v1/risk/events", params=query, headers=gw.auth(Role.AUDITOR))
    await assert_problem(response, 400, "validation-failed")


async def test_bad_stream_resume_and_unknown_event(gw: Gateway) -> None:
    response = await gw.client.get("/v1/risk/stream", headers={**gw.auth(Role.AUDITOR), "Last-Event-ID": "x1"})
    await assert_problem(response, 400, "validation-failed")
    response = await gw.client.get("/v1/risk/stream", params={"severity": "loud"}, headers=gw.auth(Role.AUDITOR))
    await assert_problem(response, 400, "validation-failed")
    response = await gw.client.get("/v1/risk/events/no-such-event", headers=gw.auth(Role.AUDITOR))
    await assert_problem(response, 404, "risk-event-not-found")
    response = await gw.client.post("/v1/risk/events/no-such-event/close", json={},
                                    headers=gw.auth(Role.SUPERVISOR))
    await assert_problem(response, 404, "risk-event-not-found")
    response = await gw.client.post("/v1/risk/events/x/assign", json={"note": "who?"},
                                    headers=gw.auth(Role.SUPERVISOR))
    await assert_problem(response, 400, "validation-failed")


# --- the live stream -------------------------------------------------------------------------------


async def _next_event(stream: aiohttp.StreamReader) -> tuple[int, dict[str, Any]]:
    """Read Server-Sent Events lines up to the next event (comments and retry lines are skipped)."""
    fields: dict[str, str] = {}
    while True:
        line = (await stream.readline()).decode()
        assert line, "the stream ended"
        line = line.rstrip("\n")
        if not line:
            if "data" in fields:
                return int(fields["id"]), json.loads(fields["data"])
            fields = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(": ")
        fields[name] = value


async def rejected_cash_in(gw: Gateway, wallet_id: str, rejecter: str = "supervisor1") -> str:
    """A teller's cash-in above the threshold, rejected by ``rejecter``: a notable ``approval.rejected``."""
    response = await gw.client.post(f"/v1/wallets/{wallet_id}/cash-in", json={"amount_fen": 6_000_000},
                                    headers={**gw.auth(Role.TELLER), **idem()})
    assert response.status == 202, await response.text()
    approval = await response.json()
    response = await gw.client.post(f"/v1/approvals/{approval['approval_id']}/reject",
                                    json={"payload_hash": approval["payload_hash"], "note": "no source of funds"},
                                    headers=await login(gw, rejecter))
    assert response.status == 200, await response.text()
    approval_id: str = approval["approval_id"]
    return approval_id


async def test_a_stream_client_sees_an_event_within_a_second_and_resumes(gw: Gateway) -> None:
    """Live stream: staff watching the feed learn of an event as it is stored (not at the next poll)."""
    wallet_id = await open_wallet(gw, tier=2)
    url = str(gw.client.make_url("/v1/risk/stream"))
    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers=gw.auth(Role.AUDITOR)) as stream:
            assert stream.status == 200 and stream.headers["Content-Type"].startswith("text/event-stream")
            approval_id = await rejected_cash_in(gw, wallet_id)
            seq, event = await asyncio.wait_for(_next_event(stream.content), timeout=1.0)
    assert event["rule"] == "notable" and event["evidence"]["kind"] == "approval.rejected"
    assert event["evidence"]["id"] == approval_id and event["seq"] == seq
    # Reconnecting with Last-Event-ID = the seq before gets the same event again, by the same id.
    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers={**gw.auth(Role.AUDITOR), "Last-Event-ID": str(seq - 1)}) as stream:
            again_seq, again = await asyncio.wait_for(_next_event(stream.content), timeout=5.0)
    assert (again_seq, again["event_id"]) == (seq, event["event_id"])


# --- triage ----------------------------------------------------------------------------------------


async def test_triage_acknowledge_assign_close_each_audited(gw: Gateway) -> None:
    wallet_id = await open_wallet(gw, tier=2)
    approval_id = await rejected_cash_in(gw, wallet_id, rejecter="supervisor2")
    found = await events_where(gw, lambda e: e["rule"] == "notable" and e["evidence"]["id"] == approval_id)
    assert len(found) == 1
    event_id = found[0]["event_id"]
    base = f"/v1/risk/events/{event_id}"
    supervisor, auditor = gw.auth(Role.SUPERVISOR), gw.auth(Role.AUDITOR)
    response = await gw.client.post(base + "/acknowledge", json={"note": "looking"}, headers=supervisor)
    assert response.status == 200, await response.text()
    assert (await response.json())["status"] == "acknowledged"
    response = await gw.client.post(base + "/assign", json={"assignee": "auditor1"}, headers=supervisor)
    assert response.status == 200 and (await response.json())["assignee"] == "auditor1"
    response = await gw.client.post(base + "/close", json={"note": "source of funds shown"}, headers=auditor)
    assert response.status == 200 and (await response.json())["status"] == "closed"
    response = await gw.client.post(base + "/acknowledge", json={}, headers=supervisor)
    await assert_problem(response, 409, "risk-event-closed")
    actions = [(e["action"], e["actor"], e["result"].get("to")) for e in await audit_entries(gw)
               if e["action"].startswith("risk.") and e["result"].get("event_id") == event_id]
    assert actions == [("risk.acknowledge", "user:supervisor1", "acknowledged"),
                       ("risk.assign", "user:supervisor1", "acknowledged"),
                       ("risk.close", "user:auditor1", "closed")]
    shown = await (await gw.client.get(base, headers=auditor)).json()
    assert shown["status"] == "closed" and shown["assignee"] == "auditor1"


async def test_the_metric_counts_events_by_rule_and_severity(gw: Gateway) -> None:
    await events_where(gw, lambda e: False)
    text = await (await gw.client.get("/metrics", headers=gw.auth(Role.AUDITOR))).text()
    assert 'ecny_risk_events_total{rule="structuring",severity="high"} 1.0' in text
    assert 'ecny_risk_events_total{rule="velocity",severity="medium"}' in text


async def test_every_signal_is_evaluated_once_and_no_event_is_stored_twice(gw: Gateway) -> None:
    """The outbox drains: nothing pending, no event id twice, no finding reported twice."""
    events = await events_where(gw, lambda e: True)
    assert len({e["event_id"] for e in events}) == len(events)
    keys = [(e["rule"], e["subject"], e["evidence"]["last_seq"]) for e in events]
    assert len(set(keys)) == len(keys)


async def test_lockouts_and_nonce_changes_are_notable_events(gw: Gateway) -> None:
    """A password-guessing run and an admin rewinding an address's nonces reach the risk feed."""
    username = f"ghost-{secrets.token_hex(3)}"
    for _ in range(gw.settings.auth.login_max_attempts):
        response = await gw.client.post("/v1/sessions", json={"username": username, "password": "wrong-password-1"})
        assert response.status == 401, await response.text()
    address = "0x" + secrets.token_hex(20)
    response = await gw.client.post(f"/v1/evm/nonces/11155111/{address}", json={"next_nonce": 7},
                                    headers=gw.auth(Role.ADMIN))
    assert response.status == 200, await response.text()
    found = await events_where(gw, lambda e: e["rule"] == "notable"
                               and e["subject"].lower() in (f"user:{username}", address))  # the address as EIP-55
    kinds = {e["evidence"]["kind"]: e for e in found}
    assert set(kinds) == {"login.locked", "evm.nonce_set"}, found
    assert kinds["login.locked"]["severity"] == "low"
    assert kinds["evm.nonce_set"]["evidence"]["detail"]["next_nonce"] == 7
    assert kinds["evm.nonce_set"]["evidence"]["actor"] == "client:test-admin"
