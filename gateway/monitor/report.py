"""The signed daily risk report for a regulator: one UTC day's risk events and their counts, as a
COSE_Sign1 (RFC 9052) over CBOR, signed in the HSM by the key of usage ``report``.

Payload (a CBOR map, canonical encoding)::

    {"type": "ecny-gateway/risk-daily-report", "version": 1, "date": "YYYY-MM-DD",
     "from": <ISO start, inclusive>, "until": <ISO end, exclusive>, "generated_at": <ISO>,
     "complete": <false while the day is not over>, "source": <[risk_delivery] source>,
     "counts": {"total": n, "by_severity": {severity: n}, "by_rule": {rule: {severity: n}}},
     "events": [{seq, event_id, ts, rule, rule_version, severity, score, subject, evidence}, … by seq]}

The events are those whose ``ts`` falls in the day — the same documents ``GET /v1/risk/events`` lists,
without their triage state (status, assignee), which changes after the day. Anyone with the report key's
public key (``GET /v1/keys/{kid}``) verifies it offline, e.g. with pycose.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import cbor2

from gateway import clock
from gateway.errors import InvalidReportDate
from gateway.hsm.profile import HsmProfile
from gateway.keys import Usage, key_for_usage, sign1_with_profile
from gateway.ledger.store import Database, Tx
from gateway.monitor.webhooks import finding
from gateway.risk.events import SEVERITIES, event_document
from gateway.signing import Signer

REPORT_TYPE = "ecny-gateway/risk-daily-report"
REPORT_VERSION = 1
_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def parse_day(text: str, today: date) -> date:
    """A UTC calendar day ``YYYY-MM-DD``, not after ``today``. Raises InvalidReportDate."""
    if not _DAY.fullmatch(text):
        raise InvalidReportDate(f"date must be YYYY-MM-DD (a UTC day), not {text[:40]!r}")
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise InvalidReportDate(f"{text} is not a calendar day") from None
    if day > today:
        raise InvalidReportDate(f"{text} is in the future (today is {today.isoformat()} UTC)")
    return day


def day_bounds(day: date) -> tuple[str, str]:
    """The day's start (inclusive) and end (exclusive) as the store writes times."""
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return clock.iso(start), clock.iso(start + timedelta(days=1))


def events_of_day_in(tx: Tx, day: date) -> list[dict[str, Any]]:
    """The day's events (their findings), in ``seq`` order."""
    start, end = day_bounds(day)
    rows = tx.fetchall("SELECT * FROM risk_events WHERE ts >= ? AND ts < ? ORDER BY seq", (start, end))
    return [finding(event_document(row)) for row in rows]


def counts(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Events per severity (every severity named, zeros included) and per rule and severity."""
    by_severity = dict.fromkeys(SEVERITIES, 0)
    by_rule: dict[str, dict[str, int]] = {}
    for event in events:
        by_severity[event["severity"]] = by_severity.get(event["severity"], 0) + 1
        per_rule = by_rule.setdefault(event["rule"], {})
        per_rule[event["severity"]] = per_rule.get(event["severity"], 0) + 1
    return {"total": len(events), "by_severity": by_severity, "by_rule": by_rule}


def report_payload(day: date, events: list[dict[str, Any]], now: datetime, source: str) -> dict[str, Any]:
    start, end = day_bounds(day)
    return {
        "type": REPORT_TYPE, "version": REPORT_VERSION, "date": day.isoformat(), "from": start, "until": end,
        "generated_at": clock.iso(now), "complete": clock.iso(now) >= end, "source": source,
        "counts": counts(events), "events": events,
    }


@dataclass(frozen=True)
class SignedReport:
    envelope: bytes  # the tagged COSE_Sign1, application/cose
    key_id: str
    events: int
    payload_sha256: str


async def signed_report(database: Database, signer: Signer, profile: HsmProfile, key_id: str | None, day: date,
                        source: str) -> SignedReport:
    """Read ``day``'s events and sign the report with the ``report`` key (``key_id`` when configured).

    Raises:
        KeyNotFound / AmbiguousKey / KeyUsageNotAllowed: no usable report key (see keys.key_for_usage).
        HsmUnavailable, HsmError: from the signer.
    """

    def read(tx: Tx) -> tuple[Any, list[dict[str, Any]]]:
        key = key_for_usage(tx, Usage.REPORT, key_id, "risk_delivery.report_key_id")
        return key, events_of_day_in(tx, day)

    key, events = await database.read(read)
    payload = cbor2.dumps(report_payload(day, events, clock.now(), source), canonical=True)
    envelope = await sign1_with_profile(signer, profile, key, payload)
    return SignedReport(envelope, key.key_id, len(events), hashlib.sha256(payload).hexdigest())
