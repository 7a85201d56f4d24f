"""``POST /v1/evm/rpc``: the Ethereum JSON-RPC signer's envelope (JSON-RPC 2.0), read and rendered.

What each method does is :mod:`gateway.evm.rpc`. Here: Bearer authentication (the endpoint table), the
envelope — a request object, or a batch of them — and the answers. Every JSON-RPC error is HTTP 200 as
the JSON-RPC over HTTP convention has it; only a missing or wrong credential (401), a role without
``evm.read`` (403), no body at all (400), a body over the size limit (413) or not JSON (415) and the
rate limit (429) answer as problem+json before any call is read.

Batches are read in order, one call after the other, each charged against the caller's rate limit;
at most ``evm_rpc.max_batch`` calls. An ``Idempotency-Key`` header names one call, so it comes with a
single request, never a batch. A notification (no ``id``) is not executed — a signature nobody receives
would only spend a nonce — and, as the specification says, gets no answer (HTTP 204 if nothing else does).
"""

from __future__ import annotations

from typing import Any

import orjson
import structlog
from aiohttp import web

from gateway.api import idempotency
from gateway.api.call import Call
from gateway.api.codecs import JSON, json_response, refuse_nul_in_json
from gateway.api.endpoints import IDEMPOTENCY, RATE_LIMITER, Endpoint
from gateway.api.evm_models import RpcAnswer
from gateway.auth.roles import Permission
from gateway.errors import GatewayError, InvalidJson, InvalidRpcRequest, UnsupportedMediaType, ValidationFailed
from gateway.evm.rpc import RpcCall, RpcCaller, rpc_error

MAX_ID_LENGTH = 256


def _error(error: GatewayError, call: Call, request_id: Any = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": rpc_error(error, call.request_id)}


def _read(item: Any) -> RpcCall:
    """One request object. Raises InvalidRpcRequest."""
    if not isinstance(item, dict):
        raise InvalidRpcRequest("a JSON-RPC request is an object")
    if item.get("jsonrpc") != "2.0":
        raise InvalidRpcRequest('"jsonrpc" must be "2.0"')
    method = item.get("method")
    if not isinstance(method, str) or not method:
        raise InvalidRpcRequest('"method" must be a non-empty string')
    params = item.get("params")
    if params is not None and not isinstance(params, (list, dict)):
        raise InvalidRpcRequest('"params" must be an array or an object')
    if isinstance(params, dict):  # every method the signer offers takes positional params
        raise InvalidRpcRequest('"params" must be an array: the signer\'s methods take positional params')
    unknown = set(item) - {"jsonrpc", "method", "params", "id"}
    if unknown:
        raise InvalidRpcRequest(f"unknown members {sorted(unknown)[:5]}")
    return RpcCall(method, params, item.get("id"))


def _valid_id(item: Any) -> Any:
    """The request's id when it is one JSON-RPC allows (string, integer or null), else None."""
    value = item.get("id") if isinstance(item, dict) else None
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int) or (isinstance(value, str) and len(value) <= MAX_ID_LENGTH):
        return value
    return None


async def _answer(call: Call, caller: RpcCaller, item: Any, charge: bool) -> dict[str, Any] | None:
    """The response object for one request object, None for a notification."""
    request_id = _valid_id(item)
    try:
        rpc_call = _read(item)
        if isinstance(item, dict) and "id" in item and request_id is None and item["id"] is not None:
            raise InvalidRpcRequest('"id" must be a string (at most 256 characters), an integer or null')
    except InvalidRpcRequest as error:
        return _error(error, call, request_id)
    if "id" not in item:
        return None
    try:
        if charge:
            call.request.app[RATE_LIMITER].check(caller.principal.scope)
        result = await call.runtime.evm_rpc.call(caller, rpc_call)
    except GatewayError as error:
        return _error(error, call, request_id)
    except Exception:  # a bug must still answer JSON-RPC; what happened is logged, not sent
        structlog.get_logger("gateway.http").exception("json-rpc call failed", request_id=call.request_id,
                                                       method=rpc_call.method)
        return _error(GatewayError("an unexpected error occurred; it has been logged"), call, request_id)
    return {"jsonrpc": "2.0", "id": request_id, "result": result}


def _render(answer: Any) -> web.Response:
    if answer is None or answer == []:
        return web.Response(status=204)
    return json_response(answer)


async def rpc(call: Call) -> web.Response:
    """One JSON-RPC request or batch.

    Raises:
        ValidationFailed: no body at all (400 problem, as every endpoint with a required body answers).
        UnsupportedMediaType: a body of another media type than ``application/json`` (415 problem).
    """
    if not call.raw_body.strip():
        raise ValidationFailed("a JSON-RPC request or batch is required", errors=[])
    media_type = call.request.content_type
    # No Content-Type at all is read as JSON: web3.py sends none when a provider is given its own headers.
    if "Content-Type" in call.request.headers and media_type != JSON and not media_type.endswith("+json"):
        raise UnsupportedMediaType(f"send {JSON}, not {media_type}")
    try:
        document = orjson.loads(call.raw_body)
    except orjson.JSONDecodeError as exc:
        return json_response(_error(InvalidJson(f"malformed JSON: {exc}"), call))
    key = call.request.headers.get("Idempotency-Key")
    try:
        refuse_nul_in_json(call.raw_body, document, "request")  # as every other body
        if key is not None:
            idempotency.check_key(key)
        if isinstance(document, list):
            limit = call.runtime.settings.evm_rpc.max_batch
            if not document or len(document) > limit:
                raise InvalidRpcRequest(f"a batch holds 1 to {limit} requests")
            if key is not None:
                raise InvalidRpcRequest("an Idempotency-Key names one call: send it with a single request")
    except GatewayError as error:
        return json_response(_error(error, call))
    assert call.principal is not None
    caller = RpcCaller(call.principal, call.request_id, key, call.request.app[IDEMPOTENCY])
    if not isinstance(document, list):
        return _render(await _answer(call, caller, document, charge=False))
    answers = [await _answer(call, caller, item, charge=index > 0) for index, item in enumerate(document)]
    return _render([answer for answer in answers if answer is not None])


ENDPOINTS = [
    Endpoint("POST", "/v1/evm/rpc", rpc,
             "Ethereum JSON-RPC 2.0 signer (Web3Signer-style): eth_accounts, eth_chainId, eth_signTransaction, "
             "eth_sendTransaction, eth_signTypedData(_v4), personal_sign, eth_sign; errors are JSON-RPC errors "
             "with the problem type in data", Permission.EVM_READ, "evm", raw_body="application/json",
             response_model=RpcAnswer, audited_action="evm.rpc",
             responses={204: "Only notifications: nothing to answer",
                        400: "No body (every JSON-RPC error is a 200 answer)"}),
]
