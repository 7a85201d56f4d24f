"""Transfers between wallets (JSON or CBOR) and the maker-checker approvals they may need."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from gateway.api import idempotency
from gateway.api.codecs import JSON, json_response
from gateway.api.endpoints import Call, Endpoint
from gateway.api.wallet_models import (
    ApprovalDocument,
    ApprovalList,
    DecisionRequest,
    TransferDocument,
    TransferRequest,
)
from gateway.auth.roles import Permission
from gateway.errors import ValidationFailed
from gateway.ledger.store import Tx
from gateway.wallets.service import TransferIntent, approval_document, finish_approval, require_wallet_id


async def _final_response(call: Call, transfer_id: str, row: Any = None) -> web.Response:
    """Sign the envelope if needed and complete the idempotency record in the same transaction."""

    def finish(tx: Tx, document: dict[str, Any]) -> None:
        idempotency.complete_in(tx, call, _status(document), JSON, orjson.dumps(document))

    document = await call.services.wallets.seal(transfer_id, finish, row)
    return web.Response(body=orjson.dumps(document), status=_status(document), content_type=JSON)


def _status(document: dict[str, Any]) -> int:
    return 201 if document["status"] == "posted" else 202


async def create_transfer(call: Call) -> web.Response:
    body: TransferRequest = call.body
    wallets = call.services.wallets
    intent = TransferIntent(require_wallet_id(body.from_wallet), require_wallet_id(body.to_wallet),
                            wallets.check_amount(body.amount_fen), body.memo)
    entry = call.audit_entry("transfers.create", decision="allowed", payload_hash=call.payload_hash())

    def work(tx: Tx) -> dict[str, Any]:
        row = wallets.transfer_in(tx, intent, entry)
        idempotency.record_in(tx, call, 0, idempotency.REFERENCE, row["transfer_id"].encode())
        return row

    row = await call.services.database.write(work)
    return await _final_response(call, row["transfer_id"], row)


async def resume_transfer(call: Call, transfer_id: str) -> web.Response:
    """Replay of a transfer whose response was not final when the first request ended (e.g. a crash
    between posting and signing): sign the envelope now and answer as the first request would have."""
    return await _final_response(call, transfer_id)


async def show_transfer(call: Call) -> web.Response:
    transfer_id = call.request.match_info["transfer_id"]
    return json_response(await call.services.wallets.seal(transfer_id))


async def list_approvals(call: Call) -> web.Response:
    status = call.request.query.get("status", "pending")
    if status not in ("pending", "executed", "rejected", "expired", "failed", "all"):
        raise ValidationFailed("status must be pending, executed, rejected, expired, failed or all")

    def find(tx: Tx) -> list[Any]:
        if status == "all":
            return tx.fetchall("SELECT * FROM approvals ORDER BY created_at DESC LIMIT 200")
        return tx.fetchall("SELECT * FROM approvals WHERE status = ? ORDER BY created_at DESC LIMIT 200", (status,))

    rows = await call.services.database.read(find)
    documents = [approval_document(row) for row in rows]
    if status == "pending":
        documents = [d for d in documents if d["status"] == "pending"]
    return json_response({"approvals": documents})


async def show_approval(call: Call) -> web.Response:
    approval_id = call.request.match_info["approval_id"]
    row = await call.services.database.read(
        lambda tx: tx.fetchone("SELECT * FROM approvals WHERE approval_id = ?", (approval_id,)))
    if row is None:
        from gateway.errors import NotFound

        raise NotFound(f"no approval {approval_id[:40]}")
    return json_response(await finish_approval(call.services.wallets, approval_document(row)))


def _decide(approve: bool) -> object:
    async def handler(call: Call) -> web.Response:
        approval_id = call.request.match_info["approval_id"]
        body: DecisionRequest = call.body
        action = "approvals.approve" if approve else "approvals.reject"
        entry = call.audit_entry(action, decision="allowed", payload_hash=body.payload_hash)
        wallets = call.services.wallets
        row, failure = await call.services.database.write(
            lambda tx: wallets.decide_in(tx, approval_id, approve, body.payload_hash, body.note, entry))
        if failure is not None:
            raise failure
        return json_response(await finish_approval(wallets, approval_document(row)))

    handler.__name__ = "approve" if approve else "reject"
    return handler


APPROVAL = "/v1/approvals/{approval_id}"

ENDPOINTS = [
    Endpoint("POST", "/v1/transfers", create_transfer,
             "Transfer between wallets; posted and signed, or pending a supervisor's approval",
             Permission.TRANSFERS_CREATE, "transfers", request_model=TransferRequest, response_model=TransferDocument,
             response_status=201, idempotency="required", cbor=True, audited_action="transfers.create",
             resume=resume_transfer, responses={202: "Pending approval", 422: "Refused by policy"}),
    Endpoint("GET", "/v1/transfers/{transfer_id}", show_transfer, "Show a transfer with its envelope",
             Permission.TRANSFERS_READ, "transfers", response_model=TransferDocument, audited_action="transfers.show"),
    Endpoint("GET", "/v1/approvals", list_approvals, "List approvals (default: pending)", Permission.APPROVALS_READ,
             "approvals", response_model=ApprovalList, audited_action="approvals.list",
             query=(("status",
                     {"type": "string", "enum": ["pending", "executed", "rejected", "expired", "failed", "all"]},
                     "Which approvals (default: pending)"),)),
    Endpoint("GET", APPROVAL, show_approval, "Show an approval and its result", Permission.APPROVALS_READ,
             "approvals", response_model=ApprovalDocument, audited_action="approvals.show"),
    Endpoint("POST", APPROVAL + "/approve", _decide(True),  # type: ignore[arg-type]
             "Approve and execute (a supervisor other than the requester)", Permission.APPROVALS_DECIDE, "approvals",
             request_model=DecisionRequest, response_model=ApprovalDocument, idempotency="optional",
             audited_action="approvals.approve", responses={409: "Not pending, expired or payload mismatch",
                                                            422: "Policy refused at execution"}),
    Endpoint("POST", APPROVAL + "/reject", _decide(False),  # type: ignore[arg-type]
             "Reject (a supervisor other than the requester)", Permission.APPROVALS_DECIDE, "approvals",
             request_model=DecisionRequest, response_model=ApprovalDocument, idempotency="optional",
             audited_action="approvals.reject"),
]
