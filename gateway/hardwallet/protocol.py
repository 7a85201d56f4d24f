"""Messages of the hard-wallet protocol (docs/spec.md §9, docs/device-protocol.md).

Every message is a CBOR map carried in one frame (:mod:`gateway.hardwallet.frames`)::

    request   {"v": 1, "id": uint, "op": text, ...arguments}
    answer    {"v": 1, "id": the request's id, "ok": true, ...result}
    refusal   {"v": 1, "id": the request's id, "ok": false, "error": {"code": text, "message": text}}

The host sends one request at a time and waits for the answer with the same ``id`` (answers with
another id are stale — from a request that timed out — and are skipped). ``v`` is the protocol
version; a device answers a request of another version with the error ``unsupported-version``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.errors import FrameError

PROTOCOL_VERSION = 1
MAX_REQUEST_ID = 2**32 - 1
RESERVED = frozenset({"v", "id", "op", "ok", "error"})

OPERATIONS: dict[str, str] = {
    "info": "identity, certificate state, balance, counters",
    "certify": "install the gateway's certificate and pin the issuer key (another issuer: with endorsements)",
    "load": "load a voucher (offline value)",
    "export_log": "the device-signed log export, in chunks from an offset",
    "ack_log": "forget payments and receipts the gateway acknowledged (HSM-signed ack)",
    "unload": "sign the final statement and stop spending",
    "pay": "simulator only: make an offline payment to another device",
    "receive": "simulator only: accept another device's payment",
    "set_clock": "simulator only: shift the device clock",
}
SIMULATOR_ONLY = frozenset({"pay", "receive", "set_clock"})

DEFAULT_TIMEOUT_S = 2.0
TIMEOUTS_S: dict[str, float] = {"export_log": 10.0, "unload": 5.0, "pay": 5.0}
"""Per-operation answer timeouts: exports and signatures take longer on a real secure element."""

EXPORT_CHUNK_BYTES = 16 * 1024
"""Bytes of the export one ``export_log`` answer carries (well inside the frame limit)."""


def timeout_for(op: str) -> float:
    return TIMEOUTS_S.get(op, DEFAULT_TIMEOUT_S)


@dataclass(frozen=True)
class Request:
    id: int
    op: str
    arguments: dict[str, Any] = field(default_factory=dict)
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class Response:
    id: int
    ok: bool
    result: dict[str, Any] = field(default_factory=dict)
    error_code: str = ""
    error_message: str = ""


def request_message(request_id: int, op: str, arguments: dict[str, Any]) -> dict[str, Any]:
    clash = RESERVED & arguments.keys()
    if clash:
        raise FrameError(f"argument names {sorted(clash)} are reserved")
    return {"v": PROTOCOL_VERSION, "id": request_id, "op": op, **arguments}


def answer_message(request_id: int, result: dict[str, Any]) -> dict[str, Any]:
    return {**{k: v for k, v in result.items() if k not in RESERVED}, "v": PROTOCOL_VERSION, "id": request_id,
            "ok": True}


def refusal_message(request_id: int, code: str, message: str) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "error": {"code": code, "message": message}}


def _request_id(message: dict[Any, Any]) -> int:
    request_id = message.get("id")
    if not isinstance(request_id, int) or isinstance(request_id, bool) or not 0 <= request_id <= MAX_REQUEST_ID:
        raise FrameError("message has no valid id")
    return request_id


def parse_request(message: Any) -> Request:
    """A request from a decoded frame. Raises FrameError (only) when it is not one."""
    if not isinstance(message, dict) or "ok" in message:
        raise FrameError("not a request")
    request_id = _request_id(message)
    version, op = message.get("v"), message.get("op")
    if not isinstance(version, int) or isinstance(version, bool):
        raise FrameError("request has no version")
    if not isinstance(op, str):
        raise FrameError("request has no op")
    arguments = {k: v for k, v in message.items() if k not in RESERVED}
    if not all(isinstance(k, str) for k in arguments):
        raise FrameError("argument names must be text")
    return Request(request_id, op, arguments, version)


def parse_response(message: Any) -> Response:
    """An answer or refusal from a decoded frame. Raises FrameError (only) when it is neither."""
    if not isinstance(message, dict) or not isinstance(message.get("ok"), bool):
        raise FrameError("not a response")
    request_id = _request_id(message)
    if message.get("v") != PROTOCOL_VERSION:
        raise FrameError(f"response of protocol version {message.get('v')!r}")
    if message["ok"]:
        result = {k: v for k, v in message.items() if isinstance(k, str) and k not in RESERVED}
        return Response(request_id, True, result)
    error = message.get("error")
    code, text = "refused", ""
    if isinstance(error, dict):
        code = str(error.get("code", code))[:64]
        text = str(error.get("message", ""))[:500]
    elif isinstance(error, str):
        text = error[:500]
    return Response(request_id, False, {}, code, text)
