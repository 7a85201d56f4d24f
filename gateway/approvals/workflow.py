"""Maker-checker approvals (dual control) for every operation that moves value the bank carries.

An operation above its threshold (a transfer, a cash-in or cash-out, a hard-wallet load, a tier
upgrade to tier 1, an EVM transaction) or one that always needs two people (the honour of an offline
discrepancy) is not carried out: it is *requested* here. Its exact payload is fixed as canonical JSON
with its SHA-256, together with the requester and the requester's **owner** (the person behind the
user or API client). A second person then *decides* it:

- only a person decides: a user's session, never an API client, whatever its role;
- never the requester's owner, under any of their identities (owners are compared, not accounts);
- never an *interested* owner the operation names when it is requested (e.g. whoever registered the
  device an honour pays for, and so may hold its key);
- bound to the payload hash the decider reviewed;
- approval executes the operation in the decision's own transaction (so it happens exactly once,
  or not at all); rejection and expiry move nothing.

What an operation does when it is executed, rejected or expired is its kind's
:class:`ApprovalHandler`, registered with :meth:`Approvals.register`.

Who sees an approval: its requester's owner, and holders of ``approvals.read_all`` (supervisors and
auditors). Anyone else gets 404 for it and does not find it in lists.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterable
from typing import Any, Protocol

from gateway import clock
from gateway.audit.chain import AuditEntry, append
from gateway.auth.credentials import Principal, owner_of
from gateway.auth.roles import Permission, allows
from gateway.config import ApprovalSettings
from gateway.errors import (
    ApprovalAlreadyPending,
    ApprovalExpired,
    ApprovalNotPending,
    ApprovalPayloadMismatch,
    ApproverNotAPerson,
    GatewayError,
    InterestedParty,
    NotFound,
    PolicyRefused,
    SelfApproval,
    ValidationFailed,
)
from gateway.ledger.store import Row, Tx
from gateway.risk.signals import record_signal_in

STATUSES = ("pending", "executed", "rejected", "expired", "failed")
LIST_LIMIT = 200


class ApprovalHandler(Protocol):
    """What one kind of approval (``transfer``, ``cash_out``, ``offline_honour``…) does when decided.

    Every method but :meth:`finish` runs inside the decision's write transaction, after the approval
    row is locked and checked; ``payload`` is the approved payload (its hash matched).
    """

    def execute_in(self, tx: Tx, approval: Row, payload: dict[str, Any], entry: AuditEntry) -> dict[str, Any]:
        """Carry the approved operation out, exactly as requested.

        Returns:
            The result recorded on the approval (JSON-serialisable).
        Raises:
            PolicyRefused: the operation is no longer allowed; the approval becomes ``failed`` and
                nothing moves. Any other error rolls the whole decision back (it stays pending).
        """
        ...

    def reject_in(self, tx: Tx, approval: Row, payload: dict[str, Any]) -> None:
        """The approval was rejected: record it wherever the operation keeps its own state."""
        ...

    def expire_in(self, tx: Tx, approval: Row, payload: dict[str, Any]) -> None:
        """The approval expired undecided: record it wherever the operation keeps its own state."""
        ...

    async def finish(self, document: dict[str, Any]) -> dict[str, Any] | None:
        """After the decision committed: complete the result (e.g. sign) and return it, or None."""
        ...


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def approval_document(row: Row) -> dict[str, Any]:
    """The API document of an approval (a pending one past its expiry reads as ``expired``)."""
    return {
        "approval_id": row["approval_id"],
        "kind": row["kind"],
        "payload": json.loads(row["payload"]),
        "payload_hash": row["payload_hash"],
        "requested_by": row["requested_by"],
        "requested_owner": row["requested_owner"],
        "interested_owners": json.loads(row["interested_owners"] or "[]"),
        "status": "expired" if row["status"] == "pending" and row["expires_at"] <= clock.now_iso() else row["status"],
        "decided_by": row["decided_by"],
        "decided_at": row["decided_at"],
        "note": row["note"],
        "result": json.loads(row["result"]) if row["result"] else None,
        "created_at": row["created_at"],
        "expires_at": row["expires_at"],
    }


def is_pending_document(document: dict[str, Any]) -> bool:
    """True for the document of an approval just requested (what an operation answers with 202)."""
    return "approval_id" in document and "payload_hash" in document and document.get("status") == "pending"


def needs_approval(amount: int, single_threshold: int, moved_today: int, daily_threshold: int) -> dict[str, Any] | None:
    """Whether an operation of ``amount`` needs a second person: above its single threshold, or taking
    the day's total of its kind on the same wallet (``moved_today`` before it) above the daily one, so
    that splitting an amount below the single threshold does not avoid review.

    Returns:
        None (it may go straight through), or what the approval's payload adds to say why (empty
        for the single threshold; ``day_total_fen`` for the daily aggregate).
    """
    if amount > single_threshold:
        return {}
    if moved_today + amount > daily_threshold:
        return {"day_total_fen": moved_today + amount}
    return None


def _amount(payload: dict[str, Any]) -> int | None:
    """The e-CNY amount an approval's payload names, if any (fen)."""
    amount = payload.get("amount_fen")
    return amount if type(amount) is int else None


