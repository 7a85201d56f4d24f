"""The Ethereum JSON-RPC signer (``POST /v1/evm/rpc``): what each method does, below the HTTP API.

Web3Signer-style: ethers, web3.py and alloy point a JSON-RPC provider at the gateway and sign with its
keys. Every signing method reaches the same flow as its HTTP endpoint, so the JSON-RPC path has no
control of its own to get wrong:

- ``eth_signTransaction`` / ``eth_sendTransaction``: the transaction object is read into
  :class:`~gateway.evm.drafts.TransactionFields` and :func:`~gateway.evm.drafts.draft_of`, then
  :meth:`EvmTransactions.transact <gateway.evm.transactions.EvmTransactions.transact>`: the same policy,
  fee caps, approvals and gap-free nonce allocator as ``POST /v1/evm/transactions`` (a ``nonce`` the
  caller gives must be the allocator's);
- ``eth_signTypedData`` / ``eth_signTypedData_v4``: :meth:`EvmTypedData.request
  <gateway.evm.typed_data.EvmTypedData.request>`, as ``POST /v1/evm/typed-data``;
- ``personal_sign`` / ``eth_sign``: :mod:`gateway.evm.messages` (EIP-191), only keys of usage ``message``.

Each signing call is idempotent: under the request's ``Idempotency-Key`` (one call per HTTP request),
or else under a key derived from the call itself (principal + SHA-256 of the canonical call, ``id``
included), so a client's retransmission of the same call returns the same signature and never
allocates a second nonce. Refusals are audited like the HTTP endpoints'. The route
(:mod:`gateway.api.evm_rpc`) only reads the envelope and renders; :func:`rpc_error` is the one mapping
from the error tree to JSON-RPC error objects.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import structlog

from gateway.audit.chain import AuditEntry, AuditLog
from gateway.auth.credentials import Principal
from gateway.auth.roles import Permission, allows
from gateway.config import Settings
from gateway.errors import (
    AmbiguousKey,
    EvmAccountNotFound,
    EvmApprovalPending,
    EvmNonceBehindChain,
    EvmUpstreamFailed,
    Forbidden,
    GatewayError,
    IdempotencyRaced,
    InvalidJson,
    InvalidRpcParams,
    InvalidRpcRequest,
    NoDefaultChain,
    NonceConflict,
    RpcMethodNotFound,
)
from gateway.evm.drafts import TransactionFields, draft_of
from gateway.evm.messages import MAX_MESSAGE_BYTES, EvmMessages, MessageDraft, MessageMethod
from gateway.evm.transactions import EvmTransactions
from gateway.evm.typed_data import EvmTypedData, TypedDataDraft
from gateway.evm.upstream import UpstreamNode
from gateway.keys import KeyDirectory, KeyRecord, Usage, evm_address, signing_keys_with_usage
from gateway.ledger.store import Database, Tx
from gateway.metrics import Metrics
from gateway.operations import idempotency as records
from gateway.operations.idempotency import Answer, IdempotentRequest, InFlight
from gateway.policy import evm as policy
from gateway.policy.chains import EvmChainSettings
from gateway.risk.signals import record_signal_in
from gateway.schemes.evm.eip712 import parse_typed_data
from gateway.schemes.evm.transactions import MAX_NONCE, TxType
from gateway.schemes.evm.values import checksum, parse_address

# --- JSON-RPC error codes -------------------------------------------------------------------------

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
APPROVAL_PENDING = -32010
SERVER_ERROR = -32000
#: The server range (-32000..-32099) by the HTTP status the same problem has on the HTTP API.
SERVER_CODES: Mapping[int, int] = {403: -32003, 404: -32004, 409: -32009, 422: -32022, 429: -32029,
                                   500: -32050, 502: -32052, 503: -32053, 504: -32054}


def rpc_code(error: GatewayError) -> int:
    """The JSON-RPC error code of a problem (the table is in docs/evm.md)."""
    if isinstance(error, InvalidJson):
        return PARSE_ERROR
    if isinstance(error, InvalidRpcRequest):
        return INVALID_REQUEST
    if isinstance(error, RpcMethodNotFound):
        return METHOD_NOT_FOUND
    if isinstance(error, EvmApprovalPending):
        return APPROVAL_PENDING
    if error.http_status == 400:
        return INVALID_PARAMS
    return SERVER_CODES.get(error.http_status, SERVER_ERROR)


def rpc_error(error: GatewayError, request_id: str) -> dict[str, Any]:
    """A JSON-RPC error object; ``data`` carries the problem (type URI, code, HTTP status, extras). A
    server-side failure (5xx) says only what failed: the details are logged under ``request_id``."""
    message = error.detail
    if error.http_status >= 500:
        message = f"{error.title}; the gateway log has the details under request id {request_id}"
    data = {"type": error.type_uri, "code": error.code, "status": error.http_status, **error.extra,
            "request_id": request_id}
    return {"code": rpc_code(error), "message": message, "data": data}


# --- reading params -------------------------------------------------------------------------------

_QUANTITY = re.compile(r"^0x(0|[1-9a-fA-F][0-9a-fA-F]{0,63})$")
_HEX_DATA = re.compile(r"^0x([0-9a-fA-F]{2})*$")

TRANSACTION_FIELDS = frozenset({"from", "to", "gas", "gasPrice", "maxFeePerGas", "maxPriorityFeePerGas", "value",
                                "data", "input", "nonce", "chainId", "type", "accessList"})
"""The transaction object's fields; any other (``blobVersionedHashes``, ``authorizationList``…) is refused,
never dropped: the client would believe it signed what the gateway left out."""
TX_TYPES: Mapping[int, TxType] = {0: "legacy", 2: "eip1559"}


def quantity(value: Any, field: str) -> int:
    """A JSON-RPC quantity: 0x-hex without leading zeros, at most 256 bits. Raises InvalidRpcParams
    (a JSON number or a decimal string is refused: ``"10"`` would be ten to one client, sixteen to another)."""
    if not isinstance(value, str) or not _QUANTITY.fullmatch(value):
        raise InvalidRpcParams(f"{field}: expected a 0x-hex quantity without leading zeros, got "
                               f"{str(value)[:40]!r}")
    return int(value, 16)


def hex_data(value: Any, field: str, limit: int) -> bytes:
    """0x-hex bytes of at most ``limit`` bytes. Raises InvalidRpcParams."""
    if not isinstance(value, str) or not _HEX_DATA.fullmatch(value):
        raise InvalidRpcParams(f"{field}: expected 0x-hex bytes")
    data = bytes.fromhex(value[2:])
    if len(data) > limit:
        raise InvalidRpcParams(f"{field}: more than {limit} bytes")
    return data


def _positional(params: Any, method: str, least: int, most: int) -> list[Any]:
    if params is None:
        params = []
    if not isinstance(params, list) or not least <= len(params) <= most:
        count = str(least) if least == most else f"{least} to {most}"
        raise InvalidRpcParams(f"{method} takes an array of {count} params")
    return params


@dataclass(frozen=True)
class RpcTransaction:
    """A JSON-RPC transaction object, read: who signs, on which chain, and the fields as requested."""

    sender: str  # EIP-55
    chain_id: int | None
    fields: TransactionFields


def read_transaction(value: Any) -> RpcTransaction:
    """Read a transaction object (Ethereum execution API ``GenericTransaction``) into request fields.

    ``type`` 0x0 is legacy (``gasPrice``), 0x2 EIP-1559 (``maxFeePerGas``, ``maxPriorityFeePerGas``);
    without ``type``, ``gasPrice`` means legacy. An access list must be empty. ``data`` and ``input``
    may both be given only when equal. Raises InvalidRpcParams, InvalidAddress.
    """
    if not isinstance(value, dict):
        raise InvalidRpcParams("the transaction must be an object")
    unknown = sorted(set(value) - TRANSACTION_FIELDS)
    if unknown:
        raise InvalidRpcParams(f"transaction fields not signed by the gateway: {', '.join(unknown)[:200]}")
    if "from" not in value:
        raise InvalidRpcParams("transaction.from is required: the address of the key to sign with")
    sender = checksum(parse_address(value["from"], "from"))
    if value.get("accessList") not in (None, []):
        raise InvalidRpcParams("transaction.accessList: access lists are not signed; send an empty list")
    if "type" in value:
        tx_type = TX_TYPES.get(quantity(value["type"], "type"))
        if tx_type is None:
            raise InvalidRpcParams("transaction.type: only 0x0 (legacy) and 0x2 (EIP-1559) are signed")
    else:
        tx_type = "legacy" if "gasPrice" in value else "eip1559"
    data, calldata = value.get("data"), value.get("input")
    if any(field is not None and not isinstance(field, str) for field in (data, calldata)):
        raise InvalidRpcParams("transaction.data / transaction.input: expected 0x-hex bytes")
    if data is not None and calldata is not None and data.lower() != calldata.lower():
        raise InvalidRpcParams("transaction.data and transaction.input differ")
    data = data if data is not None else calldata
    to = value.get("to")
    if to is not None and not isinstance(to, str):
        raise InvalidRpcParams("transaction.to: expected an address")

    def decimal(name: str) -> str | None:
        return None if value.get(name) is None else str(quantity(value[name], name))

    nonce = None if value.get("nonce") is None else quantity(value["nonce"], "nonce")
    if nonce is not None and nonce > MAX_NONCE:
        raise InvalidRpcParams(f"nonce: at most {MAX_NONCE}")
    gas = None if value.get("gas") is None else quantity(value["gas"], "gas")
    chain_id = None if value.get("chainId") is None else quantity(value["chainId"], "chainId")
    fields = TransactionFields(tx_type, nonce, gas, decimal("maxFeePerGas"), decimal("maxPriorityFeePerGas"),
                               decimal("gasPrice"), to, decimal("value"), data, None)
    return RpcTransaction(sender, chain_id, fields)


def read_typed_data_param(value: Any) -> dict[str, Any]:
    """An EIP-712 document as an object or as its JSON text (ethers sends text). Raises InvalidRpcParams."""
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            raise InvalidRpcParams("typed data: not a JSON document") from None
    if not isinstance(value, dict):
        raise InvalidRpcParams("typed data: expected an EIP-712 object {types, primaryType, domain, message} "
                               "(the v1 array format is not signed)")
    return value


def typed_data_chain(document: Mapping[str, Any]) -> int | None:
    """The chain id of a typed-data domain (a number, a decimal or a 0x-hex string), or None."""
    domain = document.get("domain")
    raw = domain.get("chainId") if isinstance(domain, dict) else None
    if raw is None:
        return None
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.startswith("0x"):
        return quantity(raw, "domain.chainId")
    if isinstance(raw, str) and raw.isdigit() and len(raw) <= 78:
        return int(raw)
    raise InvalidRpcParams("domain.chainId: expected an integer")


def read_message(value: Any) -> bytes:
    """A personal message: 0x-hex bytes, or else text (taken as UTF-8, as wallets do)."""
    if not isinstance(value, str):
        raise InvalidRpcParams("message: expected 0x-hex bytes or text")
    if _HEX_DATA.fullmatch(value):
        return hex_data(value, "message", MAX_MESSAGE_BYTES)
    data = value.encode()
    if len(data) > MAX_MESSAGE_BYTES:
        raise InvalidRpcParams(f"message: more than {MAX_MESSAGE_BYTES} bytes")
    return data


def canonical(document: Any) -> bytes:
    return orjson.dumps(document, option=orjson.OPT_SORT_KEYS)


# --- the dispatcher --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RpcCall:
    """One call of a request (a batch has several). ``id`` is absent for a notification."""

    method: str
    params: Any
    id: Any

    def canonical(self) -> bytes:
        return canonical({"id": self.id, "method": self.method, "params": self.params})


@dataclass(frozen=True)
class RpcCaller:
    """Who calls, for this HTTP request: its principal, request id and (single calls only) Idempotency-Key."""

    principal: Principal
    request_id: str
    idempotency_key: str | None
    inflight: InFlight

    def entry(self, action: str, call: RpcCall) -> AuditEntry:
        return AuditEntry(actor=self.principal.scope, role=self.principal.role.value, action=action,
                          decision="allowed", payload_hash=hashlib.sha256(call.canonical()).hexdigest(),
                          request_id=self.request_id)


Method = Callable[[RpcCaller, RpcCall], Awaitable[Any]]


@dataclass(frozen=True)
class MethodSpec:
    run: Method
    permission: Permission
    action: str | None  # audited action of a signing method (its refusals are audited too)


class EvmRpc:
    """The JSON-RPC methods of one gateway process."""

    def __init__(self, settings: Settings, database: Database, keys: KeyDirectory, transactions: EvmTransactions,
                 typed_data: EvmTypedData, messages: EvmMessages, audit: AuditLog, metrics: Metrics) -> None:
        self.settings = settings
        self.database = database
        self.keys = keys
        self.transactions = transactions
        self.typed_data = typed_data
        self.messages = messages
        self.audit = audit
        self.metrics = metrics
        rpc = settings.evm_rpc
        self.upstream = (None if rpc.upstream_url is None
                         else UpstreamNode(rpc.upstream_url, rpc.upstream_timeout_seconds))
        self.methods: dict[str, MethodSpec] = {
            "eth_accounts": MethodSpec(self._accounts, Permission.EVM_READ, None),
            "eth_chainId": MethodSpec(self._chain_id, Permission.EVM_READ, None),
            "eth_signTransaction": MethodSpec(self._sign_transaction, Permission.EVM_SIGN, "evm.rpc.sign_transaction"),
            "eth_signTypedData": MethodSpec(self._sign_typed_data, Permission.EVM_SIGN, "evm.rpc.sign_typed_data"),
            "eth_signTypedData_v4": MethodSpec(self._sign_typed_data, Permission.EVM_SIGN, "evm.rpc.sign_typed_data"),
            "personal_sign": MethodSpec(self._personal_sign, Permission.EVM_SIGN, "evm.rpc.sign_message"),
            "eth_sign": MethodSpec(self._eth_sign, Permission.EVM_SIGN, "evm.rpc.sign_message"),
        }
        if self.upstream is not None:
            self.methods["eth_sendTransaction"] = MethodSpec(self._send_transaction, Permission.EVM_SIGN,
                                                             "evm.rpc.send_transaction")

    async def close(self) -> None:
        if self.upstream is not None:
            await self.upstream.close()

    async def call(self, caller: RpcCaller, call: RpcCall) -> Any:
        """The result of one call.

        Raises:
            GatewayError: the problem, for :func:`rpc_error` (RpcMethodNotFound for an unknown method,
            EvmApprovalPending for a call parked for a supervisor).
        """
        spec = self.methods.get(call.method)
        if spec is None:
            hint = " (no evm_rpc.upstream_url is configured)" if call.method == "eth_sendTransaction" else ""
            raise RpcMethodNotFound(f"method {call.method[:64]!r} is not offered by the signer{hint}")
        try:
            if not allows(caller.principal.role, spec.permission):
                raise Forbidden(f"role {caller.principal.role.value!r} may not {spec.permission.value}")
            return await spec.run(caller, call)
        except GatewayError as error:
            self.metrics.refusals.labels(error.code).inc()
            if spec.action is not None and 400 <= error.http_status < 500:
                await self._audit_refusal(caller, call, spec.action, error)
            if error.http_status >= 500:
                structlog.get_logger("gateway.evm.rpc").error(
                    "json-rpc call failed", request_id=caller.request_id, method=call.method, code=error.code,
                    detail=error.detail)
            raise

    async def _audit_refusal(self, caller: RpcCaller, call: RpcCall, action: str, error: GatewayError) -> None:
        entry = caller.entry(action, call)
        entry.decision = "refused"
        entry.reasons = [error.code, *(str(reason) for reason in error.extra.get("reasons", ()))]
        entry.result = {"method": call.method, "detail": error.detail[:500]}
        try:
            await self.audit.record(entry)
        except GatewayError as exc:  # the refusal stands even if its audit entry cannot be written
            structlog.get_logger("gateway.audit").error("refusal not audited", error=exc.detail, action=action)

    # --- helpers -----------------------------------------------------------------------------

    def _chain(self, chain_id: int | None) -> EvmChainSettings:
        """The named chain, or the default one. Raises NoDefaultChain, UnknownChain."""
        if chain_id is None:
            chain_id = self.settings.evm_rpc.default_chain_id
            if chain_id is None:
                raise NoDefaultChain("name the chain (chainId) or set evm_rpc.default_chain_id")
        return policy.require_chain(self.settings.evm, chain_id)

    async def account(self, address: str, usage: Usage) -> KeyRecord:
        """The one key of ``usage`` whose address is ``address``.

        Raises:
            InvalidAddress; EvmAccountNotFound; AmbiguousKey (two keys of the usage share the address).
        """
        wanted = checksum(parse_address(address, "address"))
        matches = [key for key in await self.database.read(lambda tx: signing_keys_with_usage(tx, usage))
                   if evm_address(key.public_key) == wanted]
        if not matches:
            raise EvmAccountNotFound(f"no key of usage {usage.value!r} has address {wanted}")
        if len(matches) > 1:
            raise AmbiguousKey(f"{len(matches)} keys of usage {usage.value!r} have address {wanted}")
        return await self.keys.get(self.database, matches[0].key_id)

    def _idempotent_request(self, caller: RpcCaller, call: RpcCall) -> IdempotentRequest:
        """The call's Idempotency-Key: the header's (the hash covers method and params, so a retry with
        a new JSON-RPC id replays), else one derived from the whole call (an exact retransmission replays)."""
        if caller.idempotency_key is not None:
            digest = hashlib.sha256(b"evm-rpc\n" + canonical({"method": call.method, "params": call.params}))
            return IdempotentRequest(caller.principal.scope, caller.idempotency_key, digest.digest())
        digest = hashlib.sha256(b"evm-rpc\n" + call.canonical())
        return IdempotentRequest(caller.principal.scope, "evm-rpc:" + digest.hexdigest(), digest.digest())

    async def _once(self, caller: RpcCaller, call: RpcCall, work: Callable[[IdempotentRequest], Awaitable[Answer]],
                    resume: Callable[[str, IdempotentRequest], Awaitable[Answer]]) -> Answer:
        """Run ``work`` once for the call's key; a replay answers as the first call did (finishing
        recorded work that was not signed yet, as the HTTP endpoints' resume does)."""
        request = self._idempotent_request(caller, call)
        async with records.claimed(caller.inflight, request):
            found = await records.find(self.database, request)
            if found is None:
                try:
                    return await work(request)
                except IdempotencyRaced:
                    found = await records.find(self.database, request)
                    if found is None:
                        raise
            if found.content_type == records.REFERENCE:
                return await resume(found.body.decode(), request)
            return Answer(found.status, orjson.loads(found.body))

    @staticmethod
    async def _decided(parked: Answer, reference: Callable[[str], Awaitable[Answer]], id_field: str) -> Answer:
        """A call parked for a supervisor, replayed: its answer now — signed once approved (signing it
        there and then if the approval left it unsigned), still parked, or refused (rejected, expired,
        failed: NonceConflict, as ``POST /v1/evm/transactions`` answers such a transaction)."""
        current = await reference(parked.document[id_field])
        status = current.document["status"]
        if status == "pending_approval":
            return parked
        if status != "signed":
            raise NonceConflict(f"the call's {id_field} {parked.document[id_field]} is {status} and will not be "
                                "signed", **{id_field: parked.document[id_field], "status": status})
        return Answer(200, current.document)

    @staticmethod
    def _signed(answer: Answer, field: str, what: str) -> Any:
        """The signed value of an answer; a parked one is EvmApprovalPending (JSON-RPC has no 202)."""
        document = answer.document
        if answer.status == 202:
            raise EvmApprovalPending(
                f"the {what} waits for a supervisor's approval {document.get('approval_id')}",
                **{key: document[key] for key in ("approval_id", "transaction_id", "request_id", "nonce")
                   if document.get(key) is not None})
        return document[field]

    # --- methods -----------------------------------------------------------------------------

    async def _accounts(self, caller: RpcCaller, call: RpcCall) -> list[str]:
        """The addresses of the keys the caller may sign with (``evm`` and ``message`` keys), oldest first."""
        _positional(call.params, call.method, 0, 0)
        if not allows(caller.principal.role, Permission.EVM_SIGN):
            return []

        def addresses(tx: Tx) -> list[str]:
            keys = [*signing_keys_with_usage(tx, Usage.EVM), *signing_keys_with_usage(tx, Usage.MESSAGE)]
            keys.sort(key=lambda key: (key.created_at, key.key_id))
            return list(dict.fromkeys(evm_address(key.public_key) for key in keys))

        return await self.database.read(addresses)

    async def _chain_id(self, caller: RpcCaller, call: RpcCall) -> str:
        _positional(call.params, call.method, 0, 0)
        return hex(self._chain(None).chain_id)

    async def _sign(self, caller: RpcCaller, call: RpcCall, transaction: Any) -> dict[str, Any]:
        """Sign a transaction object as ``POST /v1/evm/transactions`` would; the signed document."""
        read = read_transaction(transaction)
        key = await self.account(read.sender, Usage.EVM)
        draft = draft_of(read.fields, key, self._chain(read.chain_id))
        entry = caller.entry(self.methods[call.method].action or call.method, call)
        answer = await self._once(caller, call, lambda request: self.transactions.transact(request, draft, entry),
                                  self.transactions.resume)
        if answer.status == 202:  # parked: a supervisor may have decided since the first call
            answer = await self._decided(answer, self.transactions.signed.reference, "transaction_id")
        self._signed(answer, "raw_transaction", "transaction")
        document: dict[str, Any] = answer.document
        return document

    async def _sign_transaction(self, caller: RpcCaller, call: RpcCall) -> str:
        """``eth_signTransaction [tx]``: the signed raw transaction, 0x-hex (as Web3Signer answers)."""
        (transaction,) = _positional(call.params, call.method, 1, 1)
        raw: str = (await self._sign(caller, call, transaction))["raw_transaction"]
        return raw

    async def _send_transaction(self, caller: RpcCaller, call: RpcCall) -> str:
        """``eth_sendTransaction [tx]``: check the local nonce against the node, sign, and send the raw
        transaction to the node (``eth_sendRawTransaction``); the transaction hash."""
        assert self.upstream is not None
        (transaction,) = _positional(call.params, call.method, 1, 1)
        read = read_transaction(transaction)
        chain = self._chain(read.chain_id)
        default = self.settings.evm_rpc.default_chain_id
        if chain.chain_id != default:
            raise InvalidRpcParams(f"eth_sendTransaction sends to the node of chain {default}, not {chain.chain_id}")
        await self.account(read.sender, Usage.EVM)  # before the node hears of the address
        node_chain = await self.upstream.chain_id()
        if node_chain != chain.chain_id:
            raise EvmUpstreamFailed(f"the upstream node serves chain {node_chain}, not {chain.chain_id}")
        await self._check_nonce(caller, chain.chain_id, read.sender)
        document = await self._sign(caller, call, transaction)
        raw, tx_hash = document["raw_transaction"], document["tx_hash"]
        try:
            sent = await self.upstream.send_raw_transaction(raw)
        except EvmUpstreamFailed as error:
            error.extra.update(tx_hash=tx_hash, raw_transaction=raw, transaction_id=document["transaction_id"])
            raise
        if sent.lower() != tx_hash.lower():
            raise EvmUpstreamFailed(f"the upstream node answered hash {sent[:80]} for transaction {tx_hash}",
                                    tx_hash=tx_hash)
        return str(tx_hash)

    async def _check_nonce(self, caller: RpcCaller, chain_id: int, address: str) -> None:
        """The read-only nonce check before a send: ``ecny_evm_nonce_drift`` is the node's pending count
        minus the local next nonce. Behind the chain (drift > 0), nothing is signed: the next nonce would
        already be used, so an error is logged, a ``evm.nonce_behind_chain`` risk signal written, and
        the call refused (EvmNonceBehindChain) until an admin sets the next nonce.
        """
        assert self.upstream is not None
        on_chain = await self.upstream.transaction_count(address)
        local = await self.database.read(lambda tx: self.transactions.next_nonce_in(tx, chain_id, address))
        drift = on_chain - local
        self.metrics.evm_nonce_drift.labels(str(chain_id), address).set(drift)
        if drift <= 0:
            return
        structlog.get_logger("gateway.evm.rpc").error(
            "local nonce behind the chain: nothing signed; set the next nonce", chain_id=chain_id, address=address,
            chain_count=on_chain, local_next=local, request_id=caller.request_id)
        await self.database.write(lambda tx: record_signal_in(
            tx, "evm.nonce_behind_chain", address, chain_id=chain_id, chain_count=on_chain, local_next=local))
        raise EvmNonceBehindChain(
            f"the node counts {on_chain} transactions of {address} on chain {chain_id}; the gateway's next nonce "
            f"is {local}: POST /v1/evm/nonces/{chain_id}/{address} with next_nonce {on_chain}",
            chain_count=on_chain, next_nonce=local)

    async def _sign_typed_data(self, caller: RpcCaller, call: RpcCall) -> str:
        """``eth_signTypedData[_v4] [address, typedData]``: the 65-byte signature, as ``POST /v1/evm/typed-data``."""
        address, value = _positional(call.params, call.method, 2, 2)
        if not isinstance(address, str):
            raise InvalidRpcParams(f"{call.method}: the first param is the signer's address")
        document = read_typed_data_param(value)
        key = await self.account(address, Usage.EVM)
        chain = self._chain(typed_data_chain(document))
        draft = TypedDataDraft(key, chain, document, parse_typed_data(document))
        entry = caller.entry(self.methods[call.method].action or call.method, call)
        answer = await self._once(caller, call, lambda request: self.typed_data.request(request, draft, entry),
                                  self.typed_data.signed.resume)
        if answer.status == 202:
            answer = await self._decided(answer, self.typed_data.signed.reference, "request_id")
        signature: str = self._signed(answer, "signature", "typed data")
        return signature

    async def _message(self, caller: RpcCaller, call: RpcCall, method: MessageMethod, address: Any,
                       message: Any) -> str:
        if not isinstance(address, str):
            raise InvalidRpcParams(f"{method}: expected the signer's address")
        data = read_message(message)
        key = await self.account(address, Usage.MESSAGE)
        draft = MessageDraft(key, method, data)
        entry = caller.entry(self.methods[call.method].action or call.method, call)
        answer = await self._once(caller, call, lambda request: self.messages.sign(request, draft, entry),
                                  self.messages.resume)
        signature: str = answer.document["signature"]
        return signature

    async def _personal_sign(self, caller: RpcCaller, call: RpcCall) -> str:
        """``personal_sign [message, address]``: EIP-191 signature by a ``message`` key. A third param (a
        keystore password) is refused: keys are in the HSM."""
        message, address = _positional(call.params, call.method, 2, 2)
        return await self._message(caller, call, "personal_sign", address, message)

    async def _eth_sign(self, caller: RpcCaller, call: RpcCall) -> str:
        """``eth_sign [address, message]``: the same EIP-191 signature (never over a bare hash)."""
        address, message = _positional(call.params, call.method, 2, 2)
        return await self._message(caller, call, "eth_sign", address, message)
