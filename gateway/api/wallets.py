"""Wallets: open, read, search, status, tier, cash in and out, transaction history."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.api import idempotency
from gateway.api.call import Call
from gateway.api.codecs import json_response
from gateway.api.endpoints import Endpoint
from gateway.api.wallet_models import (
    AmountRequest,
    ApprovalDocument,
    CashResult,
    StatusRequest,
    TierRequest,
    TransactionPage,
    WalletDocument,
    WalletList,
    WalletOpened,
    WalletOpenRequest,
)
from gateway.approvals.workflow import is_pending_document
from gateway.auth.roles import Permission, allows
from gateway.errors import ValidationFailed
from gateway.ledger.store import Tx
from gateway.wallets.accounts import WALLET_SELECT, load_wallet, require_wallet_id, wallet_document

PAGE_SIZE = 50
PENDING = "Above the approval threshold (tier: an upgrade to tier 1): the pending approval, nothing moved yet"
WALLET = "/v1/wallets/{wallet_id}"


def _wallet_id(call: Call) -> str:
    return require_wallet_id(call.request.match_info["wallet_id"])




async def open_wallet(call: Call) -> web.Response:
    fields = call.body.model_dump()
    entry = call.audit_entry("wallets.open", decision="allowed", payload_hash=call.payload_hash())
    wallets = call.runtime.wallets

    def work(tx: Tx) -> bytes:
        return idempotency.respond_in(tx, call, wallets.open_in(tx, fields, entry), 201)

    return idempotency.json_body(await call.runtime.database.write(work), 201)


async def show(call: Call) -> web.Response:
    wallet_id = _wallet_id(call)
    row = await call.runtime.database.read(lambda tx: load_wallet(tx, wallet_id))
    return json_response(wallet_document(row))


async def search(call: Call) -> web.Response:
    query = call.request.query.get("q", "").strip()
    if len(query) > 64:
        raise ValidationFailed("q is at most 64 characters")
    digits = query.replace(" ", "")

    def find(tx: Tx) -> list[Any]:
        if not query:
            return tx.fetchall(WALLET_SELECT + "ORDER BY w.created_at DESC LIMIT ?", (PAGE_SIZE,))
        # Lower case on both sides: SQLite's LIKE ignores ASCII case, PostgreSQL's does not.
        pattern = "%" + query.replace("\\", "").replace("%", "").replace("_", "").lower() + "%"
        return tx.fetchall(
            WALLET_SELECT + "WHERE w.wallet_id LIKE ? OR LOWER(w.holder_name) LIKE ? OR w.phone LIKE ? "
            "ORDER BY w.created_at DESC LIMIT ?",
            (digits + "%", pattern, digits + "%" if digits.isdigit() else pattern, PAGE_SIZE),
        )

    rows = await call.runtime.database.read(find)
    return json_response({"wallets": [wallet_document(row) for row in rows]})


async def set_status(call: Call) -> web.Response:
    wallet_id = _wallet_id(call)
    body: StatusRequest = call.body
    actor = call.actor
    may_unfreeze = allows(actor.role, Permission.WALLETS_UNFREEZE)
    entry = call.audit_entry("wallets.status", decision="allowed", payload_hash=call.payload_hash())
    wallets = call.runtime.wallets

    def work(tx: Tx) -> bytes:
        document = wallets.set_status_in(tx, wallet_id, body.status, body.reason, may_unfreeze, entry)
        return idempotency.respond_in(tx, call, document)

    return idempotency.json_body(await call.runtime.database.write(work))


async def set_tier(call: Call) -> web.Response:
    wallet_id = _wallet_id(call)
    tier = call.body.tier
    entry = call.audit_entry("wallets.tier", decision="allowed", payload_hash=call.payload_hash())
    wallets = call.runtime.wallets

    def work(tx: Tx) -> tuple[bytes, int]:
        return _respond_in(tx, call, wallets.set_tier_in(tx, wallet_id, tier, entry))

    return idempotency.json_body(*await call.runtime.database.write(work))


def _respond_in(tx: Tx, call: Call, document: dict[str, Any]) -> tuple[bytes, int]:
    """Record and answer 200 with the operation's result, or 202 with the approval it now waits for."""
    status = 202 if is_pending_document(document) else 200
    return idempotency.respond_in(tx, call, document, status), status


def _cash(direction: str) -> Any:
    async def handler(call: Call) -> web.Response:
        wallet_id = _wallet_id(call)
        wallets = call.runtime.wallets
        amount = wallets.check_amount(call.body.amount_fen)
        entry = call.audit_entry(f"wallets.{direction}", decision="allowed", payload_hash=call.payload_hash())
        operation = wallets.cash_in if direction == "cash_in" else wallets.cash_out

        def work(tx: Tx) -> tuple[bytes, int]:
            idempotency.guard_in(tx, call)  # the key is read here, not in a transaction of its own
            return _respond_in(tx, call, operation(tx, wallet_id, amount, call.actor.scope, entry))

        return idempotency.json_body(*await call.runtime.database.write(work))

    handler.__name__ = direction
    return handler


