"""Reading and triaging risk events: who sees which, and who may acknowledge, assign and close them.

- Holders of ``risk.read_all`` (supervisors, auditors) read every event. A backend client (``risk.read``
  alone) reads only the events that *name* it — those whose evidence is its own decisions (its
  transfers, EVM transactions, refusals) or whose subject it is; any other event is 404 to it, as an
  unknown one, and absent from its pages and stream.
- Holders of ``risk.triage`` (supervisors, auditors) acknowledge, assign and close events; each action
  is audited in the transaction that makes it. Nobody triages an event that names them under any of
  their identities (owners are compared, as for approvals), and nobody assigns one to a person it names:
  the subject's own actor cannot clear the alarm about themselves.
- ``open → acknowledged → closed``; assigning keeps the status (and acknowledges an open event); a closed
  event stays closed — a new finding is a new event.
"""

from __future__ import annotations

from typing import Any, Literal

from gateway import clock
from gateway.audit.chain import AuditEntry, append
from gateway.auth.credentials import Principal, owner_of
from gateway.auth.roles import Permission, Role, allows
from gateway.errors import RiskEventClosed, RiskEventNotFound, RiskTriageOwnEvent, ValidationFailed
from gateway.ledger.store import Tx
from gateway.monitor.rules import RULE_NAMES
from gateway.risk.events import SEVERITIES, event_document, events_after_in, parties_in

TriageAction = Literal["acknowledge", "assign", "close"]
PAGE_MAX = 1000


def reader_party(reader: Principal) -> str | None:
    """None when ``reader`` sees every event, else the party the events it sees must name (its scope)."""
    return None if allows(reader.role, Permission.RISK_READ_ALL) else reader.scope


def check_filters(severity: str | None, rule: str | None) -> None:
    """Raises ValidationFailed for an unknown severity or rule name."""
    if severity is not None and severity not in SEVERITIES:
        raise ValidationFailed(f"severity must be one of {', '.join(SEVERITIES)}")
    if rule is not None and rule not in RULE_NAMES:
        raise ValidationFailed(f"rule must be one of {', '.join(RULE_NAMES)}")


def page_in(tx: Tx, reader: Principal, after: int, severity: str | None, rule: str | None,
            limit: int) -> dict[str, Any]:
    """One page of events after the cursor ``after`` that ``reader`` may see, and the next cursor."""
    check_filters(severity, rule)
    events = events_after_in(tx, after, severity=severity, rule=rule, limit=limit, party=reader_party(reader))
    return {"events": events, "next_after": events[-1]["seq"] if len(events) == limit else None}


def read_in(tx: Tx, reader: Principal, event_id: str) -> dict[str, Any]:
    """One event with the parties it names. Raises RiskEventNotFound (also when ``reader`` may not see it)."""
    row = tx.fetchone("SELECT * FROM risk_events WHERE event_id = ?", (event_id,))
    if row is None:
        raise RiskEventNotFound(f"no risk event {event_id[:40]}")
    parties = parties_in(tx, int(row["seq"]))
    party = reader_party(reader)
    if party is not None and party not in parties:
        raise RiskEventNotFound(f"no risk event {event_id[:40]}")
    return {**event_document(row), "parties": parties}


def _named(tx: Tx, parties: list[str], scope: str, owner: str) -> bool:
    """Whether the person behind ``scope`` (its ``owner``) is among ``parties``, under any identity."""
    owners = {owner_of(tx, party) for party in parties}
    return scope in parties or owner in owners or owner_of(tx, scope) in owners


def triage_in(tx: Tx, event_id: str, action: TriageAction, actor: Principal, assignee: str | None, note: str,
              entry: AuditEntry) -> dict[str, Any]:
    """Acknowledge, assign or close an event, audited with ``entry``.

    Raises:
        RiskEventNotFound, RiskEventClosed, RiskTriageOwnEvent,
        ValidationFailed: an assignment without an assignee, or to a user who may not triage.
    """
    tx.lock(f"risk-event:{event_id}")
    document = read_in(tx, actor, event_id)
    parties = document["parties"]
    if _named(tx, parties, actor.scope, actor.owner):
        raise RiskTriageOwnEvent(f"risk event {event_id} names you ({actor.scope}): another person triages it")
    if document["status"] == "closed":
        raise RiskEventClosed(f"risk event {event_id} was closed at {document['updated_at']}")
    status, new_assignee = document["status"], document["assignee"]
    if action == "assign":
        if not assignee:
            raise ValidationFailed("assign needs an assignee (a username)")
        user = tx.fetchone("SELECT username, role, disabled_at FROM users WHERE username = ?", (assignee,))
        if user is None or user["disabled_at"] or not allows(Role(user["role"]), Permission.RISK_TRIAGE):
            raise ValidationFailed(f"{assignee[:64]!r} is not an enabled user who may triage risk events")
        if _named(tx, parties, f"user:{assignee}", owner_of(tx, f"user:{assignee}")):
            raise RiskTriageOwnEvent(f"risk event {event_id} names {assignee}: assign it to someone else")
        new_assignee = assignee
        status = "acknowledged" if status == "open" else status
    elif action == "acknowledge":
        status = "acknowledged"
    else:
        status = "closed"
    now = clock.now_iso()
    tx.execute("UPDATE risk_events SET status = ?, assignee = ?, updated_at = ? WHERE event_id = ?",
               (status, new_assignee, now, event_id))
    entry.result = {"event_id": event_id, "rule": document["rule"], "from": document["status"], "to": status,
                    "assignee": new_assignee, "note": note[:500]}
    append(tx, [entry])
    return {**document, "status": status, "assignee": new_assignee, "updated_at": now}
