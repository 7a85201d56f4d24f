"""Delivery of risk events: signed CloudEvents webhooks (at least once, retries, dead letters, replay), the
signed daily report for a regulator and the hourly chart.

Real parts: a real gateway (SoftHSM token, SQLite store) whose webhooks point at a real aiohttp receiver in
this process; the receiver checks the HMAC with its own code (hmac/hashlib, not the gateway's) and reads the
CloudEvents with the `cloudevents` SDK; the report is verified with pycose; the crash test kills -9 a real
delivering process. Events are written as the risk worker writes them: `insert_event_in` in a store
transaction.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import cbor2
import pytest
import pytest_asyncio
import structlog
from aiohttp import web
from cloudevents.core.bindings import http as cloudevents_http
from cloudevents.core.formats.json import JSONFormat
from PIL import Image

from gateway import clock
from gateway.auth.roles import Role
from gateway.config import RiskDeliverySettings, RiskSettings, RiskWebhookSettings, Settings
from gateway.errors import ConfigError
from gateway.keys import Usage, allowed_usages
from gateway.ledger.engines import open_database
from gateway.ledger.store import Database
from gateway.monitor.webhooks import SIGNATURE_HEADER, WebhookDelivery, WebhookEndpoint, verify_signature
from gateway.risk.events import RiskEvent, event_in, events_after_in, insert_event_in
from tests.api.support import assert_problem, runtime
from tests.conftest import ROOT, Gateway, Token, make_settings, start_gateway
from tests.device.flows import verify_with_pycose

pytestmark = pytest.mark.softhsm

REGULATOR_SECRET = "regulator-test-secret-" + "5f" * 20  # test only; real ones come from `openssl rand -hex 32`
SIEM_SECRET = "siem-test-secret-" + "a7" * 20
SIEM_ENV = "RISK_TEST_SIEM_SECRET"
_SIGNATURE = re.compile(r"t=([0-9]{1,12}),v1=([0-9a-f]{64})")


# --- a receiver, written as a bank's regulator-side endpoint would be ------------------------------------


def receiver_accepts(secret: bytes, header: str, body: bytes, now: float, tolerance: float = 300) -> bool:
    """The receiver's own check (independent of gateway.monitor.webhooks): HMAC-SHA256 over "<t>." ‖ body,
    compared in constant time, and ``t`` close to the receiver's clock."""
    match = _SIGNATURE.fullmatch(header)
    if match is None or abs(now - int(match.group(1))) > tolerance:
        return False
    expected = hmac.new(secret, match.group(1).encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, match.group(2))


