"""Transfers between wallets (JSON or CBOR); above the threshold they wait for an approval
(gateway/api/approvals.py)."""

from __future__ import annotations

from aiohttp import web

from gateway.api import idempotency
from gateway.api.call import Call
from gateway.api.codecs import json_response
from gateway.api.endpoints import Endpoint
from gateway.api.wallet_models import TransferDocument, TransferRequest
from gateway.auth.roles import Permission
from gateway.wallets.accounts import TransferIntent, require_wallet_id


async def create_transfer(call: Call) -> web.Response:
    body: TransferRequest = call.body
    wallets = call.runtime.wallets
    intent = TransferIntent(require_wallet_id(body.from_wallet), require_wallet_id(body.to_wallet),
                            wallets.check_amount(body.amount_fen), body.memo)
    entry = call.audit_entry("transfers.create", decision="allowed", payload_hash=call.payload_hash())
    return idempotency.render(await wallets.transfer(call.idempotent, intent, entry))


async def resume_transfer(call: Call, transfer_id: str) -> web.Response:
    """Replay of a transfer whose response was not final when the first request ended (e.g. a crash
    between posting and signing): sign the envelope now and answer as the first request would have."""
    return idempotency.render(await call.runtime.wallets.signed_transfers.resume(transfer_id, call.idempotent))


async def show_transfer(call: Call) -> web.Response:
    transfer_id = call.request.match_info["transfer_id"]
    return json_response(await call.runtime.wallets.signed_transfer(transfer_id))


ENDPOINTS = [
    Endpoint("POST", "/v1/transfers", create_transfer,
             "Transfer between wallets; posted and signed, or pending a supervisor's approval",
             Permission.TRANSFERS_CREATE, "transfers", request_model=TransferRequest, response_model=TransferDocument,
             response_status=201, idempotency="required", cbor=True, audited_action="transfers.create",
             resume=resume_transfer, key_read_in_transaction=True,
             responses={202: "Pending approval", 422: "Refused by policy"}),
    Endpoint("GET", "/v1/transfers/{transfer_id}", show_transfer, "Show a transfer with its envelope",
             Permission.TRANSFERS_READ, "transfers", response_model=TransferDocument, audited_action="transfers.show"),
]
