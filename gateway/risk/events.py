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
    parties: tuple[str, ...] = ()
    """The principal scopes the event names (whose decisions are its evidence): who may read it as a
    backend client, and who may not triage it."""


EVENT_ID_NAMESPACE = uuid.UUID("6f1c2a52-3d0e-4c55-9a57-52a1b0c0e716")


def deterministic_event_id(rule: str, version: int, subject: str, trigger_seq: int) -> str:
    """The id of the event a rule finds about ``subject`` when evaluating signal ``trigger_seq``: the same
    evaluation always names the same event, so evaluating a signal twice cannot store two."""
    return str(uuid.uuid5(EVENT_ID_NAMESPACE, f"{rule}/{version}/{subject}/{trigger_seq}"))


def insert_event_in(tx: Tx, event: RiskEvent) -> int | None:
    """Store ``event`` and its parties; its ``seq`` (the read cursor), or None when an event with its id
    is stored already (nothing is written then)."""
    inserted = tx.execute(
        "INSERT INTO risk_events (event_id, ts, rule, rule_version, severity, score, subject, evidence, status, "
        "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'open', ?) ON CONFLICT (event_id) DO NOTHING",
        (event.event_id, event.ts, event.rule, event.rule_version, event.severity, event.score, event.subject,
         json.dumps(event.evidence, sort_keys=True, separators=(",", ":")), event.ts),
    )
    if not inserted:  # an event with this id is stored already
        return None
    row = tx.fetchone("SELECT seq FROM risk_events WHERE event_id = ?", (event.event_id,))
    assert row is not None
    seq = int(row["seq"])
    for party in sorted(set(event.parties)):
        tx.execute("INSERT INTO risk_event_parties (party, event_seq) VALUES (?, ?) ON CONFLICT DO NOTHING",
                   (party, seq))
    return seq


def parties_in(tx: Tx, seq: int) -> list[str]:
    """The principal scopes an event names."""
    return [row["party"] for row in tx.fetchall(
        "SELECT party FROM risk_event_parties WHERE event_seq = ? ORDER BY party", (seq,))]


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
                    limit: int = 100, party: str | None = None) -> list[dict[str, Any]]:
    """Events with ``seq > after``, oldest first, at most ``limit``, optionally of one severity or rule, or
    only those naming ``party`` (a principal scope)."""
    if party is None:
        sql = "SELECT e.* FROM risk_events e WHERE e.seq > ?"
        params: list[Any] = [after]
    else:
        sql = ("SELECT e.* FROM risk_event_parties p JOIN risk_events e ON e.seq = p.event_seq "
               "WHERE p.party = ? AND p.event_seq > ?")
        params = [party, after]
    if severity is not None:
        sql, params = sql + " AND e.severity = ?", [*params, severity]
    if rule is not None:
        sql, params = sql + " AND e.rule = ?", [*params, rule]
    rows = tx.fetchall(sql + " ORDER BY e.seq LIMIT ?", [*params, limit])
    return [event_document(row) for row in rows]


def head_seq_in(tx: Tx) -> int:
    """The cursor of the newest event (0 when there is none)."""
    row = tx.fetchone("SELECT MAX(seq) AS seq FROM risk_events")
    return 0 if row is None or row["seq"] is None else int(row["seq"])



def event_in(tx: Tx, event_id: str) -> dict[str, Any] | None:
    row = tx.fetchone("SELECT * FROM risk_events WHERE event_id = ?", (event_id,))
    return None if row is None else event_document(row)
