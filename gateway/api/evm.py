"""Stablecoins: the chain registry, EVM transactions, EIP-712 typed data and the admin's next nonce.

A transaction is checked and recorded with its nonce in one store transaction and signed after
commit (see :mod:`gateway.evm.transactions`); the Idempotency-Key record points at the transaction until
the signature is stored, so a retry after a crash signs the same transaction, never a new nonce.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.api import idempotency
from gateway.api.call import Call
from gateway.api.codecs import json_response
from gateway.api.endpoints import Endpoint
from gateway.api.evm_models import (
    ChainList,
    EvmTransactionDocument,
    EvmTransactionRequest,
    NonceDocument,
    NonceRequest,
    TypedDataRequest,
    TypedDataSignature,
)
from gateway.auth.roles import Permission
from gateway.errors import ValidationFailed
from gateway.evm.drafts import Erc20Fields, TransactionFields, draft_of
from gateway.evm.typed_data import TypedDataDraft
from gateway.keys import KeyRecord, Usage
from gateway.policy import evm as policy
from gateway.policy.chains import EvmChainSettings
from gateway.schemes.evm.eip712 import parse_typed_data
from gateway.schemes.evm.values import checksum, parse_address


async def _evm_key(call: Call, key_id: str) -> KeyRecord:
    return await call.runtime.keys.for_signing(call.runtime.database, key_id, Usage.EVM)


def transaction_fields(body: EvmTransactionRequest) -> TransactionFields:
    erc20 = body.erc20
    return TransactionFields(
        body.type, body.nonce, body.gas_limit, body.max_fee_per_gas, body.max_priority_fee_per_gas, body.gas_price,
        body.to, body.value, body.data,
        None if erc20 is None else Erc20Fields(erc20.token, erc20.method, erc20.to, erc20.amount),
    )


async def create_transaction(call: Call) -> web.Response:
    body: EvmTransactionRequest = call.body
    key = await _evm_key(call, body.key_id)
    chain = policy.require_chain(call.runtime.settings.evm, body.chain_id)
    draft = draft_of(transaction_fields(body), key, chain)
    entry = call.audit_entry("evm.transactions.create", decision="allowed", payload_hash=call.payload_hash())
    return idempotency.render(await call.runtime.evm.transact(call.idempotent, draft, entry))


async def resume_transaction(call: Call, transaction_id: str) -> web.Response:
    """Replay of a request whose transaction was recorded but whose response was not final (a crash
    between commit and signing): sign the same transaction now — same nonce — and answer as the first
    request would have."""
    return idempotency.render(await call.runtime.evm.resume(transaction_id, call.idempotent))


async def sign_typed_data(call: Call) -> web.Response:
    """Read, check and record an EIP-712 request; sign it now (200) or park it for a supervisor (202)."""
    body: TypedDataRequest = call.body
    key = await _evm_key(call, body.key_id)
    chain = policy.require_chain(call.runtime.settings.evm, body.chain_id)
    draft = TypedDataDraft(key, chain, body.typed_data, parse_typed_data(body.typed_data))
    entry = call.audit_entry("evm.typed_data.sign", decision="allowed", payload_hash=call.payload_hash())
    return idempotency.render(await call.runtime.typed_data.request(call.idempotent, draft, entry))


async def resume_typed_data(call: Call, request_id: str) -> web.Response:
    """Replay of an EIP-712 request recorded but not signed when the first request ended: sign it now."""
    return idempotency.render(await call.runtime.typed_data.signed.resume(request_id, call.idempotent))


async def set_next_nonce(call: Call) -> web.Response:
    try:
        chain_id = int(call.request.match_info["chain_id"])
    except ValueError:
        raise ValidationFailed("chain_id must be a decimal integer") from None
    chain = policy.require_chain(call.runtime.settings.evm, chain_id)
    address = checksum(parse_address(call.request.match_info["address"], "address"))
    body: NonceRequest = call.body
    entry = call.audit_entry("evm.nonces.set", decision="allowed", payload_hash=call.payload_hash())
    transactions = call.runtime.evm
    result = await call.runtime.database.write(
        lambda tx: transactions.set_next_nonce_in(tx, chain.chain_id, address, body.next_nonce, entry))
    return json_response(result)


def _units(value: int | None) -> str | None:
    return None if value is None else str(value)


def chain_document(chain: EvmChainSettings) -> dict[str, Any]:
    native = chain.native
    return {
        "chain_id": chain.chain_id, "name": chain.name,
        "native": {"symbol": native.symbol, "decimals": native.decimals, "per_tx_cap": _units(native.per_tx_cap),
                   "daily_cap": _units(native.daily_cap)},
        "approval_threshold": _units(chain.approval_threshold),
        "tokens": [{"address": token.address, "symbol": token.symbol, "decimals": token.decimals,
                    "per_tx_cap": _units(token.per_tx_cap), "daily_cap": _units(token.daily_cap),
                    "approval_threshold": _units(token.approval_threshold), "example": token.example}
                   for token in chain.tokens],
        "recipient_allowlist": list(chain.recipient_allowlist),
        "recipient_denylist": list(chain.recipient_denylist),
        "typed_data_domains": [{"verifying_contract": domain.verifying_contract, "name": domain.name,
                                "version": domain.version, "primary_types": list(domain.primary_types)}
                               for domain in chain.typed_data_domains],
        "fees": {"max_fee_per_gas": str(chain.fees.max_fee_per_gas), "max_gas_limit": chain.fees.max_gas_limit,
                 "max_total_fee": str(chain.fees.max_total_fee)},
        "example": chain.example,
    }


async def list_chains(call: Call) -> web.Response:
    return json_response([chain_document(chain) for chain in call.runtime.settings.evm.chains])


ENDPOINTS = [
    Endpoint("GET", "/v1/evm/chains", list_chains, "The chain registry: chains, tokens, caps and lists",
             Permission.EVM_READ, "evm", response_model=ChainList, audited_action="evm.chains.list"),
    Endpoint("POST", "/v1/evm/transactions", create_transaction,
             "Sign an EIP-1559 or legacy EVM transaction (raw or an ERC-20 intent) with a gap-free nonce",
             Permission.EVM_SIGN, "evm", request_model=EvmTransactionRequest, response_model=EvmTransactionDocument,
             idempotency="required", resume=resume_transaction, audited_action="evm.transactions.create",
             responses={202: "Pending a supervisor's approval (status pending_approval, approval_id)",
                        409: "Nonce already used or out of sequence; Idempotency-Key reused",
                        422: "Refused by policy (unknown chain, token or contract; cap; fee cap; recipient)"}),
    Endpoint("POST", "/v1/evm/typed-data", sign_typed_data,
             "Sign EIP-712 typed data: a decoded permit or authorisation within the token's caps, or a listed type "
             "after approval", Permission.EVM_SIGN, "evm", request_model=TypedDataRequest,
             response_model=TypedDataSignature, idempotency="optional", resume=resume_typed_data,
             audited_action="evm.typed_data.sign",
             responses={202: "Pending a supervisor's approval (status pending_approval, approval_id)",
                        400: "Not EIP-712, or a type graph too large or too deep (typed-data-too-complex)",
                        422: "Domain or type not allowed; a cap, daily cap or recipient list refuses the intent"}),
    Endpoint("POST", "/v1/evm/nonces/{chain_id}/{address}", set_next_nonce,
             "Set the next nonce of an address (admin; audited)", Permission.EVM_NONCES, "evm",
             request_model=NonceRequest, response_model=NonceDocument, idempotency="optional",
             audited_action="evm.nonces.set",
             responses={409: "A transaction at or above the nonce awaits approval", 422: "Unknown chain"}),
]