def sees_all(principal: Principal) -> bool:
    """Supervisors and auditors read every approval; anyone else only their owner's."""
    return allows(principal.role, Permission.APPROVALS_READ_ALL)


def execution_entry(approval: Row, decision: AuditEntry, action: str) -> AuditEntry:
    """The audit entry of an approved operation carried out inside the decision's transaction: the
    requester's operation (actor), with the decision's request id; the operation fills in its result."""
    return AuditEntry(actor=approval["requested_by"], role="", action=action, decision="approved",
                      payload_hash=approval["payload_hash"], request_id=decision.request_id)


class Approvals:
    """The approvals of one gateway process, and the handlers of their kinds."""

    def __init__(self, settings: ApprovalSettings) -> None:
        self.settings = settings
        self._handlers: dict[str, ApprovalHandler] = {}

    def register(self, kind: str, handler: ApprovalHandler) -> None:
        """Route approvals of ``kind`` to ``handler`` (one handler per kind)."""
        self._handlers[kind] = handler

    def handler(self, kind: str) -> ApprovalHandler:
        handler = self._handlers.get(kind)
        if handler is None:
            raise ValidationFailed(f"approvals of kind {kind!r} cannot be executed here")
        return handler

    # --- request -------------------------------------------------------------------------------

    def request_in(self, tx: Tx, kind: str, payload: dict[str, Any], requested_by: str, subject: str = "",
                   interested: Iterable[str] = ()) -> str:
        """Park an operation for a second person: the payload (canonical JSON) and its hash, the
        requester and the requester's owner are fixed now. Returns the approval id.

        ``subject``: what the operation is about (e.g. ``discrepancy:<id>``), when at most one
        approval may be pending for it; the caller holds the subject's lock.

        ``interested``: the identities (scopes such as ``user:NAME``) that stand to gain from the
        operation besides its requester; their owners, fixed now, may not decide it.

        Raises:
            ApprovalAlreadyPending: an approval for ``subject`` is pending and not expired.
        """
        if subject:
            self._expire_subject_in(tx, subject)
            live = tx.fetchone("SELECT approval_id FROM approvals WHERE subject = ? AND status = 'pending'",
                               (subject,))
            if live is not None:
                raise ApprovalAlreadyPending(f"approval {live['approval_id']} is pending for {subject}",
                                             approval_id=live["approval_id"])
        approval_id = "a_" + secrets.token_hex(12)
        text = canonical_json({"kind": kind, **payload})
        requested_owner = owner_of(tx, requested_by)
        interested_owners = sorted({owner_of(tx, scope) for scope in interested} - {requested_owner})
        tx.execute(
            "INSERT INTO approvals (approval_id, kind, payload, payload_hash, requested_by, requested_owner, subject, "
            "interested_owners, status, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
            (approval_id, kind, text, sha256_hex(text), requested_by, requested_owner, subject,
             canonical_json(interested_owners), clock.now_iso(), clock.after(self.settings.ttl_seconds)),
        )
        record_signal_in(tx, "approval.requested", requested_by, _amount(payload), actor=requested_by,
                         approval_id=approval_id, approval_kind=kind)
        return approval_id

    def park_in(self, tx: Tx, kind: str, payload: dict[str, Any], entry: AuditEntry, subject: str = "",
                interested: Iterable[str] = ()) -> dict[str, Any]:
        """Request an approval for an operation instead of carrying it out, and audit the request
        (``entry``: the operation's own, its decision ``pending_approval``). Returns the pending
        approval's document: the operation answers 202 with it. ``subject`` and ``interested``: as
        for :meth:`request_in`."""
        approval_id = self.request_in(tx, kind, payload, entry.actor, subject, interested)
        entry.decision = "pending_approval"
        entry.result = {**payload, "approval_id": approval_id}
        append(tx, [entry])
        return approval_document(self._row(tx, approval_id))

    # --- list and read -------------------------------------------------------------------------

    def list_in(self, tx: Tx, reader: Principal, status: str) -> list[dict[str, Any]]:
        """The newest approvals ``reader`` may see (``status``: one of :data:`STATUSES` or ``all``)."""
        if status != "all" and status not in STATUSES:
            raise ValidationFailed("status must be pending, executed, rejected, expired, failed or all")
        where, parameters = [], []
        if status == "expired":  # a pending approval past its expiry reads as expired
            where.append("status IN ('pending', 'expired')")
        elif status != "all":
            where.append("status = ?")
            parameters.append(status)
        if not sees_all(reader):
            where.append("requested_owner = ?")
            parameters.append(reader.owner)
        sql = "SELECT * FROM approvals " + ("WHERE " + " AND ".join(where) + " " if where else "")
        rows = tx.fetchall(sql + "ORDER BY created_at DESC LIMIT ?", [*parameters, LIST_LIMIT])
        documents = [approval_document(row) for row in rows]
        return [d for d in documents if status in ("all", d["status"])]

    def read_in(self, tx: Tx, reader: Principal, approval_id: str) -> dict[str, Any]:
        """One approval, if ``reader`` may see it. Raises NotFound otherwise (as for an unknown id)."""
        row = tx.fetchone("SELECT * FROM approvals WHERE approval_id = ?", (approval_id,))
        if row is None or not (sees_all(reader) or row["requested_owner"] == reader.owner):
            raise NotFound(f"no approval {approval_id[:40]}")
        return approval_document(row)

    # --- decide ----------------------------------------------------------------------------------

    def decide_in(self, tx: Tx, approval_id: str, approve: bool, payload_hash: str, note: str,
                  decider: Principal, entry: AuditEntry) -> tuple[dict[str, Any], GatewayError | None]:
        """Approve (and execute) or reject a pending approval, bound to ``payload_hash``.

        Returns:
            (the approval's document after the decision, the refusal to answer with if it expired or
            its execution was refused — the decision is recorded and committed either way).
        Raises:
            ApproverNotAPerson: ``decider`` is an API client.
            SelfApproval: ``decider``'s owner requested it (under any identity).
            InterestedParty: ``decider``'s owner is among the approval's interested owners.
            NotFound, ApprovalNotPending, ApprovalPayloadMismatch.
        """
        if decider.kind != "user":
            raise ApproverNotAPerson(f"{decider.scope} is an API client: approvals are decided by a person, "
                                     "in a session of their own")
        tx.lock(f"approval:{approval_id}")
        approval = tx.fetchone("SELECT * FROM approvals WHERE approval_id = ?", (approval_id,))
        if approval is None:
            raise NotFound(f"no approval {approval_id[:40]}")
        if approval["status"] != "pending":
            raise ApprovalNotPending(f"approval {approval_id} is {approval['status']}")
        deciding_owner = owner_of(tx, decider.scope)
        if approval["requested_by"] == decider.scope or approval["requested_owner"] in (deciding_owner, decider.owner):
            raise SelfApproval("the requester cannot approve or reject their own request, under any of their "
                               "identities")
        interested = json.loads(approval["interested_owners"] or "[]")
        if deciding_owner in interested or decider.owner in interested:
            raise InterestedParty("the operation names you as an interested party (e.g. you registered the "
                                  "device it concerns): another person decides it")
        if sha256_hex(approval["payload"]) != approval["payload_hash"] or payload_hash != approval["payload_hash"]:
            raise ApprovalPayloadMismatch("the payload hash does not match the pending payload")
        handler = self.handler(approval["kind"])
        payload = json.loads(approval["payload"])
        entry.result = {"approval_id": approval_id, "kind": approval["kind"], "payload_hash": payload_hash,
                        "requested_by": approval["requested_by"], "requested_owner": approval["requested_owner"]}
        failure: GatewayError | None = None
        if approval["expires_at"] <= clock.now_iso():
            handler.expire_in(tx, approval, payload)  # the handler's locks before the approval's row
            self._close(tx, approval_id, "expired", entry.actor, note, None)
            entry.decision, entry.reasons = "refused", ["approval-expired"]
            failure = ApprovalExpired(f"approval {approval_id} expired at {approval['expires_at']}")
        elif not approve:
            handler.reject_in(tx, approval, payload)
            record_signal_in(tx, "approval.rejected", approval["requested_by"], _amount(payload), actor=entry.actor,
                             approval_id=approval_id, approval_kind=approval["kind"])
            self._close(tx, approval_id, "rejected", entry.actor, note, None)
            entry.decision = "rejected"
        else:
            try:
                result = handler.execute_in(tx, approval, payload, entry)
            except PolicyRefused as refusal:
                failure = refusal
                self._close(tx, approval_id, "failed", entry.actor, note, {"reasons": refusal.reasons})
                entry.decision, entry.reasons = "failed", refusal.reasons
            else:
                self._close(tx, approval_id, "executed", entry.actor, note, result)
                entry.decision = "approved"
                entry.result["result"] = result
        append(tx, [entry])
        return approval_document(self._row(tx, approval_id)), failure

    async def finish(self, document: dict[str, Any]) -> dict[str, Any]:
        """Complete an executed approval's result after commit (e.g. sign the transfer's envelope)."""
        if document["status"] != "executed":
            return document
        handler = self._handlers.get(document["kind"])
        if handler is not None:
            result = await handler.finish(document)
            if result is not None:
                document["result"] = result
        return document

    # --- expiry ----------------------------------------------------------------------------------

    def _expire_subject_in(self, tx: Tx, subject: str) -> None:
        """Close the pending approvals of ``subject`` that are past their expiry."""
        for row in tx.fetchall("SELECT * FROM approvals WHERE subject = ? AND status = 'pending' AND expires_at <= ?",
                               (subject, clock.now_iso())):
            handler = self._handlers.get(row["kind"])
            if handler is not None:
                handler.expire_in(tx, row, json.loads(row["payload"]))
            self._close(tx, row["approval_id"], "expired", "system:expiry", "", None)

    @staticmethod
    def _row(tx: Tx, approval_id: str) -> Row:
        row = tx.fetchone("SELECT * FROM approvals WHERE approval_id = ?", (approval_id,))
        if row is None:
            raise NotFound(f"no approval {approval_id[:40]}")
        return row

    @staticmethod
    def _close(tx: Tx, approval_id: str, status: str, actor: str, note: str, result: dict[str, Any] | None) -> None:
        tx.execute(
            "UPDATE approvals SET status = ?, decided_by = ?, decided_at = ?, note = ?, result = ? "
            "WHERE approval_id = ?",
            (status, actor, clock.now_iso(), note, canonical_json(result) if result is not None else None, approval_id),
        )
