"""Who may call what (docs/spec.md §5 roles table): every endpoint by every role, plus no credentials.

Each endpoint has a case: a request that succeeds when the caller is allowed, and the roles docs/spec.md §5
lets call it (checked against the grants table, `gateway.auth.roles.allows`). Allowed → the
endpoint's success status; not allowed → 403 `forbidden` (audited when the endpoint audits
refusals); anonymous → 401 with `WWW-Authenticate`; public endpoints work for everyone. An endpoint
without a case fails the suite.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from aiohttp import ClientResponse
from argon2 import PasswordHasher

from gateway import clock
from gateway.app import all_endpoints
from gateway.auth.credentials import add_user, revoke_client
from gateway.auth.roles import Role, allows
from gateway.errors import AmbiguousKey
from gateway.hardwallet.simulator import SimulatedDevice
from gateway.risk.events import RiskEvent, insert_event_in
from tests.api.support import approve_as_second_person, approve_opened_tier, assert_problem, new_client, runtime
from tests.conftest import PASSWORDS, Gateway, login
from tests.device.flows import discrepancies, ensure_voucher_key, pay, register
from tests.device.flows import load as device_load
from tests.device.flows import sync as device_sync

pytestmark = pytest.mark.softhsm

ANONYMOUS = "anonymous"


@dataclass
class Case:
    """One request: path with real ids filled in, an optional JSON body, query and extra headers."""

    path: str
    json: Any = None
    params: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    data: bytes | None = None  # a raw body (the CBOR device log) instead of JSON
    own_session: bool = False  # the caller logs in afresh (the request ends its session: a logout)


@dataclass
class Context:
    gateway: Gateway
    keys: dict[str, Any]  # the `raw_keys` documents
    caller: Role | str | None = None  # who will send the request (approvals are visible to their owner)


def _digest() -> str:
    return os.urandom(32).hex()


def _idempotency() -> dict[str, str]:
    return {"Idempotency-Key": f"authz-{secrets.token_hex(8)}"}


async def _ok(response: ClientResponse, status: int = 200) -> Any:
    assert response.status == status, await response.text()
    return await response.json()


async def _wallet(ctx: Context, funded: int = 0) -> str:
    """A fresh active tier-1 wallet (no limits), opened by a teller, with ``funded`` fen cashed in."""
    gw = ctx.gateway
    document = await _ok(await gw.client.post(
        "/v1/wallets", json={"holder_name": "Authz Test", "phone": "13800138000", "tier": 1, "kind": "personal"},
        headers=gw.auth(Role.TELLER)), 201)
    wallet_id = str((await approve_opened_tier(gw, document))["wallet_id"])  # dual control: tier 1 approved
    if funded:
        response = await gw.client.post(f"/v1/wallets/{wallet_id}/cash-in", json={"amount_fen": funded},
                                        headers=gw.auth(Role.TELLER) | _idempotency())
        if funded > gw.settings.approvals.cash_in_threshold_fen:  # dual control: a second person approves
            await approve_as_second_person(gw, response)
        else:
            await _ok(response)
    return wallet_id


async def _transfer(ctx: Context, amount: int = 100, maker: Role = Role.BACKEND) -> dict[str, Any]:
    """A transfer made by ``maker`` (the backend client by default): posted, or pending approval above the
    threshold."""
    gw = ctx.gateway
    payer, payee = await _wallet(ctx, funded=amount), await _wallet(ctx)
    response = await gw.client.post("/v1/transfers", json={"from_wallet": payer, "to_wallet": payee,
                                                           "amount_fen": amount},
                                    headers=gw.auth(maker) | _idempotency())
    return dict(await _ok(response, 201 if amount <= gw.settings.approvals.transfer_threshold_fen else 202))


async def _pending_approval(ctx: Context, by_caller: bool = False) -> dict[str, Any]:
    """A pending approval requested by the backend client (so any supervisor may decide it) — or, with
    ``by_caller``, by the caller when it may make transfers (a teller or backend reads only its own)."""
    gw = ctx.gateway
    maker = ctx.caller if by_caller and ctx.caller in (Role.BACKEND, Role.TELLER) else Role.BACKEND
    assert isinstance(maker, Role)
    transfer = await _transfer(ctx, gw.settings.approvals.transfer_threshold_fen + 1, maker)
    return dict(await _ok(await gw.client.get(f"/v1/approvals/{transfer['approval_id']}",
                                              headers=gw.auth(Role.SUPERVISOR))))


async def _decision(ctx: Context, verb: str) -> Case:
    approval = await _pending_approval(ctx)
    return Case(f"/v1/approvals/{approval['approval_id']}/{verb}",
                {"payload_hash": approval["payload_hash"], "note": "authorization test"})


def _sync(make: Callable[[Context], Case]) -> Callable[[Context], Awaitable[Case]]:
    """A builder from a plain function (called anew for every request: fresh labels and digests)."""

    async def build(ctx: Context) -> Case:
        return make(ctx)

    return build


def _fixed(case: Case) -> Callable[[Context], Awaitable[Case]]:
    return _sync(lambda ctx: case)


async def _id(document: Awaitable[dict[str, Any]], name: str) -> str:
    return str((await document)[name])


async def _built(ctx: Context, template: str, make: Callable[[Context], Awaitable[str]], json: Any = None,
                 headers: dict[str, str] | None = None) -> Case:
    return Case(template.format(await make(ctx)), json, headers=headers or {})


async def _new_transfer(ctx: Context) -> Case:
    payer, payee = await _wallet(ctx, funded=1_000), await _wallet(ctx)
    return Case("/v1/transfers", {"from_wallet": payer, "to_wallet": payee, "amount_fen": 250, "memo": "authz"},
                headers=_idempotency())


SEPOLIA, SEPOLIA_USDC = 11155111, "0x1c7D4B196Cb0C7B01d743Fbc6116a902379C7238"


async def _evm_key(ctx: Context) -> dict[str, Any]:
    gw = ctx.gateway
    return await _ok(await gw.client.post("/v1/keys", json={
        "label": f"authz-evm-{secrets.token_hex(4)}", "algorithm": "ecdsa-secp256k1", "usage": ["evm"]},
        headers=gw.auth(Role.ADMIN)), 201)


async def _fresh_raw_key(ctx: Context) -> dict[str, Any]:
    """A raw key of its own, so that rotating or disabling it changes no key other tests use."""
    gw = ctx.gateway
    return await _ok(await gw.client.post("/v1/keys", json={
        "label": f"authz-lifecycle-{secrets.token_hex(4)}", "algorithm": "ecdsa-p256", "usage": ["raw"]},
        headers=gw.auth(Role.ADMIN)), 201)


async def _evm_transaction(ctx: Context) -> Case:
    key = await _evm_key(ctx)
    return Case("/v1/evm/transactions", {
        "key_id": key["key_id"], "chain_id": SEPOLIA, "type": "eip1559", "gas_limit": 21000,
        "max_fee_per_gas": "2000000000", "max_priority_fee_per_gas": "1000000000",
        "to": "0x1111111111111111111111111111111111111111", "value": "1"}, headers=_idempotency())


async def _evm_typed_data(ctx: Context) -> Case:
    key = await _evm_key(ctx)
    permit = {
        "types": {
            "EIP712Domain": [{"name": "name", "type": "string"}, {"name": "version", "type": "string"},
                             {"name": "chainId", "type": "uint256"}, {"name": "verifyingContract", "type": "address"}],
            "Permit": [{"name": "owner", "type": "address"}, {"name": "spender", "type": "address"},
                       {"name": "value", "type": "uint256"}, {"name": "nonce", "type": "uint256"},
                       {"name": "deadline", "type": "uint256"}],
        },
        "primaryType": "Permit",
        "domain": {"name": "USDC", "version": "2", "chainId": SEPOLIA, "verifyingContract": SEPOLIA_USDC},
        "message": {"owner": key["address"], "spender": "0x1111111111111111111111111111111111111111",
                    "value": "1", "nonce": 0, "deadline": 1_900_000_000},
    }
    return Case("/v1/evm/typed-data", {"key_id": key["key_id"], "chain_id": SEPOLIA, "typed_data": permit})


async def _device(ctx: Context, loaded: int = 0) -> SimulatedDevice:
    """A simulated hard wallet registered (by a teller) on a fresh wallet; loaded if asked."""
    gw = ctx.gateway
    await ensure_voucher_key(gw)
    device = SimulatedDevice.create()
    await register(gw, device, await _wallet(ctx, funded=10_000))
    if loaded:
        await device_load(gw, device, loaded)
    return device


async def _discrepancy(ctx: Context) -> str:
    """An open `broken-chain` discrepancy (within the loaded value, so `post` can resolve it)."""
    gw = ctx.gateway
    payer, payee = await _device(ctx, loaded=5_000), await _device(ctx)
    pay(payer, payee, 1_000, misbehave="break-chain")
    await device_sync(gw, payer)
    await device_sync(gw, payee)
    found = await discrepancies(gw, payer.state.device_id)
    return str(next(d["discrepancy_id"] for d in found if d["kind"] == "broken-chain"))


async def _device_case(ctx: Context, suffix: str, loaded: int = 0, **extra: Any) -> Case:
    device = await _device(ctx, loaded)
    return Case(f"/v1/devices/{device.state.device_id}{suffix}", **extra)


async def _sync_case(ctx: Context) -> Case:
    device = await _device(ctx, loaded=1_000)
    device.export_log(0)
    return Case(f"/v1/devices/{device.state.device_id}/sync", data=device.export(),
                headers={"Content-Type": "application/cbor"})


async def _unload_case(ctx: Context) -> Case:
    device = await _device(ctx, loaded=1_000)
    statement = base64.b64encode(device.unload()["statement"]).decode()
    return Case(f"/v1/devices/{device.state.device_id}/unload", {"statement": statement})


async def _register_case(ctx: Context) -> Case:
    await ensure_voucher_key(ctx.gateway)
    info = SimulatedDevice.create().info()
    return Case("/v1/devices", {"wallet_id": await _wallet(ctx), "device_id": info["device_id"],
                                "public_key_pem": info["public_key_pem"], "model": info["model"]})


async def _new_user(ctx: Context) -> str:
    """A fresh teller for the user administration endpoints to act on."""
    username = f"authz-{secrets.token_hex(4)}"
    await runtime(ctx.gateway).database.write(
        lambda tx: add_user(tx, PasswordHasher(), username, Role.TELLER, "authz-user-password"))
    return username


async def _dead_delivery(ctx: Context) -> Case:
    """A risk event whose delivery to a webhook is dead (written as the delivery loop leaves it)."""
    event = RiskEvent("structuring", 1, "high", 80, "8123456789012344", {"transfer_ids": ["t_authz"]})

    def work(tx: Any) -> None:
        insert_event_in(tx, event)
        tx.execute("INSERT INTO risk_deliveries (event_id, endpoint, status, attempts, next_attempt_at, last_error) "
                   "VALUES (?, 'authz-hook', 'dead', 3, ?, 'HTTP 500')", (event.event_id, clock.now_iso()))

    await runtime(ctx.gateway).database.write(work)
    return Case(f"/v1/risk/deliveries/{event.event_id}/authz-hook/replay")


async def _report_case(ctx: Context) -> Case:
    """Yesterday's risk report, with a `report` key made once for the session's gateway."""
    gw = ctx.gateway
    keys = await _ok(await gw.client.get("/v1/keys", headers=gw.auth(Role.ADMIN)))
    if not any("report" in key["usage"] for key in keys["keys"]):
        await _ok(await gw.client.post("/v1/keys", json={"label": "authz-risk-report", "algorithm": "ecdsa-p256",
                                                         "usage": ["report"]}, headers=gw.auth(Role.ADMIN)), 201)
    return Case(f"/v1/risk/reports/{(clock.now().date() - timedelta(days=1)).isoformat()}")


async def _risk_event(ctx: Context) -> str:
    """A fresh open risk event that names the backend test client (so that client may read it), nobody else."""
    event = RiskEvent("notable", 1, "low", 25, "authz", {"first_seq": 0, "last_seq": 0},
                      parties=("client:test-backend",))
    await runtime(ctx.gateway).database.write(lambda tx: insert_event_in(tx, event))
    return event.event_id
AUTHZ_MEMBER = "AUTHZ-BANK"


async def _alliance(ctx: Context) -> None:
    """Make the shared gateway an alliance member: a member id, the alliance HMAC key in its token (the key
    ceremony, through the signer pool) and an `attest` key — once."""
    gw = ctx.gateway
    if gw.settings.alliance.member_id == AUTHZ_MEMBER:
        return
    pool: Any = runtime(gw).signer
    try:
        await pool.import_secret(gw.settings.alliance.hmac_key_label, os.urandom(32))
    except AmbiguousKey:  # imported by an earlier session on this token
        pass
    keys = (await _ok(await gw.client.get("/v1/keys", headers=gw.auth(Role.ADMIN))))["keys"]
    if not any("attest" in key["usage"] for key in keys):
        await _ok(await gw.client.post("/v1/keys", json={"label": "authz-attest", "algorithm": "ecdsa-p256",
                                                         "usage": ["attest"]}, headers=gw.auth(Role.ADMIN)), 201)
    gw.settings.alliance.member_id = AUTHZ_MEMBER


def _trade_document(purpose: str = "finance") -> dict[str, Any]:
    party = {"name": "Authz Trading Co.", "tax_id": "91310000MA1FL8XQ3X"}
    return {"document_type": "invoice", "document_sha256": _digest(), "purpose": purpose,
            "fields": {"issuer": party, "number": f"AUTHZ-{secrets.token_hex(6)}", "issue_date": "2026-01-15",
                       "amount_minor": 100_000, "currency": "CNY", "seller": party,
                       "buyer": {"name": "Authz Buyer Ltd.", "tax_id": "91110000600037341L"}}}


async def _attestation_case(ctx: Context) -> Case:
    await _alliance(ctx)
    return Case("/v1/attestations", _trade_document())


async def _attestation(ctx: Context) -> dict[str, Any]:
    await _alliance(ctx)
    return dict(await _ok(await ctx.gateway.client.post("/v1/attestations", json=_trade_document("notice"),
                                                        headers=ctx.gateway.auth(Role.BACKEND)), 201))


async def _verify_case(ctx: Context) -> Case:
    return Case("/v1/attestations/verify", {"attestation": (await _attestation(ctx))["attestation"]})


async def _feed_case(ctx: Context) -> Case:
    await _alliance(ctx)
    return Case("/v1/alliance/fingerprints", params={"after": "0", "nonce": secrets.token_hex(16)})


# The users behind each role that people hold (tests/conftest.py provisions them).
USER_OF_ROLE = {Role.TELLER: "teller1", Role.SUPERVISOR: "supervisor1", Role.AUDITOR: "auditor1",
                Role.ADMIN: "admin1"}

PUBLIC = None  # no credentials needed
EVERY_ROLE = frozenset(Role) - {Role.PEER}  # an alliance peer reads its fingerprint feed and nothing else
KEY_READERS = frozenset({Role.BACKEND, Role.TELLER, Role.SUPERVISOR, Role.AUDITOR, Role.ADMIN})
AUDIT_READERS = frozenset({Role.AUDITOR, Role.ADMIN})
WALLET_READERS = frozenset({Role.BACKEND, Role.TELLER, Role.SUPERVISOR, Role.AUDITOR})
BRANCH = frozenset({Role.TELLER, Role.SUPERVISOR})  # open wallets, cash in/out, tier change, freeze
TRANSFER_MAKERS = frozenset({Role.BACKEND, Role.TELLER, Role.SUPERVISOR})
TRANSFER_READERS = frozenset({Role.BACKEND, Role.TELLER, Role.SUPERVISOR, Role.AUDITOR})
# The backend reads approvals: the result of its own pending transfer or EVM transaction is there.
APPROVAL_READERS = frozenset({Role.BACKEND, Role.TELLER, Role.SUPERVISOR, Role.AUDITOR})
SUPERVISOR = frozenset({Role.SUPERVISOR})
# Hard wallets and reconciliation: tellers and supervisors operate; the auditor reads everything.
DEVICE_READERS = frozenset({Role.TELLER, Role.SUPERVISOR, Role.AUDITOR})
PEOPLE = frozenset({Role.TELLER, Role.SUPERVISOR, Role.AUDITOR, Role.ADMIN})  # roles a user can hold: log out
ADMIN = frozenset({Role.ADMIN})
# Risk: the institution-wide report and chart for supervisors and auditors; webhook deliveries for the admin
# who runs them (and the auditor, who reads everything).
RISK_REPORT_READERS = frozenset({Role.SUPERVISOR, Role.AUDITOR})
DELIVERY_READERS = frozenset({Role.AUDITOR, Role.ADMIN})
RISK_READERS = frozenset({Role.BACKEND, Role.SUPERVISOR, Role.AUDITOR})  # the backend: events naming it
RISK_TRIAGERS = frozenset({Role.SUPERVISOR, Role.AUDITOR})
ATTESTERS = frozenset({Role.BACKEND, Role.TELLER, Role.SUPERVISOR})  # trade-finance attestations
ATTESTATION_READERS = frozenset({Role.BACKEND, Role.TELLER, Role.SUPERVISOR, Role.AUDITOR})
PEERS = frozenset({Role.PEER})  # alliance members' gateways: the fingerprint feed, nothing else

Builder = Callable[[Context], Awaitable[Case]]

# One case per endpoint, keyed by "METHOD /path/template": who may call it according to docs/spec.md §5
# (written out here, independently of the GRANTS table it checks) and a builder of a request that
# succeeds when allowed, with fresh resources (wallets, transfers, approvals) where it changes them.
CASES: dict[str, tuple[frozenset[Role] | None, Builder]] = {
    "GET /healthz": (PUBLIC, _fixed(Case("/healthz"))),
    "GET /readyz": (PUBLIC, _fixed(Case("/readyz"))),
    "GET /metrics": (EVERY_ROLE, _fixed(Case("/metrics"))),
    "GET /openapi.json": (EVERY_ROLE, _fixed(Case("/openapi.json"))),
    "GET /docs": (PUBLIC, _fixed(Case("/docs"))),
    "GET /docs/assets/{name}": (PUBLIC, _fixed(Case("/docs/assets/docs.js"))),
    "GET /v1/status": (EVERY_ROLE, _fixed(Case("/v1/status"))),
    "POST /v1/sessions": (PUBLIC, _fixed(Case("/v1/sessions", {"username": "auditor1",
                                                               "password": PASSWORDS["auditor1"]}))),
    "DELETE /v1/sessions": (PEOPLE, _fixed(Case("/v1/sessions", own_session=True))),
    "POST /v1/users/{username}/disable": (ADMIN, lambda ctx: _built(ctx, "/v1/users/{}/disable", _new_user)),
    "POST /v1/users/{username}/enable": (ADMIN, lambda ctx: _built(ctx, "/v1/users/{}/enable", _new_user)),
    "POST /v1/users/{username}/role": (ADMIN, lambda ctx: _built(ctx, "/v1/users/{}/role", _new_user,
                                                                  {"role": "auditor"})),
    "DELETE /v1/users/{username}/sessions": (ADMIN, lambda ctx: _built(ctx, "/v1/users/{}/sessions", _new_user)),
    "POST /v1/keys": (frozenset({Role.ADMIN}), _sync(lambda ctx: Case(
        "/v1/keys", {"label": f"authz-{secrets.token_hex(6)}", "algorithm": "ecdsa-p256", "usage": ["raw"]}))),
    "GET /v1/keys": (KEY_READERS, _fixed(Case("/v1/keys"))),
    "GET /v1/keys/{key_id}": (KEY_READERS, _sync(lambda ctx: Case(f"/v1/keys/{ctx.keys['p256']['key_id']}"))),
    "POST /v1/keys/{key_id}/rotate": (frozenset({Role.ADMIN}), lambda ctx: _built(
        ctx, "/v1/keys/{}/rotate", lambda ctx: _id(_fresh_raw_key(ctx), "key_id"))),
    "POST /v1/keys/{key_id}/disable": (frozenset({Role.ADMIN}), lambda ctx: _built(
        ctx, "/v1/keys/{}/disable", lambda ctx: _id(_fresh_raw_key(ctx), "key_id"))),
    "POST /v1/keys/{key_id}/verify": (KEY_READERS, _sync(lambda ctx: Case(
        f"/v1/keys/{ctx.keys['p256']['key_id']}/verify", {"digest": _digest(), "signature": _digest() * 2}))),
    "GET /v1/keys/{key_id}/public": (KEY_READERS, _sync(lambda ctx: Case(
        f"/v1/keys/{ctx.keys['p256']['key_id']}/public", params={"format": "jwk"}))),
    "POST /v1/keys/{key_id}/sign": (frozenset({Role.BACKEND}), _sync(lambda ctx: Case(
        f"/v1/keys/{ctx.keys['p256']['key_id']}/sign", {"digest": _digest()}))),
    "POST /v1/sign/batch": (frozenset({Role.BACKEND}), _sync(lambda ctx: Case(
        "/v1/sign/batch", {"key_id": ctx.keys["k1"]["key_id"], "digests": [_digest(), _digest()]}))),
    "POST /v1/wallets": (BRANCH, _fixed(Case(
        "/v1/wallets", {"holder_name": "Han Meimei", "phone": "+8613900139000", "tier": 2, "kind": "corporate"}))),
    "GET /v1/wallets": (WALLET_READERS, _fixed(Case("/v1/wallets", params={"q": "Authz"}))),
    "GET /v1/wallets/{wallet_id}": (WALLET_READERS, lambda ctx: _built(ctx, "/v1/wallets/{}", _wallet)),
    "POST /v1/wallets/{wallet_id}/status": (BRANCH, lambda ctx: _built(
        ctx, "/v1/wallets/{}/status", _wallet, {"status": "frozen", "reason": "authorization test"})),
    "POST /v1/wallets/{wallet_id}/tier": (BRANCH, lambda ctx: _built(ctx, "/v1/wallets/{}/tier", _wallet,
                                                                      {"tier": 2})),
    "POST /v1/wallets/{wallet_id}/cash-in": (BRANCH, lambda ctx: _built(
        ctx, "/v1/wallets/{}/cash-in", _wallet, {"amount_fen": 500}, _idempotency())),
    "POST /v1/wallets/{wallet_id}/cash-out": (BRANCH, lambda ctx: _built(
        ctx, "/v1/wallets/{}/cash-out", lambda c: _wallet(c, funded=1_000), {"amount_fen": 500}, _idempotency())),
    "GET /v1/wallets/{wallet_id}/transactions": (WALLET_READERS, lambda ctx: _built(
        ctx, "/v1/wallets/{}/transactions", lambda c: _wallet(c, funded=1_000))),
    "POST /v1/transfers": (TRANSFER_MAKERS, _new_transfer),
    "GET /v1/transfers/{transfer_id}": (TRANSFER_READERS, lambda ctx: _built(
        ctx, "/v1/transfers/{}", lambda c: _id(_transfer(c), "transfer_id"))),
    "GET /v1/approvals": (APPROVAL_READERS, _fixed(Case("/v1/approvals", params={"status": "all"}))),
    "GET /v1/approvals/{approval_id}": (APPROVAL_READERS, lambda ctx: _built(
        ctx, "/v1/approvals/{}", lambda c: _id(_pending_approval(c, by_caller=True), "approval_id"))),
    "POST /v1/approvals/{approval_id}/approve": (SUPERVISOR, lambda ctx: _decision(ctx, "approve")),
    "POST /v1/approvals/{approval_id}/reject": (SUPERVISOR, lambda ctx: _decision(ctx, "reject")),
    "GET /v1/audit": (AUDIT_READERS, _fixed(Case("/v1/audit", params={"limit": "5"}))),
    "GET /v1/audit/verify": (AUDIT_READERS, _fixed(Case("/v1/audit/verify"))),
    "GET /v1/audit/checkpoints": (AUDIT_READERS, _fixed(Case("/v1/audit/checkpoints", params={"limit": "5"}))),
    "POST /v1/devices": (BRANCH, _register_case),
    "GET /v1/devices/{device_id}": (DEVICE_READERS, lambda ctx: _device_case(ctx, "")),
    "POST /v1/devices/{device_id}/loads": (BRANCH, lambda ctx: _device_case(
        ctx, "/loads", json={"amount_fen": 100}, headers=_idempotency())),
    "POST /v1/devices/{device_id}/certificate": (BRANCH, lambda ctx: _device_case(ctx, "/certificate")),
    "POST /v1/devices/{device_id}/sync": (BRANCH, _sync_case),
    "POST /v1/devices/{device_id}/unload": (BRANCH, _unload_case),
    "POST /v1/devices/{device_id}/revoke": (SUPERVISOR, lambda ctx: _device_case(
        ctx, "/revoke", json={"reason": "lost"})),
    "GET /v1/reconciliation/discrepancies": (DEVICE_READERS, _fixed(Case(
        "/v1/reconciliation/discrepancies", params={"status": "all"}))),
    "GET /v1/reconciliation/discrepancies/{discrepancy_id}": (DEVICE_READERS, lambda ctx: _built(
        ctx, "/v1/reconciliation/discrepancies/{}", _discrepancy)),
    "POST /v1/reconciliation/discrepancies/{discrepancy_id}/resolve": (SUPERVISOR, lambda ctx: _built(
        ctx, "/v1/reconciliation/discrepancies/{}/resolve", _discrepancy,
        {"resolution": "post", "note": "checked with the customer"})),
    "GET /v1/evm/chains": (frozenset({Role.BACKEND, Role.AUDITOR, Role.ADMIN}), _fixed(Case("/v1/evm/chains"))),
    "POST /v1/evm/transactions": (frozenset({Role.BACKEND}), _evm_transaction),
    "POST /v1/evm/typed-data": (frozenset({Role.BACKEND}), _evm_typed_data),
    "POST /v1/evm/rpc": (frozenset({Role.BACKEND, Role.AUDITOR, Role.ADMIN}), _fixed(Case(
        "/v1/evm/rpc", {"jsonrpc": "2.0", "id": 1, "method": "eth_accounts", "params": []}))),
    "POST /v1/evm/nonces/{chain_id}/{address}": (frozenset({Role.ADMIN}), _sync(lambda ctx: Case(
        f"/v1/evm/nonces/{SEPOLIA}/0x{secrets.token_hex(20)}", {"next_nonce": 0}))),
    "GET /v1/risk/deliveries": (DELIVERY_READERS, _fixed(Case("/v1/risk/deliveries", params={"status": "dead"}))),
    "POST /v1/risk/deliveries/{event_id}/{endpoint}/replay": (ADMIN, _dead_delivery),
    "GET /v1/risk/reports/{date}": (RISK_REPORT_READERS, _report_case),
    "GET /v1/risk/chart.png": (RISK_REPORT_READERS, _fixed(Case("/v1/risk/chart.png"))),
    "GET /v1/risk/events": (RISK_READERS, _fixed(Case("/v1/risk/events", params={"limit": "5"}))),
    "GET /v1/risk/events/{event_id}": (RISK_READERS, lambda ctx: _built(ctx, "/v1/risk/events/{}", _risk_event)),
    "GET /v1/risk/stream": (RISK_READERS, _fixed(Case("/v1/risk/stream"))),
    "POST /v1/risk/events/{event_id}/acknowledge": (RISK_TRIAGERS, lambda ctx: _built(
        ctx, "/v1/risk/events/{}/acknowledge", _risk_event, {"note": "seen"})),
    "POST /v1/risk/events/{event_id}/assign": (RISK_TRIAGERS, lambda ctx: _built(
        ctx, "/v1/risk/events/{}/assign", _risk_event, {"assignee": "auditor1"})),
    "POST /v1/risk/events/{event_id}/close": (RISK_TRIAGERS, lambda ctx: _built(
        ctx, "/v1/risk/events/{}/close", _risk_event, {"note": "checked"})),
    "POST /v1/attestations": (ATTESTERS, _attestation_case),
    "GET /v1/attestations": (ATTESTATION_READERS, _fixed(Case("/v1/attestations", params={"number": "AUTHZ"}))),
    "GET /v1/attestations/hits": (ATTESTATION_READERS, _fixed(Case("/v1/attestations/hits"))),
    "GET /v1/attestations/{attestation_id}": (ATTESTATION_READERS, lambda ctx: _built(
        ctx, "/v1/attestations/{}", lambda c: _id(_attestation(c), "attestation_id"))),
    "POST /v1/attestations/verify": (ATTESTATION_READERS, _verify_case),
    "GET /v1/alliance/fingerprints": (PEERS, _feed_case),
    "GET /v1/alliance/status": (ATTESTATION_READERS, _fixed(Case("/v1/alliance/status"))),
}

ENDPOINTS = {endpoint.name: endpoint for endpoint in all_endpoints()}
CALLERS: list[Role | str] = [*Role, ANONYMOUS]


def test_every_endpoint_has_a_case() -> None:
    missing = set(ENDPOINTS) - set(CASES)
    stale = set(CASES) - set(ENDPOINTS)
    assert not missing, f"endpoints without an authorization case: {sorted(missing)}"
    assert not stale, f"cases for endpoints that no longer exist: {sorted(stale)}"


def test_every_role_is_walked() -> None:
    assert set(CALLERS) == {*Role, ANONYMOUS}


async def _refusals(gateway: Gateway, request_id: str) -> list[dict[str, Any]]:
    rows = await runtime(gateway).database.read(
        lambda tx: tx.fetchall("SELECT actor, action, decision, reasons FROM audit_log WHERE request_id = ?",
                               (request_id,))
    )
    return [dict(row) for row in rows]


@pytest.mark.parametrize("caller", CALLERS, ids=str)
@pytest.mark.parametrize("name", sorted(ENDPOINTS))
async def test_endpoint_for_caller(
    gateway: Gateway, raw_keys: dict[str, Any], name: str, caller: Role | str
) -> None:
    endpoint = ENDPOINTS[name]
    assert name in CASES, f"no authorization case for {name}: add one to CASES"
    spec_roles, build = CASES[name]
    case = await build(Context(gateway, raw_keys, caller))
    # The grants table must say what the spec says: the server decides with `allows`.
    assert (endpoint.permission is None) == (spec_roles is None), f"{name}: public in one, not the other"
    if isinstance(caller, Role) and endpoint.permission is not None and spec_roles is not None:
        assert allows(caller, endpoint.permission) == (caller in spec_roles), (
            f"{name}: GRANTS gives {caller} {endpoint.permission} = {allows(caller, endpoint.permission)}; "
            f"docs/spec.md §5 says {caller in spec_roles}"
        )
    request_id = f"authz-{secrets.token_hex(8)}"
    headers = {"X-Request-Id": request_id}
    if isinstance(caller, Role):
        headers |= gateway.auth(caller)
        if case.own_session and caller in USER_OF_ROLE:  # never end the sessions the other tests share
            headers |= await login(gateway, USER_OF_ROLE[caller])
    headers |= case.headers
    response = await gateway.client.request(
        endpoint.method, case.path, json=case.json, data=case.data, params=case.params, headers=headers
    )
    if response.content_type == "text/event-stream":  # a live stream never ends: its status says it all
        text = ""
        response.close()
    else:
        text = (await response.read()).decode("utf-8", "replace")  # some successes are binary (PNG, COSE)
    assert response.headers["X-Request-Id"] == request_id

    if endpoint.permission is None or (isinstance(caller, Role) and allows(caller, endpoint.permission)):
        assert response.status == endpoint.response_status, f"{name} as {caller}: {response.status} {text}"
        assert response.content_type != "application/problem+json"
        return
    if caller == ANONYMOUS:
        await assert_problem(response, 401, "unauthenticated")
        assert response.headers["WWW-Authenticate"].lower().startswith("bearer")
        return
    problem = await assert_problem(response, 403)
    assert problem["type"].endswith("/forbidden"), text
    if endpoint.audited_action is not None:
        refusals = await _refusals(gateway, request_id)
        assert len(refusals) == 1, refusals
        assert refusals[0]["action"] == endpoint.audited_action
        assert refusals[0]["decision"] == "refused"
        assert json.loads(refusals[0]["reasons"])[0] == "forbidden"


async def test_signing_as_allowed_role_really_signs(gateway: Gateway, raw_keys: dict[str, Any]) -> None:
    """Guard against a table that passes because every request silently did nothing."""
    case = await CASES["POST /v1/keys/{key_id}/sign"][1](Context(gateway, raw_keys))
    response = await gateway.client.post(case.path, json=case.json, headers=gateway.auth(Role.BACKEND))
    assert response.status == 200, await response.text()
    assert len(bytes.fromhex((await response.json())["signature"])) == 64


async def test_revoked_api_client_is_unauthenticated(gateway: Gateway) -> None:
    name, headers = await new_client(gateway, Role.BACKEND, "authz-revoked")
    response = await gateway.client.get("/v1/keys", headers=headers)
    assert response.status == 200, await response.text()

    await runtime(gateway).database.write(lambda tx: revoke_client(tx, name))
    response = await gateway.client.get("/v1/keys", headers=headers)
    await assert_problem(response, 401, "unauthenticated")
    assert "WWW-Authenticate" in response.headers


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer garbage",
        "Bearer ecny_000000000000_" + "A" * 43,  # well-formed, unknown prefix
        "Bearer ecnys_" + "B" * 43,  # looks like a session token, is none
        "Bearer ",
        "Basic dGVsbGVyMTp0ZWxsZXItcGFzc3dvcmQtMQ==",
        "garbage",
    ],
)
async def test_bad_credentials_are_unauthenticated(gateway: Gateway, authorization: str) -> None:
    response = await gateway.client.get("/v1/keys", headers={"Authorization": authorization})
    await assert_problem(response, 401, "unauthenticated")
    assert "WWW-Authenticate" in response.headers


async def test_api_key_of_one_client_with_secret_of_another_is_refused(gateway: Gateway) -> None:
    """Only the prefix is a lookup key: a right prefix with a wrong secret must not pass."""
    token = gateway.auth(Role.BACKEND)["Authorization"].removeprefix("Bearer ")
    prefix, _, secret = token.rpartition("_")
    forged = f"{prefix}_{'x' * len(secret)}"
    response = await gateway.client.get("/v1/keys", headers={"Authorization": f"Bearer {forged}"})
    await assert_problem(response, 401, "unauthenticated")


async def _login(gateway: Gateway, username: str, password: str) -> str:
    response = await gateway.client.post("/v1/sessions", json={"username": username, "password": password})
    assert response.status == 201, await response.text()
    return str((await response.json())["token"])


async def test_expired_session_is_unauthenticated(gateway: Gateway) -> None:
    token = await _login(gateway, "teller1", PASSWORDS["teller1"])
    headers = {"Authorization": f"Bearer {token}"}
    response = await gateway.client.get("/v1/keys", headers=headers)
    assert response.status == 200, await response.text()

    past = clock.after(-60)
    changed = await runtime(gateway).database.write(
        lambda tx: tx.execute(
            "UPDATE user_sessions SET expires_at = ? WHERE token_hash = ?",
            (past, hashlib.sha256(token.encode()).digest()),
        )
    )
    assert changed == 1
    response = await gateway.client.get("/v1/keys", headers=headers)
    await assert_problem(response, 401, "unauthenticated")
    assert "WWW-Authenticate" in response.headers


async def test_session_of_disabled_user_is_unauthenticated(gateway: Gateway) -> None:
    username, password = f"teller-{secrets.token_hex(4)}", "a-long-enough-password"
    hasher = PasswordHasher()
    await runtime(gateway).database.write(lambda tx: add_user(tx, hasher, username, Role.TELLER, password))
    headers = {"Authorization": f"Bearer {await _login(gateway, username, password)}"}
    assert (await gateway.client.get("/v1/keys", headers=headers)).status == 200

    await runtime(gateway).database.write(
        lambda tx: tx.execute("UPDATE users SET disabled_at = ? WHERE username = ?", (clock.now_iso(), username))
    )
    await assert_problem(await gateway.client.get("/v1/keys", headers=headers), 401, "unauthenticated")
    response = await gateway.client.post("/v1/sessions", json={"username": username, "password": password})
    await assert_problem(response, 401, "unauthenticated")


async def test_wrong_password_is_unauthenticated(gateway: Gateway) -> None:
    response = await gateway.client.post("/v1/sessions", json={"username": "teller1", "password": "not-the-password"})
    await assert_problem(response, 401, "unauthenticated")
    response = await gateway.client.post("/v1/sessions", json={"username": "nobody", "password": "whatever-it-is"})
    await assert_problem(response, 401, "unauthenticated")
