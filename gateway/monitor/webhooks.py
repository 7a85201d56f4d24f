"""Risk events to webhooks: CloudEvents 1.0 JSON (structured mode), HMAC-SHA256 signed, at least once.

Every row of ``risk_events`` — whoever wrote it — gets one ``risk_deliveries`` row per configured
endpoint, ``pending``. Each HTTP process runs a :class:`WebhookDelivery` loop that

1. **enqueues** events that have no delivery row yet for an endpoint (``INSERT … ON CONFLICT DO NOTHING``:
   several processes may race, one row wins);
2. **claims** due rows in a write transaction: ``attempts + 1`` and ``next_attempt_at`` moved to the end
   of a claim (``[risk_delivery] claim_seconds``), by a conditional ``UPDATE`` that only one process can
   win — so one process at a time sends a given event to a given endpoint;
3. **sends** them (POST, no redirects followed) and records the outcome, fenced by the attempt number:
   ``delivered`` on a 2xx; else ``pending`` again after an exponential backoff, or ``dead`` after
   ``max_attempts``. An admin replays a dead one (:func:`replay_in`).

A process that dies between sending and recording leaves its claim to expire: the event is sent again
with the same CloudEvents ``id`` (the event id). Delivery is therefore *at least once*, and receivers
dedupe by ``id``. Order between events is not guaranteed (a batch is sent concurrently, retries overtake).

The signature (:func:`signature_header`) is ``X-Ecny-Signature: t=<unix seconds>,v1=<hex>`` where the hex
is HMAC-SHA256(secret, ``<t>.`` ‖ body) over the exact body bytes; receivers check it
(:func:`verify_signature`), refuse a ``t`` far from their clock (a replayed old request) and then dedupe
by ``id``. Secrets never reach a log, an error text or the store.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

import aiohttp
import orjson
import structlog

from gateway import clock
from gateway.audit.chain import AuditEntry, append
from gateway.config import RiskDeliverySettings, RiskWebhookSettings
from gateway.errors import RiskDeliveryNotDead, RiskDeliveryNotFound
from gateway.ledger.store import Database, Row, Tx
from gateway.risk.events import event_in

SIGNATURE_HEADER = "X-Ecny-Signature"
CONTENT_TYPE = "application/cloudevents+json; charset=utf-8"
TYPE_PREFIX = "cn.ecny.gateway.risk."
#: How far a receiver may let ``t`` be from its own clock (seconds) before it refuses a request as replayed.
SIGNATURE_TOLERANCE_SECONDS = 300
#: Each round re-checks this many events below the highest one enqueued: on PostgreSQL a lower ``seq`` can
#: commit after a higher one (two writers), and must not be skipped.
LOOKBACK_EVENTS = 1000
STATUSES = ("pending", "delivered", "dead")

log = structlog.get_logger("gateway.risk.webhooks")


# --- the message -------------------------------------------------------------------------------------


def finding(event: Mapping[str, Any]) -> dict[str, Any]:
    """What a rule found, as sent: the event without its triage state (status, assignee), which changes
    after the event and would make two deliveries of one id differ."""
    return {name: event[name] for name in
            ("seq", "event_id", "ts", "rule", "rule_version", "severity", "score", "subject", "evidence")}


def cloudevent(event: Mapping[str, Any], source: str) -> dict[str, Any]:
    """A CloudEvents 1.0 event (structured mode) of a risk event document
    (:func:`gateway.risk.events.event_document`)."""
    return {
        "specversion": "1.0",
        "id": event["event_id"],
        "source": source,
        "type": TYPE_PREFIX + str(event["rule"]),
        "subject": event["subject"],
        "time": event["ts"],
        "datacontenttype": "application/json",
        "severity": event["severity"],  # an extension attribute: receivers can route without parsing data
        "data": finding(event),
    }


def body_of(event: Mapping[str, Any], source: str) -> bytes:
    """The exact bytes sent (and signed): canonical JSON, sorted keys, UTF-8. The same for every attempt."""
    return orjson.dumps(cloudevent(event, source), option=orjson.OPT_SORT_KEYS)


def _mac(secret: bytes, timestamp: int, body: bytes) -> str:
    return hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def signature_header(secret: bytes, body: bytes, timestamp: int) -> str:
    """``t=<timestamp>,v1=<hex HMAC-SHA256(secret, "<timestamp>." ‖ body)>``."""
    return f"t={timestamp},v1={_mac(secret, timestamp, body)}"


def verify_signature(secret: bytes, header: str, body: bytes, now: float,
                     tolerance: float = SIGNATURE_TOLERANCE_SECONDS) -> bool:
    """A receiver's check: the header is well formed, ``t`` within ``tolerance`` of ``now`` and one ``v1``
    matches (compared in constant time). Several ``v1`` are accepted, for a secret being rotated."""
    timestamp: int | None = None
    macs: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isascii() and value.isdigit() and len(value) <= 12:
            timestamp = int(value)
        elif name == "v1":
            macs.append(value)
    if timestamp is None or not macs or abs(now - timestamp) > tolerance:
        return False
    expected = _mac(secret, timestamp, body)
    return any(hmac.compare_digest(expected, mac) for mac in macs)


@dataclass(frozen=True)
class WebhookEndpoint:
    """A configured receiver with its secret read (``[[risk_webhooks]]``)."""

    name: str
    url: str
    timeout_seconds: float
    max_attempts: int
    backoff_seconds: float
    backoff_max_seconds: float
    secret: bytes = field(repr=False)

    @classmethod
    def from_settings(cls, settings: RiskWebhookSettings, environ: Mapping[str, str] | None = None) -> WebhookEndpoint:
        """Raises ConfigError when the secret is missing or weak (the message never holds it)."""
        return cls(settings.name, settings.url, settings.timeout_seconds, settings.max_attempts,
                   settings.backoff_seconds, settings.backoff_max_seconds, settings.read_secret(environ))

    def backoff(self, attempts: int) -> float:
        """Seconds to wait after ``attempts`` failed attempts: doubling from ``backoff_seconds``, capped, with
        up to 10 % added at random so that receivers coming back are not hit by every sender at once."""
        delay: float = min(self.backoff_max_seconds, self.backoff_seconds * 2.0 ** min(attempts - 1, 40))
        return delay * (1 + random.random() / 10)  # spreading retries out, not a secret


# --- the rows ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """One delivery this process may send now: its ``attempt`` fences the outcome it records."""

    event_id: str
    endpoint: str
    attempt: int
    event: dict[str, Any]


def _highest_seq(tx: Tx) -> int:
    top = tx.fetchone("SELECT MAX(seq) AS top FROM risk_events")
    return int(top["top"]) if top is not None and top["top"] is not None else 0


def missing_in(tx: Tx, endpoint: str, after_seq: int) -> tuple[bool, int]:
    """Whether an event above ``after_seq`` has no delivery row for ``endpoint``, and the highest event
    ``seq`` (a read: no write lock taken when there is nothing to enqueue)."""
    missing = tx.fetchone(
        "SELECT 1 FROM risk_events e WHERE e.seq > ? AND NOT EXISTS "
        "(SELECT 1 FROM risk_deliveries d WHERE d.event_id = e.event_id AND d.endpoint = ?) LIMIT 1",
        (after_seq, endpoint)) is not None
    return missing, _highest_seq(tx)


def enqueue_in(tx: Tx, endpoint: str, after_seq: int, now: str) -> int:
    """A pending delivery to ``endpoint`` for every event above ``after_seq`` that has none; the highest
    event ``seq`` seen (the next round's cursor)."""
    highest = _highest_seq(tx)
    tx.execute(
        "INSERT INTO risk_deliveries (event_id, endpoint, status, attempts, next_attempt_at, last_error) "
        "SELECT e.event_id, ?, 'pending', 0, ?, '' FROM risk_events e WHERE e.seq > ? AND e.seq <= ? "
        "AND NOT EXISTS (SELECT 1 FROM risk_deliveries d WHERE d.event_id = e.event_id AND d.endpoint = ?) "
        "ON CONFLICT (event_id, endpoint) DO NOTHING",
        (endpoint, now, after_seq, highest, endpoint))
    return highest


def due_in(tx: Tx, endpoint: str, now: str) -> bool:
    return tx.fetchone("SELECT 1 FROM risk_deliveries WHERE endpoint = ? AND status = 'pending' "
                       "AND next_attempt_at <= ? LIMIT 1", (endpoint, now)) is not None


def claim_in(tx: Tx, endpoint: str, now: str, until: str, limit: int) -> list[Claim]:
    """Claim up to ``limit`` due deliveries to ``endpoint``, oldest event first, until ``until``. The
    conditional UPDATE is the claim: of two processes reading the same row, one changes it and the other's
    UPDATE then matches nothing (PostgreSQL re-checks the row after the winner commits; SQLite writes one
    transaction at a time)."""
    rows = tx.fetchall(
        "SELECT d.event_id, d.attempts FROM risk_deliveries d JOIN risk_events e ON e.event_id = d.event_id "
        "WHERE d.endpoint = ? AND d.status = 'pending' AND d.next_attempt_at <= ? ORDER BY e.seq LIMIT ?",
        (endpoint, now, limit))
    claims = []
    for row in rows:
        attempts = int(row["attempts"])
        taken = tx.execute(
            "UPDATE risk_deliveries SET attempts = ?, next_attempt_at = ? WHERE event_id = ? AND endpoint = ? "
            "AND status = 'pending' AND attempts = ? AND next_attempt_at <= ?",
            (attempts + 1, until, row["event_id"], endpoint, attempts, now))
        event = event_in(tx, row["event_id"]) if taken else None
        if event is not None:
            claims.append(Claim(row["event_id"], endpoint, attempts + 1, event))
    return claims


def record_outcome_in(tx: Tx, claim: Claim, webhook: WebhookEndpoint, error: str | None, now: datetime) -> str | None:
    """Record how ``claim``'s attempt ended (``error`` None: a 2xx); the delivery's new status, or None when
    the claim had expired and another process has claimed the delivery since (its outcome will count)."""
    fence = (claim.event_id, claim.endpoint, claim.attempt)
    where = " WHERE event_id = ? AND endpoint = ? AND attempts = ? AND status = 'pending'"
    params: tuple[Any, ...]
    if error is None:
        status, sql, params = "delivered", "UPDATE risk_deliveries SET status = 'delivered', delivered_at = ?, " \
            "last_error = ''" + where, (clock.iso(now), *fence)
    elif claim.attempt >= webhook.max_attempts:
        status, sql, params = "dead", "UPDATE risk_deliveries SET status = 'dead', last_error = ?" + where, \
            (error, *fence)
    else:
        retry_at = clock.iso(now + timedelta(seconds=webhook.backoff(claim.attempt)))
        status, sql, params = "pending", "UPDATE risk_deliveries SET next_attempt_at = ?, last_error = ?" + where, \
            (retry_at, error, *fence)
    return status if tx.execute(sql, params) else None


def delivery_document(row: Row, configured: bool) -> dict[str, Any]:
    return {
        "event_id": row["event_id"], "endpoint": row["endpoint"], "status": row["status"],
        "attempts": int(row["attempts"]), "next_attempt_at": row["next_attempt_at"],
        "last_error": row["last_error"], "delivered_at": row["delivered_at"],
        "event_seq": int(row["seq"]), "rule": row["rule"], "severity": row["severity"], "configured": configured,
    }


_DELIVERY = ("SELECT d.*, e.seq, e.rule, e.severity FROM risk_deliveries d "
             "JOIN risk_events e ON e.event_id = d.event_id")


def deliveries_in(tx: Tx, configured: Sequence[str], status: str | None, after: int, after_endpoint: str,
                  limit: int) -> list[dict[str, Any]]:
    """Deliveries after the cursor (event ``seq``, then endpoint name), oldest event first, optionally of
    one status; ``configured`` says which endpoint names the settings still have."""
    sql = _DELIVERY + " WHERE (e.seq > ? OR (e.seq = ? AND d.endpoint > ?))"
    params: list[Any] = [after, after, after_endpoint]
    if status is not None:
        sql, params = sql + " AND d.status = ?", [*params, status]
    rows = tx.fetchall(sql + " ORDER BY e.seq, d.endpoint LIMIT ?", [*params, limit])
    return [delivery_document(row, row["endpoint"] in configured) for row in rows]


def replay_in(tx: Tx, event_id: str, endpoint: str, configured: Sequence[str], entry: AuditEntry,
              now: str) -> dict[str, Any]:
    """Make a dead delivery pending again, due now, with its attempts counted afresh; audited with
    ``entry`` in the same transaction. A delivery to an endpoint no longer configured waits, pending, until
    an endpoint of that name is configured again (``configured: false`` in the answer says so).

    Raises:
        RiskDeliveryNotFound: no such delivery.
        RiskDeliveryNotDead: it is pending or delivered.
    """
    row = tx.fetchone(_DELIVERY + " WHERE d.event_id = ? AND d.endpoint = ?", (event_id, endpoint))
    if row is None:
        raise RiskDeliveryNotFound(f"no delivery of event {event_id} to endpoint {endpoint}")
    if row["status"] != "dead":
        raise RiskDeliveryNotDead(f"the delivery of event {event_id} to {endpoint} is {row['status']}")
    tx.execute("UPDATE risk_deliveries SET status = 'pending', attempts = 0, next_attempt_at = ? "
               "WHERE event_id = ? AND endpoint = ? AND status = 'dead'", (now, event_id, endpoint))
    entry.result.update({"event_id": event_id, "endpoint": endpoint, "attempts_before": int(row["attempts"]),
                         "last_error": row["last_error"]})
    append(tx, [entry])
    replayed = tx.fetchone(_DELIVERY + " WHERE d.event_id = ? AND d.endpoint = ?", (event_id, endpoint))
    assert replayed is not None
    return delivery_document(replayed, endpoint in configured)


# --- sending -----------------------------------------------------------------------------------------


class Transport(Protocol):
    """Sends one request; the HTTP status, or raises (timeout, refused connection, TLS failure)."""

    async def post(self, url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> int: ...

    async def close(self) -> None: ...


class AiohttpTransport:
    """POSTs with aiohttp. Redirects are not followed (a 3xx is a failed attempt): the signed body goes only
    to the configured URL. The answer's body is not read."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def post(self, url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> int:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        async with self._session.post(url, data=body, headers=dict(headers), allow_redirects=False,
                                      timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            return response.status

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _failure(exc: BaseException) -> str:
    # Never str(exc): aiohttp's messages name the URL, which may carry a token in its path or query.
    return "timeout" if isinstance(exc, TimeoutError) else f"connection failed: {exc.__class__.__name__}"


class WebhookDelivery:
    """The delivery loop of one HTTP process (started by ``gateway.app``). Without endpoints it does nothing."""

    def __init__(self, database: Database, endpoints: Sequence[WebhookEndpoint], settings: RiskDeliverySettings,
                 transport: Transport | None = None, on_outcome: Callable[[str, str], None] | None = None) -> None:
        """``on_outcome(endpoint, outcome)`` is told of every attempt: delivered, retry, dead or superseded."""
        self.database = database
        self.endpoints = list(endpoints)
        self.settings = settings
        self.transport: Transport = transport or AiohttpTransport()
        self.on_outcome = on_outcome
        self._enqueued_up_to: dict[str, int] = {}  # per endpoint: the highest event seq enqueued (this process)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.endpoints and self._task is None:
            self._task = asyncio.create_task(self._run(), name="risk webhook delivery")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await self.transport.close()

    async def _run(self) -> None:
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the loop outlives a store outage or a bug in one round; it says so
                log.error("risk webhook round failed", error=exc.__class__.__name__, detail=str(exc)[:200])
            await asyncio.sleep(self.settings.poll_seconds)

    async def run_once(self) -> int:
        """One round: enqueue new events, claim what is due, send it, record the outcomes. The number sent."""
        claims: list[tuple[WebhookEndpoint, Claim]] = []
        for endpoint in self.endpoints:
            await self._enqueue(endpoint.name)
            claims += [(endpoint, claim) for claim in await self._claim(endpoint.name)]
        await asyncio.gather(*(self._deliver(endpoint, claim) for endpoint, claim in claims))
        return len(claims)

    async def _enqueue(self, name: str) -> None:
        low = max(0, self._enqueued_up_to.get(name, 0) - LOOKBACK_EVENTS)
        missing, highest = await self.database.read(lambda tx: missing_in(tx, name, low))
        if missing:
            now = clock.now_iso()
            highest = await self.database.write(lambda tx: enqueue_in(tx, name, low, now))
        self._enqueued_up_to[name] = highest

    async def _claim(self, name: str) -> list[Claim]:
        now = clock.now_iso()
        if not await self.database.read(lambda tx: due_in(tx, name, now)):
            return []
        until = clock.after(self.settings.claim_seconds)
        return await self.database.write(lambda tx: claim_in(tx, name, now, until, self.settings.batch))

    async def send(self, endpoint: WebhookEndpoint, event: Mapping[str, Any]) -> str | None:
        """POST ``event`` to ``endpoint``, signed; None on a 2xx, else what went wrong (no secret, no URL)."""
        body = body_of(event, self.settings.source)
        headers = {"Content-Type": CONTENT_TYPE,
                   SIGNATURE_HEADER: signature_header(endpoint.secret, body, int(clock.now().timestamp())),
                   "User-Agent": "ecny-gateway-risk-webhooks/1"}
        try:
            status = await self.transport.post(endpoint.url, body, headers, endpoint.timeout_seconds)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return _failure(exc)
        return None if 200 <= status < 300 else f"HTTP {status}"

    async def _deliver(self, endpoint: WebhookEndpoint, claim: Claim) -> None:
        error = await self.send(endpoint, claim.event)
        now = clock.now()
        status = await self.database.write(lambda tx: record_outcome_in(tx, claim, endpoint, error, now))
        if self.on_outcome is not None:
            outcome = "superseded" if status is None else "retry" if status == "pending" else status
            self.on_outcome(endpoint.name, outcome)
        if status == "dead":
            log.error("risk webhook delivery dead", endpoint=endpoint.name, event_id=claim.event_id,
                      attempts=claim.attempt, error=error)
        elif error is not None:
            log.warning("risk webhook attempt failed", endpoint=endpoint.name, event_id=claim.event_id,
                        attempt=claim.attempt, error=error)