class Receiver:
    """Records every request; answers 401 to a bad signature, the planned statuses of an event id first,
    then 200. ``processed`` holds each event once, however often it arrives (dedupe by CloudEvents id)."""

    def __init__(self, secrets: dict[str, bytes]) -> None:
        self.secrets = secrets
        self.requests: list[dict[str, Any]] = []
        self.plans: dict[tuple[str, str], list[int]] = {}  # (endpoint, event id) → statuses to answer first
        self.processed: dict[tuple[str, str], dict[str, Any]] = {}
        self.on_request: Callable[[str, dict[str, Any]], Any] | None = None
        self.delay = 0.0
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _handle(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = await request.read()
        header = request.headers.get(SIGNATURE_HEADER, "")
        signed = receiver_accepts(self.secrets[name], header, body, time.time())
        document = json.loads(body)
        record = {"endpoint": name, "body": body, "headers": dict(request.headers), "signed": signed,
                  "id": document.get("id"), "at": time.monotonic()}
        self.requests.append(record)
        if self.on_request is not None:
            await self.on_request(name, record)
        if self.delay:
            await asyncio.sleep(self.delay)
        if not signed:
            return web.Response(status=401)
        plan = self.plans.get((name, document["id"]))
        if plan:
            return web.Response(status=plan.pop(0))
        self.processed.setdefault((name, document["id"]), document)
        return web.Response(status=204)

    def received(self, name: str, event_id: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["endpoint"] == name and r["id"] == event_id]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks/{name}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def eventually(condition: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def webhook(name: str, url: str, **fields: Any) -> RiskWebhookSettings:
    values: dict[str, Any] = {"name": name, "url": url, "timeout_seconds": 2.0, "max_attempts": 4,
                              "backoff_seconds": 0.05, "backoff_max_seconds": 0.2}
    return RiskWebhookSettings.model_validate(values | fields)


def secret_file(directory: Path, name: str, secret: str) -> Path:
    path = directory / f"{name}.secret"
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return path


@pytest_asyncio.fixture(scope="module")
async def receiver() -> AsyncIterator[Receiver]:
    started = Receiver({"regulator": REGULATOR_SECRET.encode(), "siem": SIEM_SECRET.encode(),
                        "crashy": REGULATOR_SECRET.encode(), "racy": REGULATOR_SECRET.encode()})
    await started.start()
    yield started
    await started.close()


@pytest_asyncio.fixture(scope="module")
async def risk_gw(softhsm_token: Token, tmp_path_factory: pytest.TempPathFactory,
                  receiver: Receiver) -> AsyncIterator[Gateway]:
    """A gateway with two webhooks (one secret in a 0600 file, one in an environment variable) pointing at
    the receiver, a fast delivery loop, and a key of usage `report`."""
    tmp = tmp_path_factory.mktemp("risk-delivery")
    os.environ[SIEM_ENV] = SIEM_SECRET
    settings = make_settings(softhsm_token, f"sqlite:///{tmp / 'gateway.db'}")
    settings.risk_delivery = RiskDeliverySettings(poll_seconds=0.05, claim_seconds=3.0, source="urn:bank:test-gw")
    # Only the events these tests write: the rules' own findings (refusals of the tests' 403 cases) would
    # reach the receiver and the delivery list in between a test's reads.
    settings.risk = RiskSettings(monitor=False)
    settings.risk_webhooks = [
        webhook("regulator", f"{receiver.url}/hooks/regulator",
                secret_file=secret_file(tmp, "regulator", REGULATOR_SECRET)),
        webhook("siem", f"{receiver.url}/hooks/siem", secret_env=SIEM_ENV, max_attempts=10),
    ]
    started = await start_gateway(settings)
    response = await started.client.post("/v1/keys", json={
        "label": "risk-reports", "algorithm": "ecdsa-p256", "usage": ["report"]}, headers=started.auth(Role.ADMIN))
    assert response.status == 201, await response.text()
    yield started
    await started.client.close()
    os.environ.pop(SIEM_ENV, None)


async def add_event(gw: Gateway | Database, rule: str = "structuring", severity: str = "high", *,
                    ts: str | None = None, subject: str = "8123456789012344", **evidence: Any) -> RiskEvent:
    """An event written as the risk worker writes one: insert_event_in in a store transaction."""
    event = RiskEvent(rule, 1, severity, 80, subject,  # type: ignore[arg-type]
                      evidence or {"transfer_ids": ["t_1", "t_2"], "amount_fen": 4_999_900, "window": "PT10M"},
                      **({"ts": ts} if ts else {}))
    database = runtime(gw).database if isinstance(gw, Gateway) else gw
    await database.write(lambda tx: insert_event_in(tx, event))
    return event


async def delivery_row(gw: Gateway, event_id: str, endpoint: str) -> dict[str, Any] | None:
    row = await runtime(gw).database.read(lambda tx: tx.fetchone(
        "SELECT * FROM risk_deliveries WHERE event_id = ? AND endpoint = ?", (event_id, endpoint)))
    return None if row is None else dict(row)


async def status_is(gw: Gateway, event_id: str, endpoint: str, status: str) -> bool:
    row = await delivery_row(gw, event_id, endpoint)
    return row is not None and row["status"] == status


# --- webhooks ------------------------------------------------------------------------------------------


async def test_webhook_is_a_signed_cloudevent_each_receiver_gets_once(risk_gw: Gateway, receiver: Receiver) -> None:
    """Positive control: an event written to the store reaches each configured receiver as a CloudEvents 1.0
    structured-mode JSON whose HMAC the receiver checks with its own code; the `cloudevents` SDK reads it."""
    event = await add_event(risk_gw, "structuring", "high")
    for name in ("regulator", "siem"):
        await eventually(lambda n=name: status_is(risk_gw, event.event_id, n, "delivered"),
                         what=f"delivery to {name}")
    for name, secret in (("regulator", REGULATOR_SECRET), ("siem", SIEM_SECRET)):
        (request,) = receiver.received(name, event.event_id)
        assert request["signed"] is True
        assert request["headers"]["Content-Type"].startswith("application/cloudevents+json")
        assert verify_signature(secret.encode(), request["headers"][SIGNATURE_HEADER], request["body"], time.time())
        parsed = cloudevents_http.from_http(
            cloudevents_http.HTTPMessage(headers={"content-type": request["headers"]["Content-Type"]},
                                         body=request["body"]), JSONFormat())
        attributes = parsed.get_attributes()
        assert attributes["specversion"] == "1.0" and attributes["id"] == event.event_id
        assert attributes["source"] == "urn:bank:test-gw"
        assert attributes["type"] == "cn.ecny.gateway.risk.structuring"
        assert attributes["subject"] == event.subject and attributes["severity"] == "high"
        assert attributes["time"] == datetime.fromisoformat(event.ts)
        assert attributes["datacontenttype"] == "application/json"
        stored = await runtime(risk_gw).database.read(lambda tx: event_in(tx, event.event_id))
        assert stored is not None
        assert parsed.get_data() == {k: stored[k] for k in ("seq", "event_id", "ts", "rule", "rule_version",
                                                             "severity", "score", "subject", "evidence")}
    row = await delivery_row(risk_gw, event.event_id, "regulator")
    assert row is not None and row["attempts"] == 1 and row["last_error"] == "" and row["delivered_at"]


async def test_forged_altered_or_replayed_webhook_is_refused_by_the_receiver(risk_gw: Gateway,
                                                                             receiver: Receiver) -> None:
    """Forged or altered risk webhook: a body changed in transit (severity lowered), one signed with another
    key, or a captured request replayed later fails the receiver's HMAC and timestamp checks."""
    event = await add_event(risk_gw, "fan-out", "critical")
    await eventually(lambda: status_is(risk_gw, event.event_id, "regulator", "delivered"), what="delivery")
    (request,) = receiver.received("regulator", event.event_id)
    body, header = request["body"], request["headers"][SIGNATURE_HEADER]
    secret, now = REGULATOR_SECRET.encode(), time.time()
    assert receiver_accepts(secret, header, body, now)
    lowered = body.replace(b'"severity":"critical"', b'"severity":"info"')
    assert lowered != body
    timestamp = _SIGNATURE.fullmatch(header).group(1)  # type: ignore[union-attr]
    forged = f"t={timestamp},v1=" + hmac.new(b"guessed-secret", timestamp.encode() + b"." + lowered,
                                              hashlib.sha256).hexdigest()
    for candidate_header, candidate_body, at in ((header, lowered, now), (forged, lowered, now),
                                                 (header, body, now + 3600), ("", body, now)):
        assert not receiver_accepts(secret, candidate_header, candidate_body, at)
        assert not verify_signature(secret, candidate_header, candidate_body, at)  # the documented check agrees
    # Sent to the receiver, the altered body is refused and never processed.
    async with aiohttp.ClientSession() as session, session.post(
            f"{receiver.url}/hooks/regulator", data=lowered,
            headers={"Content-Type": "application/cloudevents+json", SIGNATURE_HEADER: header}) as answer:
        assert answer.status == 401
    assert receiver.processed[("regulator", event.event_id)]["data"]["severity"] == "critical"


async def test_receiver_failing_then_recovering_gets_the_same_event_id_again(risk_gw: Gateway,
                                                                            receiver: Receiver) -> None:
    """A receiver that answers 500 twice then 200 receives the event three times with the same id (at
    least once), after growing waits (exponential backoff); it processes it once (dedupe by id)."""
    event = RiskEvent("velocity", 2, "medium", 55, "client:backend", {"count": 40, "window": "PT1M"})
    receiver.plans["regulator", event.event_id] = [500, 500]
    await runtime(risk_gw).database.write(lambda tx: insert_event_in(tx, event))
    await eventually(lambda: status_is(risk_gw, event.event_id, "regulator", "delivered"), what="delivery")
    attempts = receiver.received("regulator", event.event_id)
    assert len(attempts) == 3 and {a["id"] for a in attempts} == {event.event_id}
    assert all(a["signed"] for a in attempts)
    first_wait, second_wait = attempts[1]["at"] - attempts[0]["at"], attempts[2]["at"] - attempts[1]["at"]
    assert first_wait >= 0.05 and second_wait >= 0.1  # backoff_seconds 0.05, doubled
    assert [json.loads(a["body"])["data"] for a in attempts].count(json.loads(attempts[0]["body"])["data"]) == 3
    assert ("regulator", event.event_id) in receiver.processed
    row = await delivery_row(risk_gw, event.event_id, "regulator")
    assert row is not None and row["attempts"] == 3 and row["last_error"] == ""


async def test_dead_letter_after_max_attempts_read_and_replayed_by_an_admin(risk_gw: Gateway,
                                                                           receiver: Receiver) -> None:
    """A receiver down for longer than max_attempts: the delivery is dead, listed for the admin (not for a
    teller), and an audited replay delivers it; replaying what is not dead is refused."""
    event = RiskEvent("dormant-wallet", 1, "high", 70, "8123456789012344", {"amount_fen": 9_000_000})
    receiver.plans["regulator", event.event_id] = [500] * 4  # regulator: max_attempts 4
    await runtime(risk_gw).database.write(lambda tx: insert_event_in(tx, event))
    await eventually(lambda: status_is(risk_gw, event.event_id, "regulator", "dead"), what="dead letter")
    await eventually(lambda: status_is(risk_gw, event.event_id, "siem", "delivered"), what="siem delivery")
    assert len(receiver.received("regulator", event.event_id)) == 4

    admin = risk_gw.auth(Role.ADMIN)
    page = await (await risk_gw.client.get("/v1/risk/deliveries", params={"status": "dead", "limit": "1000"},
                                           headers=admin)).json()
    (dead,) = [d for d in page["deliveries"] if d["event_id"] == event.event_id]
    assert dead == {**dead, "endpoint": "regulator", "status": "dead", "attempts": 4, "last_error": "HTTP 500",
                    "rule": "dormant-wallet", "severity": "high", "configured": True, "delivered_at": None}
    assert all(d["status"] == "dead" for d in page["deliveries"])
    await assert_problem(await risk_gw.client.get("/v1/risk/deliveries", headers=risk_gw.auth(Role.TELLER)),
                         403, "forbidden")
    replay = f"/v1/risk/deliveries/{event.event_id}/regulator/replay"
    await assert_problem(await risk_gw.client.post(replay, headers=risk_gw.auth(Role.SUPERVISOR)), 403, "forbidden")

    response = await risk_gw.client.post(replay, headers=admin)
    assert response.status == 200, await response.text()
    assert (await response.json())["status"] in ("pending", "delivered")
    await eventually(lambda: status_is(risk_gw, event.event_id, "regulator", "delivered"), what="replayed delivery")
    received = receiver.received("regulator", event.event_id)
    assert len(received) == 5 and received[-1]["signed"] and received[-1]["id"] == event.event_id
    assert ("regulator", event.event_id) in receiver.processed

    await assert_problem(await risk_gw.client.post(replay, headers=admin), 409, "risk-delivery-not-dead")
    await assert_problem(await risk_gw.client.post(f"/v1/risk/deliveries/{event.event_id}/nobody/replay",
                                                   headers=admin), 404, "risk-delivery-not-found")
    audited = await runtime(risk_gw).database.read(lambda tx: tx.fetchall(
        "SELECT actor, decision, result FROM audit_log WHERE action = 'risk.delivery.replay'"))
    mine = [row for row in audited if json.loads(row["result"]).get("event_id") == event.event_id]
    assert len(mine) == 1 and mine[0]["actor"] == "client:test-admin" and mine[0]["decision"] == "allowed"
    assert json.loads(mine[0]["result"])["last_error"] == "HTTP 500"
    metrics = await (await risk_gw.client.get("/metrics", headers=admin)).text()
    for outcome in ("delivered", "retry", "dead"):
        assert re.search(rf'ecny_risk_webhook_attempts_total{{endpoint="regulator",outcome="{outcome}"}} [1-9]',
                         metrics), outcome


async def test_replay_to_an_endpoint_no_longer_configured_waits_for_it(risk_gw: Gateway) -> None:
    """A dead letter of a removed endpoint: the replay is accepted but says `configured: false`, and nothing
    is sent anywhere else — the delivery waits, pending, for an endpoint of that name."""
    event = await add_event(risk_gw, "structuring", "medium")
    await runtime(risk_gw).database.write(lambda tx: tx.execute(
        "INSERT INTO risk_deliveries (event_id, endpoint, status, attempts, next_attempt_at, last_error) "
        "VALUES (?, 'retired-hook', 'dead', 4, ?, 'HTTP 500')", (event.event_id, clock.now_iso())))
    response = await risk_gw.client.post(f"/v1/risk/deliveries/{event.event_id}/retired-hook/replay",
                                         headers=risk_gw.auth(Role.ADMIN))
    assert response.status == 200, await response.text()
    document = await response.json()
    assert (document["status"], document["attempts"], document["configured"]) == ("pending", 0, False)
    await asyncio.sleep(0.5)  # ten rounds of the loop
    row = await delivery_row(risk_gw, event.event_id, "retired-hook")
    assert row is not None and (row["status"], row["attempts"]) == ("pending", 0)


async def test_deliveries_list_pages_and_refuses_bad_queries(risk_gw: Gateway) -> None:
    """Malformed dead-letter queries get problem+json, never a 500; the cursor pages without gaps."""
    admin = risk_gw.auth(Role.ADMIN)
    for params in ({"status": "burnt"}, {"after": "-1"}, {"limit": "0"}, {"limit": "1.5"}, {"after": "²"},
                   {"after_endpoint": "x" * 65}):
        await assert_problem(await risk_gw.client.get("/v1/risk/deliveries", params=params, headers=admin), 400)
    for _ in range(3):
        await add_event(risk_gw, "repeated-refusals", "low", subject="client:backend")

    async def every_event_enqueued_for_both() -> bool:
        # The delivery loop enqueues each endpoint's rows on its own turn: a row enqueued between the two
        # reads below would shift the paged list against the full one.
        return await runtime(risk_gw).database.read(lambda tx: tx.fetchone(
            "SELECT 1 FROM risk_events e WHERE (SELECT COUNT(*) FROM risk_deliveries d "
            "WHERE d.event_id = e.event_id) < 2 LIMIT 1")) is None

    await eventually(every_event_enqueued_for_both, what="deliveries enqueued for both endpoints")
    everything = (await (await risk_gw.client.get("/v1/risk/deliveries", params={"limit": "1000"},
                                                  headers=admin)).json())["deliveries"]
    paged: list[dict[str, Any]] = []
    params = {"limit": "2"}
    while True:
        page = await (await risk_gw.client.get("/v1/risk/deliveries", params=params, headers=admin)).json()
        paged += page["deliveries"]
        if page["next_after"] is None:
            break
        params = {"limit": "2", "after": str(page["next_after"]), "after_endpoint": page["next_after_endpoint"]}
    key = [(d["event_id"], d["endpoint"]) for d in everything]
    assert [(d["event_id"], d["endpoint"]) for d in paged][:len(key)] == key
    assert len(set(key)) == len(key)


async def test_webhook_secrets_stay_out_of_logs_store_errors_and_config(risk_gw: Gateway, receiver: Receiver,
                                                                         tmp_path: Path) -> None:
    """Webhook secret leaked through logs, the store, error texts or the config file: failed attempts log
    the endpoint's name only; no row holds the secret; a weak or unreadable secret's error does not quote
    it; the settings take a file or a variable name, never the value."""
    event = RiskEvent("new-evm-recipient", 1, "medium", 50, "0xabc", {"amount": "1000000"})
    receiver.plans["regulator", event.event_id] = [503]
    with structlog.testing.capture_logs() as logs:
        await runtime(risk_gw).database.write(lambda tx: insert_event_in(tx, event))
        await eventually(lambda: status_is(risk_gw, event.event_id, "regulator", "delivered"), what="delivery")
    failures = [entry for entry in logs if entry.get("event") == "risk webhook attempt failed"]
    assert failures and failures[0]["endpoint"] == "regulator" and failures[0]["error"] == "HTTP 503"
    text = repr(logs)
    assert REGULATOR_SECRET not in text and SIEM_SECRET not in text and receiver.url not in text

    def everything(tx: Any) -> str:
        rows = [dict(r) for table in ("risk_deliveries", "audit_log", "risk_events")
                for r in tx.fetchall(f"SELECT * FROM {table}")]
        return repr(rows)

    stored = await runtime(risk_gw).database.read(everything)
    assert REGULATOR_SECRET not in stored and SIEM_SECRET not in stored
    settings_text = repr(risk_gw.settings) + repr(risk_gw.settings.model_dump())
    assert REGULATOR_SECRET not in settings_text and SIEM_SECRET not in settings_text
    endpoint = WebhookEndpoint.from_settings(risk_gw.settings.risk_webhooks[0])
    assert endpoint.secret == REGULATOR_SECRET.encode() and REGULATOR_SECRET not in repr(endpoint)

    weak = "too-short-" + "x" * 10
    for hook, environ in (
        (webhook("weak", "https://hooks.example/", secret_file=secret_file(tmp_path, "weak", weak)), {}),
        (webhook("weak", "https://hooks.example/", secret_env="WEAK_SECRET"), {"WEAK_SECRET": weak}),
        (webhook("unset", "https://hooks.example/", secret_env="UNSET_SECRET"), {}),
    ):
        with pytest.raises(ConfigError) as raised:
            WebhookEndpoint.from_settings(hook, environ)
        assert weak not in str(raised.value) and hook.name in str(raised.value)
    loose = secret_file(tmp_path, "loose", REGULATOR_SECRET)
    loose.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600") as raised:
        WebhookEndpoint.from_settings(webhook("loose", "https://hooks.example/", secret_file=loose))
    assert REGULATOR_SECRET not in str(raised.value)


@pytest.mark.parametrize("fields, problem", [
    ({"url": "http://hooks.example/risk", "secret_env": "S"}, "plain http only to a loopback"),
    ({"url": "https://user:pw@hooks.example/", "secret_env": "S"}, "no credentials in the url"),
    ({"url": "ftp://hooks.example/", "secret_env": "S"}, "http(s) URL"),
    ({"url": "https://hooks.example/"}, "exactly one of secret_file and secret_env"),
    ({"url": "https://hooks.example/", "secret_env": "S", "secret_file": "/x"}, "exactly one"),
    ({"url": "https://hooks.example/", "secret_env": "S", "secret": "inline-value"}, "Extra inputs"),
])
def test_webhook_settings_refuse_plaintext_credentials_and_inline_secrets(fields: dict[str, Any],
                                                                          problem: str) -> None:
    """Risk events or the HMAC key sent in the clear, or a secret written into the config file: plain http
    (except to loopback), credentials in the URL, an inline `secret` or no secret source are config errors."""
    with pytest.raises(ValueError, match=re.escape(problem)):
        Settings.model_validate({"risk_webhooks": [{"name": "hook", **fields}]})


def test_webhook_names_are_unique() -> None:
    """Two endpoints under one name would share (and fight over) one delivery row per event."""
    hook = {"url": "https://hooks.example/", "secret_env": "S"}
    with pytest.raises(ValueError, match="repeated: twin"):
        Settings.model_validate({"risk_webhooks": [{"name": "twin", **hook}, {"name": "twin", **hook}]})


async def test_a_gateway_with_a_missing_webhook_secret_does_not_start(softhsm_token: Token, tmp_path: Path) -> None:
    """Unsigned (or weakly signed) risk webhooks: a webhook whose secret variable is unset stops the start with
    a ConfigError naming the setting — before the HSM is opened — and the store is closed again."""
    from aiohttp.test_utils import TestServer

    from gateway.app import SIGNER_POOL, STORE, WEBHOOK_DELIVERY, make_app

    settings = make_settings(softhsm_token, f"sqlite:///{tmp_path / 'gateway.db'}")
    settings.risk_webhooks = [webhook("regulator", "https://risk.regulator.example/ingest",
                                      secret_env="RISK_TEST_NEVER_SET")]
    app = make_app(settings)
    server = TestServer(app)
    with pytest.raises(ConfigError, match=r"risk_webhooks\.regulator\.secret_env"):
        await server.start_server()
    await server.close()
    assert STORE in app and WEBHOOK_DELIVERY not in app and SIGNER_POOL not in app
    with pytest.raises(RuntimeError, match="after shutdown"):
        await app[STORE].read(lambda tx: tx.fetchone("SELECT 1 AS one"))


CHILD = """
import asyncio, sys
from gateway.config import RiskDeliverySettings, RiskWebhookSettings
from gateway.ledger.engines import open_database
from gateway.monitor.webhooks import WebhookDelivery, WebhookEndpoint

async def main():
    database = await open_database(sys.argv[1])
    hook = RiskWebhookSettings(name="crashy", url=sys.argv[2], secret_env="RISK_TEST_CRASH_SECRET",
                               timeout_seconds=30, max_attempts=5, backoff_seconds=0.05)
    delivery = WebhookDelivery(database, [WebhookEndpoint.from_settings(hook)],
                               RiskDeliverySettings(poll_seconds=0.05, claim_seconds=float(sys.argv[3])))
    print("ready", flush=True)
    while True:
        await delivery.run_once()
        await asyncio.sleep(0.05)

asyncio.run(main())
"""


async def test_crash_between_send_and_record_delivers_again_with_the_same_id(
        store_dsn: str, receiver: Receiver) -> None:
    """Lost risk alert after a crash: the delivering process is killed (-9) after the receiver got the
    event and before the outcome was recorded; another process sends it again, with the same id, once the
    claim expires — at least once; the receiver dedupes and processes it once."""
    database = await open_database(store_dsn)
    await database.migrate()
    event = await add_event(database, "payee-of-frozen-devices", "critical", subject="8987654321098763")
    claim_seconds = 1.5
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RISK_TEST_CRASH_SECRET": REGULATOR_SECRET}
    child = subprocess.Popen([sys.executable, "-c", CHILD, store_dsn, f"{receiver.url}/hooks/crashy",
                              str(claim_seconds)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    killed = asyncio.Event()

    async def kill_before_answering(name: str, record: dict[str, Any]) -> None:
        if name == "crashy" and record["id"] == event.event_id and not killed.is_set():
            os.kill(child.pid, signal.SIGKILL)
            await asyncio.to_thread(child.wait, 10)
            killed.set()

    receiver.on_request = kill_before_answering
    try:
        await asyncio.wait_for(killed.wait(), 60)
        assert child.returncode == -signal.SIGKILL
        row = await database.read(lambda tx: tx.fetchone(
            "SELECT status, attempts FROM risk_deliveries WHERE event_id = ? AND endpoint = 'crashy'",
            (event.event_id,)))
        assert row is not None and (row["status"], row["attempts"]) == ("pending", 1)  # claimed, outcome lost

        hook = webhook("crashy", f"{receiver.url}/hooks/crashy", secret_env="RISK_TEST_CRASH_SECRET")
        endpoint = WebhookEndpoint.from_settings(hook, {"RISK_TEST_CRASH_SECRET": REGULATOR_SECRET})
        restarted = WebhookDelivery(database, [endpoint], RiskDeliverySettings(poll_seconds=0.05,
                                                                               claim_seconds=claim_seconds))
        restarted.start()
        try:
            async def delivered() -> bool:
                found = await database.read(lambda tx: tx.fetchone(
                    "SELECT status FROM risk_deliveries WHERE event_id = ? AND endpoint = 'crashy'",
                    (event.event_id,)))
                return found is not None and found["status"] == "delivered"

            await eventually(delivered, timeout=30, what="delivery after the crash")
        finally:
            await restarted.close()
        received = receiver.received("crashy", event.event_id)
        assert len(received) == 2 and all(r["signed"] for r in received)
        assert received[1]["at"] - received[0]["at"] >= claim_seconds * 0.9  # not before the claim ran out
        assert json.loads(received[0]["body"]) == json.loads(received[1]["body"])  # same id, same data
        assert [key for key in receiver.processed if key == ("crashy", event.event_id)] == [
            ("crashy", event.event_id)]
    finally:
        receiver.on_request = None
        if child.poll() is None:
            child.kill()
            child.wait(10)
        await database.close()


async def test_two_processes_never_send_one_delivery_at_once(store_dsn: str, receiver: Receiver) -> None:
    """Duplicate risk alerts from concurrent senders: two delivery loops (as two HTTP processes or
    instances) on one store claim rows in a transaction, so each event reaches the endpoint exactly once
    when nothing fails."""
    first, second = await open_database(store_dsn), await open_database(store_dsn)
    await first.migrate()
    events = [await add_event(first, "velocity", "low", subject=f"device:{i}") for i in range(24)]
    hook = webhook("racy", f"{receiver.url}/hooks/racy", secret_env="RACY")
    settings = RiskDeliverySettings(poll_seconds=0.01, claim_seconds=60, batch=5)
    loops = [WebhookDelivery(database, [WebhookEndpoint.from_settings(hook, {"RACY": REGULATOR_SECRET})], settings)
             for database in (first, second)]
    receiver.delay = 0.02
    try:
        for loop in loops:
            loop.start()

        async def all_delivered() -> bool:
            row = await first.read(lambda tx: tx.fetchone(
                "SELECT COUNT(*) AS n FROM risk_deliveries WHERE endpoint = 'racy' AND status = 'delivered'"))
            return row is not None and int(row["n"]) == len(events)

        await eventually(all_delivered, timeout=30, what="every event delivered")
    finally:
        receiver.delay = 0.0
        for loop in loops:
            await loop.close()
        await first.close()
        await second.close()
    wanted = {e.event_id for e in events}  # (the receiver also saw the other store's run)
    ids = [r["id"] for r in receiver.requests if r["endpoint"] == "racy" and r["id"] in wanted]
    assert sorted(ids) == sorted(wanted)  # each exactly once


async def test_a_late_outcome_of_an_expired_claim_changes_nothing(store_dsn: str) -> None:
    """A slow sender's stale verdict: a process whose claim ran out (another process claimed the delivery
    since) records nothing — neither "delivered" for an attempt it does not own nor a retry over a delivery
    the other made; the attempt number fences every outcome."""
    from gateway.monitor.webhooks import claim_in, enqueue_in, record_outcome_in

    database = await open_database(store_dsn)
    try:
        await database.migrate()
        event = await add_event(database, "velocity", "low")
        endpoint = WebhookEndpoint("fenced", "https://h.example/", 1.0, 5, 0.05, 0.1, b"k" * 32)
        now = clock.now()
        past, later = clock.iso(now - timedelta(seconds=1)), clock.iso(now + timedelta(seconds=60))
        await database.write(lambda tx: enqueue_in(tx, "fenced", 0, past))
        (slow,) = await database.write(lambda tx: claim_in(tx, "fenced", clock.iso(now), past, 10))  # expired at once
        (fast,) = await database.write(lambda tx: claim_in(tx, "fenced", clock.iso(now), later, 10))
        assert (slow.attempt, fast.attempt) == (1, 2) and slow.event_id == fast.event_id == event.event_id
        assert await database.write(lambda tx: record_outcome_in(tx, slow, endpoint, None, now)) is None
        assert await database.write(lambda tx: record_outcome_in(tx, fast, endpoint, None, now)) == "delivered"
        assert await database.write(lambda tx: record_outcome_in(tx, slow, endpoint, "HTTP 500", now)) is None
        row = await database.read(lambda tx: tx.fetchone(
            "SELECT status, attempts, last_error FROM risk_deliveries WHERE endpoint = 'fenced'"))
        assert row is not None and (row["status"], row["attempts"], row["last_error"]) == ("delivered", 2, "")
        # Nothing is due any more: a delivered row is never claimed again.
        assert await database.write(lambda tx: claim_in(tx, "fenced", later, later, 10)) == []
    finally:
        await database.close()


# --- the signed daily report -------------------------------------------------------------------------


def _at(day: date, hour: int, minute: int = 0) -> str:
    return clock.iso(datetime(day.year, day.month, day.day, hour, minute, tzinfo=UTC))


async def _report_key(gw: Gateway) -> dict[str, Any]:
    keys = await (await gw.client.get("/v1/keys", headers=gw.auth(Role.AUDITOR))).json()
    (key,) = [k for k in (keys["keys"] if isinstance(keys, dict) else keys) if "report" in k["usage"]]
    return dict(key)


async def test_daily_report_verifies_offline_and_matches_the_events(risk_gw: Gateway) -> None:
    """Positive control: the report of a past UTC day is a COSE_Sign1 by the `report` key that pycose
    verifies with the key's public key, listing exactly that day's events (the first microsecond of the day
    in, the first of the next day out) with their counts per rule and severity."""
    today = clock.now().date()
    day = today - timedelta(days=2)
    inside = [await add_event(risk_gw, "structuring", "high", ts=_at(day, 0)),
              await add_event(risk_gw, "structuring", "high", ts=_at(day, 9, 30)),
              await add_event(risk_gw, "fan-in", "critical", ts=_at(day, 23, 59)),
              await add_event(risk_gw, "velocity", "low", ts=_at(day, 14))]
    await add_event(risk_gw, "structuring", "high", ts=_at(day + timedelta(days=1), 0))
    await add_event(risk_gw, "structuring", "high", ts=_at(day - timedelta(days=1), 23, 59))

    for role in (Role.AUDITOR, Role.SUPERVISOR):
        response = await risk_gw.client.get(f"/v1/risk/reports/{day.isoformat()}", headers=risk_gw.auth(role))
        assert response.status == 200, await response.text()
        assert response.content_type == "application/cose"
        assert day.isoformat() in response.headers["Content-Disposition"]
        envelope = await response.read()
    key = await _report_key(risk_gw)
    tagged = cbor2.loads(envelope)
    assert cbor2.loads(tagged.value[0])[4] == key["key_id"].encode()  # kid: the report key
    claims = verify_with_pycose(envelope, key["public_key_pem"])
    assert claims["type"] == "ecny-gateway/risk-daily-report" and claims["version"] == 1
    assert claims["date"] == day.isoformat() and claims["complete"] is True and claims["source"] == "urn:bank:test-gw"
    assert [e["event_id"] for e in claims["events"]] == [e.event_id for e in inside]

    # The same events the events feed lists (gateway.risk.events.events_after_in backs GET /v1/risk/events).
    listed = await runtime(risk_gw).database.read(lambda tx: events_after_in(tx, 0, limit=10_000))
    start, end = _at(day, 0), _at(day + timedelta(days=1), 0)
    of_day = [e for e in listed if start <= e["ts"] < end]
    assert claims["events"] == [{k: e[k] for k in ("seq", "event_id", "ts", "rule", "rule_version", "severity",
                                                   "score", "subject", "evidence")} for e in of_day]
    assert claims["counts"] == {
        "total": 4,
        "by_severity": {"info": 0, "low": 1, "medium": 0, "high": 2, "critical": 1},
        "by_rule": {"structuring": {"high": 2}, "fan-in": {"critical": 1}, "velocity": {"low": 1}},
    }
    audited = await runtime(risk_gw).database.read(lambda tx: tx.fetchall(
        "SELECT key_id, result FROM audit_log WHERE action = 'risk.report'"))
    assert any(row["key_id"] == key["key_id"] and json.loads(row["result"]) == {"date": day.isoformat(), "events": 4}
               for row in audited)

    # Today's report is marked incomplete (the day is not over).
    response = await risk_gw.client.get(f"/v1/risk/reports/{today.isoformat()}", headers=risk_gw.auth(Role.AUDITOR))
    assert verify_with_pycose(await response.read(), key["public_key_pem"])["complete"] is False


async def test_altered_report_fails_verification(risk_gw: Gateway) -> None:
    """Altered regulator report: an event dropped from the signed payload no longer verifies."""
    day = clock.now().date() - timedelta(days=3)
    await add_event(risk_gw, "structuring", "high", ts=_at(day, 8))
    await add_event(risk_gw, "fan-out", "medium", ts=_at(day, 9))
    envelope = await (await risk_gw.client.get(f"/v1/risk/reports/{day.isoformat()}",
                                               headers=risk_gw.auth(Role.AUDITOR))).read()
    key = await _report_key(risk_gw)
    tagged = cbor2.loads(envelope)
    claims = cbor2.loads(tagged.value[2])
    claims["events"] = claims["events"][1:]
    items = list(tagged.value)
    items[2] = cbor2.dumps(claims, canonical=True)
    altered = cbor2.dumps(cbor2.CBORTag(18, items))
    with pytest.raises(AssertionError):
        verify_with_pycose(altered, key["public_key_pem"])


@pytest.mark.parametrize("role", [Role.TELLER, Role.BACKEND, Role.ADMIN])
async def test_report_and_chart_are_refused_to_tellers_backends_and_admins(risk_gw: Gateway, role: Role) -> None:
    """Institution-wide risk picture leaked to a teller, a backend client or the system administrator: the
    report and the chart are for supervisors and auditors only (403, audited)."""
    yesterday = (clock.now().date() - timedelta(days=1)).isoformat()
    for path in (f"/v1/risk/reports/{yesterday}", "/v1/risk/chart.png"):
        response = await risk_gw.client.get(path, headers=risk_gw.auth(role))
        request_id = (await assert_problem(response, 403, "forbidden"))["request_id"]
        refusals = await runtime(risk_gw).database.read(lambda tx, rid=request_id: tx.fetchall(
            "SELECT action FROM audit_log WHERE request_id = ?", (rid,)))
        assert [r["action"] for r in refusals] in (["risk.report"], ["risk.chart"])


@pytest.mark.parametrize("text", ["2026-13-01", "2026-02-30", "20261201", "2026-1-01", "yesterday", "２０２６-01-01",
                                  "2026-01-01T00:00:00Z", "0000-01-01"])
async def test_malformed_report_date_is_a_problem(risk_gw: Gateway, text: str) -> None:
    """Malformed report date: 400 invalid-report-date, never a 500 or an empty signed report."""
    response = await risk_gw.client.get(f"/v1/risk/reports/{text}", headers=risk_gw.auth(Role.AUDITOR))
    await assert_problem(response, 400, "invalid-report-date")


async def test_future_report_date_is_refused(risk_gw: Gateway) -> None:
    """A signed report of a day that has not happened yet (empty, but signed as if final): refused."""
    tomorrow = (clock.now().date() + timedelta(days=1)).isoformat()
    for path in (f"/v1/risk/reports/{tomorrow}", f"/v1/risk/chart.png?date={tomorrow}",
                 "/v1/risk/reports/9999-12-31"):
        response = await risk_gw.client.get(path, headers=risk_gw.auth(Role.AUDITOR))
        problem = await assert_problem(response, 400, "invalid-report-date")
        assert "future" in problem["detail"]


async def test_report_is_never_signed_with_another_usage_key(risk_gw: Gateway) -> None:
    """A report signed by the audit-checkpoint key (a signature that could pass for a checkpoint): a
    `report_key_id` naming a key without usage `report` is refused, 403 key-usage-not-allowed."""
    response = await risk_gw.client.post("/v1/keys", json={
        "label": "risk-not-a-report-key", "algorithm": "ecdsa-p256", "usage": ["audit"]},
        headers=risk_gw.auth(Role.ADMIN))
    assert response.status == 201, await response.text()
    settings = runtime(risk_gw).settings.risk_delivery
    settings.report_key_id = (await response.json())["key_id"]
    try:
        response = await risk_gw.client.get(f"/v1/risk/reports/{clock.now().date().isoformat()}",
                                            headers=risk_gw.auth(Role.AUDITOR))
        await assert_problem(response, 403, "key-usage-not-allowed")
    finally:
        settings.report_key_id = None


def test_a_report_key_has_only_signing_usages() -> None:
    """A `report` key made for EVM (secp256k1) would sign a COSE report no verifier expects: refused."""
    assert Usage.REPORT.value in allowed_usages("ecdsa-p256") and Usage.REPORT.value in allowed_usages("ed25519")
    assert Usage.REPORT.value not in allowed_usages("ecdsa-secp256k1")


# --- the chart -----------------------------------------------------------------------------------------


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    return width, height


async def test_chart_is_a_png_of_the_days_events(risk_gw: Gateway) -> None:
    """Positive control: the chart of a day is a valid PNG (signature, IHDR, Pillow decodes it) with the
    critical colour drawn when that day has a critical event."""
    day = clock.now().date() - timedelta(days=4)
    await add_event(risk_gw, "fan-in", "critical", ts=_at(day, 11))
    await add_event(risk_gw, "structuring", "high", ts=_at(day, 11, 30))
    response = await risk_gw.client.get("/v1/risk/chart.png", params={"date": day.isoformat()},
                                        headers=risk_gw.auth(Role.SUPERVISOR))
    assert response.status == 200, await response.text()
    assert response.content_type == "image/png"
    data = await response.read()
    assert _png_size(data) == (900, 360)
    image = Image.open(io.BytesIO(data))
    image.verify()
    pixels = Image.open(io.BytesIO(data)).convert("RGB")
    colours = {colour for _, colour in pixels.getcolors(maxcolors=1 << 20) or []}
    assert (0xC6, 0x28, 0x28) in colours  # critical
    # Default: today.
    response = await risk_gw.client.get("/v1/risk/chart.png", headers=risk_gw.auth(Role.AUDITOR))
    assert response.status == 200 and _png_size(await response.read()) == (900, 360)


@pytest.mark.parametrize(("query", "code"), [
    *((query, "invalid-report-date") for query in ("date=", "date=2026-02-30", "date=today", "date=2026-1-1",
                                                    "date=" + "9" * 300)),
    ("date=%00", "validation-failed"),  # as a NUL in any request's text (tests/api/test_hostile_input.py)
])
async def test_chart_refuses_bad_dates(risk_gw: Gateway, query: str, code: str) -> None:
    """Malformed chart date: 400 invalid-report-date, never a 500 or a chart of another day."""
    response = await risk_gw.client.get(f"/v1/risk/chart.png?{query}", headers=risk_gw.auth(Role.AUDITOR))
    await assert_problem(response, 400, code)
