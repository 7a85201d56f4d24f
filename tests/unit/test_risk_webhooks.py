"""The pure parts of risk event delivery: the CloudEvent and its bytes, the signature, the backoff, the
report's counts and dates."""

from __future__ import annotations

from datetime import date

import orjson
import pytest

from gateway.errors import InvalidReportDate
from gateway.monitor.report import counts, day_bounds, parse_day
from gateway.monitor.webhooks import WebhookEndpoint, body_of, cloudevent, signature_header, verify_signature

EVENT = {"seq": 7, "event_id": "e-1", "ts": "2026-12-04T10:00:00.000000Z", "rule": "structuring", "rule_version": 3,
         "severity": "high", "score": 80, "subject": "8123456789012344", "evidence": {"ids": ["t_1"]},
         "status": "open", "assignee": None, "updated_at": "2026-12-04T10:00:00.000000Z"}


def test_the_body_is_the_same_whatever_the_triage_state() -> None:
    """A redelivery after an acknowledgement must carry the same data under the same id (receivers dedupe)."""
    acknowledged = {**EVENT, "status": "acknowledged", "assignee": "supervisor1", "updated_at": "later"}
    assert body_of(EVENT, "urn:x") == body_of(acknowledged, "urn:x")
    document = orjson.loads(body_of(EVENT, "urn:x"))
    assert document == cloudevent(EVENT, "urn:x")
    assert "status" not in document["data"] and document["type"] == "cn.ecny.gateway.risk.structuring"


def test_signature_binds_time_and_body_and_allows_rotation() -> None:
    """Forged risk webhook: another secret, another body or a stale timestamp fails; during a rotation a
    header with the old and the new signature passes for either secret."""
    body = body_of(EVENT, "urn:x")
    header = signature_header(b"s" * 32, body, 1_800_000_000)
    assert header.startswith("t=1800000000,v1=")
    assert verify_signature(b"s" * 32, header, body, 1_800_000_100)
    assert not verify_signature(b"t" * 32, header, body, 1_800_000_100)
    assert not verify_signature(b"s" * 32, header, body + b" ", 1_800_000_100)
    assert not verify_signature(b"s" * 32, header, body, 1_800_000_301)
    assert not verify_signature(b"s" * 32, "t=abc,v1=00", body, 1_800_000_000)
    rotated = header + "," + signature_header(b"n" * 32, body, 1_800_000_000).split(",")[1]
    assert verify_signature(b"s" * 32, rotated, body, 1_800_000_000)
    assert verify_signature(b"n" * 32, rotated, body, 1_800_000_000)


def test_backoff_doubles_and_is_capped() -> None:
    endpoint = WebhookEndpoint("hook", "https://h.example/", 5.0, 10, 2.0, 30.0, b"x" * 32)
    waits = [endpoint.backoff(attempt) for attempt in range(1, 8)]
    for wait, base in zip(waits, [2, 4, 8, 16, 30, 30, 30], strict=True):
        assert base <= wait <= base * 1.1
    assert endpoint.backoff(10_000) <= 33.0  # no overflow for a long-dead receiver
    assert "x" * 32 not in repr(endpoint)


def test_report_counts_every_severity_and_each_rule() -> None:
    events = [dict(EVENT), {**EVENT, "severity": "low"}, {**EVENT, "rule": "fan-in", "severity": "high"}]
    assert counts(events) == {"total": 3, "by_severity": {"info": 0, "low": 1, "medium": 0, "high": 2, "critical": 0},
                              "by_rule": {"structuring": {"high": 1, "low": 1}, "fan-in": {"high": 1}}}


def test_report_days() -> None:
    assert parse_day("2026-12-04", date(2026, 12, 5)) == date(2026, 12, 4)
    assert parse_day("2026-12-05", date(2026, 12, 5)) == date(2026, 12, 5)
    assert day_bounds(date(2026, 12, 31)) == ("2026-12-31T00:00:00.000000Z", "2027-01-01T00:00:00.000000Z")
    for text in ("2026-12-06", "2026-02-29", "2026-12-4", " 2026-12-04", "2026-12-04\n"):
        with pytest.raises(InvalidReportDate):
            parse_day(text, date(2026, 12, 5))
