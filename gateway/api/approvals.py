"""Maker-checker approvals: list, show, approve and reject (the rules live in gateway/approvals)."""

from __future__ import annotations

from aiohttp import web

from gateway.api.call import Call
from gateway.api.codecs import json_response
from gateway.api.endpoints import Endpoint
from gateway.api.wallet_models import ApprovalDocument, ApprovalList, DecisionRequest
from gateway.approvals.workflow import STATUSES
from gateway.auth.roles import Permission


async def list_approvals(call: Call) -> web.Response:
    status = call.request.query.get("status", "pending")
    reader, approvals = call.actor, call.runtime.approvals
    documents = await call.runtime.database.read(lambda tx: approvals.list_in(tx, reader, status))
    return json_response({"approvals": documents})


async def show_approval(call: Call) -> web.Response:
    approval_id = call.request.match_info["approval_id"]
    reader, approvals = call.actor, call.runtime.approvals
    document = await call.runtime.database.read(lambda tx: approvals.read_in(tx, reader, approval_id))
    return json_response(await approvals.finish(document))


def _decide(approve: bool) -> object:
    async def handler(call: Call) -> web.Response:
        approval_id = call.request.match_info["approval_id"]
        body: DecisionRequest = call.body
        action = "approvals.approve" if approve else "approvals.reject"
        entry = call.audit_entry(action, decision="allowed", payload_hash=body.payload_hash)
        decider, approvals = call.actor, call.runtime.approvals
        document, failure = await call.runtime.database.write(
            lambda tx: approvals.decide_in(tx, approval_id, approve, body.payload_hash, body.note, decider, entry))
        if failure is not None:
            raise failure
        return json_response(await approvals.finish(document))

    handler.__name__ = "approve" if approve else "reject"
    return handler


APPROVAL = "/v1/approvals/{approval_id}"
DECISION_REFUSALS = {403: "An API client, the requester's owner (under any identity), or not a supervisor",
                     409: "Not pending, expired or payload mismatch"}

ENDPOINTS = [
    Endpoint("GET", "/v1/approvals", list_approvals,
             "List approvals (default: pending): supervisors and auditors see all, others their own",
             Permission.APPROVALS_READ, "approvals", response_model=ApprovalList, audited_action="approvals.list",
             query=(("status", {"type": "string", "enum": [*STATUSES, "all"]}, "Which approvals (default: pending)"),)),
    Endpoint("GET", APPROVAL, show_approval,
             "Show an approval and its result (404 unless yours, or you are a supervisor or auditor)",
             Permission.APPROVALS_READ, "approvals", response_model=ApprovalDocument, audited_action="approvals.show"),
    Endpoint("POST", APPROVAL + "/approve", _decide(True),  # type: ignore[arg-type]
             "Approve and execute (a supervisor's session; not the requester's owner)", Permission.APPROVALS_DECIDE,
             "approvals", request_model=DecisionRequest, response_model=ApprovalDocument, idempotency="optional",
             audited_action="approvals.approve",
             responses={**DECISION_REFUSALS, 422: "Policy refused at execution"}),
    Endpoint("POST", APPROVAL + "/reject", _decide(False),  # type: ignore[arg-type]
             "Reject (a supervisor's session; not the requester's owner)", Permission.APPROVALS_DECIDE, "approvals",
             request_model=DecisionRequest, response_model=ApprovalDocument, idempotency="optional",
             audited_action="approvals.reject", responses=DECISION_REFUSALS),
]