async def transactions(call: Call) -> web.Response:
    wallet_id = _wallet_id(call)
    cursor_text = call.request.query.get("cursor", "")
    # ASCII digits, and few enough for a 64-bit column (str.isdigit() passes "²", which int() refuses).
    if cursor_text and not (cursor_text.isascii() and cursor_text.isdigit() and len(cursor_text) <= 18):
        raise ValidationFailed("cursor must be the next_cursor of a previous page")
    cursor = int(cursor_text) if cursor_text else 2**62

    def page(tx: Tx) -> list[Any]:
        load_wallet(tx, wallet_id)
        return tx.fetchall(
            "SELECT p.posting_id, p.entry_id, p.account_id, p.amount, j.kind, j.reference, j.memo, j.business_day, "
            "j.created_at FROM postings p JOIN journal j ON j.entry_id = p.entry_id "
            "WHERE p.account_id IN (?, ?) AND p.posting_id < ? ORDER BY p.posting_id DESC LIMIT ?",
            (f"w:{wallet_id}", f"r:{wallet_id}", cursor, PAGE_SIZE),
        )

    rows = await call.runtime.database.read(page)
    items = [
        {
            "posting_id": int(row["posting_id"]), "entry_id": row["entry_id"], "kind": row["kind"],
            "reference": row["reference"], "memo": row["memo"],
            "account": "wallet" if row["account_id"].startswith("w:") else "reserve",
            "amount_fen": int(row["amount"]), "business_day": row["business_day"], "created_at": row["created_at"],
        }
        for row in rows
    ]
    next_cursor = str(items[-1]["posting_id"]) if len(items) == PAGE_SIZE else None
    return json_response({"transactions": items, "next_cursor": next_cursor})


ENDPOINTS = [
    Endpoint("POST", "/v1/wallets", open_wallet,
             "Open a wallet (asked for at tier 1: opened at tier 2, its upgrade to tier 1 pending approval)",
             Permission.WALLETS_OPEN, "wallets",
             request_model=WalletOpenRequest, response_model=WalletOpened, response_status=201,
             idempotency="optional", audited_action="wallets.open"),
    Endpoint("GET", "/v1/wallets", search, "Search wallets by id, holder name or phone", Permission.WALLETS_READ,
             "wallets", response_model=WalletList, audited_action="wallets.search",
             query=(("q", {"type": "string", "maxLength": 64},
                     "Wallet id prefix, part of the holder's name, or phone prefix"),)),
    Endpoint("GET", WALLET, show, "Show a wallet with its balances", Permission.WALLETS_READ, "wallets",
             response_model=WalletDocument, audited_action="wallets.show"),
    Endpoint("POST", WALLET + "/status", set_status,
             "Freeze (teller), unfreeze or close (supervisor) a wallet", Permission.WALLETS_FREEZE, "wallets",
             request_model=StatusRequest, response_model=WalletDocument, idempotency="optional",
             audited_action="wallets.status", responses={422: "Refused by policy"}),
    Endpoint("POST", WALLET + "/tier", set_tier, "Change a wallet's tier", Permission.WALLETS_TIER, "wallets",
             request_model=TierRequest, response_model=WalletDocument, idempotency="optional",
             audited_action="wallets.tier", accepted_model=ApprovalDocument,
             responses={202: PENDING, 422: "Balance above the new tier's cap"}),
    Endpoint("POST", WALLET + "/cash-in", _cash("cash_in"), "Cash in: credit the wallet", Permission.WALLETS_CASH,
             "wallets", request_model=AmountRequest, response_model=CashResult, idempotency="required",
             audited_action="wallets.cash_in", accepted_model=ApprovalDocument, key_read_in_transaction=True,
             responses={202: PENDING, 422: "Refused by policy"}),
    Endpoint("POST", WALLET + "/cash-out", _cash("cash_out"), "Cash out: debit the wallet", Permission.WALLETS_CASH,
             "wallets", request_model=AmountRequest, response_model=CashResult, idempotency="required",
             audited_action="wallets.cash_out", accepted_model=ApprovalDocument, key_read_in_transaction=True,
             responses={202: PENDING, 422: "Refused by policy"}),
    Endpoint("GET", WALLET + "/transactions", transactions, "A wallet's postings, newest first, 50 a page",
             Permission.WALLETS_READ, "wallets", response_model=TransactionPage, audited_action="wallets.transactions",
             query=(("cursor", {"type": "string", "pattern": "^[0-9]{0,18}$"}, "next_cursor of the previous page"),)),
]
