"""Risk events: what a rule found, stored once (``risk_events``) and delivered by id.

An event carries its rule and the rule's version, a severity and a score, the subject it is about and
its evidence (ids, amounts, the window). ``seq`` is the cursor readers page by; ``event_id`` is what
every delivery (SSE, webhooks) is idempotent by.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway import clock
from gateway.ledger.store import Row, Tx

Severity = Literal["info", "low", "medium", "high", "critical"]
SEVERITIES: tuple[Severity, ...] = ("info", "low", "medium", "high", "critical")
Status = Literal["open", "acknowledged", "closed"]


@dataclass(frozen=True)
class RiskEvent:
    """One finding of one rule. ``score`` is 0–100; amounts in ``evidence`` are integers (fen) or, for
    tokens, decimal strings of base units."""

    rule: str
    rule_version: int
    severity: Severity
    score: int
    subject: str
    evidence: dict[str, Any]
    event_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    ts: str = field(default_factory=clock.now_iso)


def insert_event_in(tx: Tx, event: RiskEvent) -> int:
    """Store ``event``; its ``seq`` (the read cursor)."""
    tx.execute(
        "INSERT INTO risk_events (event_id, ts, rule, rule_version, severity, score, subject, evidence, status, "
        "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'open', ?)",
        (event.event_id, event.ts, event.rule, event.rule_version, event.severity, event.score, event.subject,
         json.dumps(event.evidence, sort_keys=True, separators=(",", ":")), event.ts),
    )
    row = tx.fetchone("SELECT seq FROM risk_events WHERE event_id = ?", (event.event_id,))
    assert row is not None
    return int(row["seq"])


def event_document(row: Row) -> dict[str, Any]:
    """An event as the API, the stream and the webhooks show it."""
    return {
        "seq": int(row["seq"]),
        "event_id": row["event_id"],
        "ts": row["ts"],
        "rule": row["rule"],
        "rule_version": int(row["rule_version"]),
        "severity": row["severity"],
        "score": int(row["score"]),
        "subject": row["subject"],
        "evidence": json.loads(row["evidence"]),
        "status": row["status"],
        "assignee": row["assignee"],
        "updated_at": row["updated_at"],
    }


def events_after_in(tx: Tx, after: int, *, severity: str | None = None, rule: str | None = None,
                    limit: int = 100) -> list[dict[str, Any]]:
    """Events with ``seq > after``, oldest first, at most ``limit``, optionally of one severity or rule."""
    sql = "SELECT * FROM risk_events WHERE seq > ?"
    params: list[Any] = [after]
    if severity is not None:
        sql, params = sql + " AND severity = ?", [*params, severity]
    if rule is not None:
        sql, params = sql + " AND rule = ?", [*params, rule]
    rows = tx.fetchall(sql + " ORDER BY seq LIMIT ?", [*params, limit])
    return [event_document(row) for row in rows]


def event_in(tx: Tx, event_id: str) -> dict[str, Any] | None:
    row = tx.fetchone("SELECT * FROM risk_events WHERE event_id = ?", (event_id,))
    return None if row is None else event_document(row)
