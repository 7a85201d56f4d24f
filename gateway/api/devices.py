"""Hard wallets: register, load, sync (CBOR log export), unload, revoke; discrepancies for supervisors."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import orjson
from aiohttp import web

from gateway.api import idempotency
from gateway.api.call import Call
from gateway.api.codecs import CBOR, json_response
from gateway.api.device_models import (
    DeviceDocument,
    DeviceRegisterRequest,
    DiscrepancyDocument,
    DiscrepancyList,
    LoadDocument,
    LoadRequest,
    RecertifiedDevice,
    ResolveRequest,
    RevokeRequest,
    SyncReport,
    UnloadRequest,
    UnloadResult,
)
from gateway.api.endpoints import Endpoint
from gateway.api.wallet_models import ApprovalDocument
from gateway.approvals.workflow import is_pending_document
from gateway.auth.roles import Permission
from gateway.errors import BadRequest, UnsupportedMediaType, ValidationFailed
from gateway.ledger.store import Tx
from gateway.offline.devices import (
    Devices,
    device_document,
    device_row,
    discrepancy_document,
    discrepancy_in,
)

DEVICE = "/v1/devices/{device_id}"
DISCREPANCY = "/v1/reconciliation/discrepancies/{discrepancy_id}"
LIST_LIMIT = 200


def _device_id(call: Call) -> str:
    return call.request.match_info["device_id"]




async def register(call: Call) -> web.Response:
    body: DeviceRegisterRequest = call.body
    entry = call.audit_entry("devices.register", decision="allowed", payload_hash=call.payload_hash())
    answer = await Devices.of(call.runtime).register(call.idempotent, body.device_id, body.wallet_id,
                                                     body.public_key_pem, body.model, entry)
    return idempotency.render(answer)


async def show(call: Call) -> web.Response:
    device_id = _device_id(call)
    row = await call.runtime.database.read(lambda tx: device_row(tx, device_id))
    return json_response(device_document(row, await Devices.of(call.runtime).issuer_pem(row["kid"])))


async def load(call: Call) -> web.Response:
    devices = Devices.of(call.runtime)
    amount = call.runtime.wallets.check_amount(call.body.amount_fen)
    entry = call.audit_entry("devices.load", decision="allowed", payload_hash=call.payload_hash())
    return idempotency.render(await devices.load(call.idempotent, _device_id(call), amount, entry))


async def resume_load(call: Call, reference: str) -> web.Response:
    """Replay of a load whose voucher was not signed when the first request ended."""
    return idempotency.render(await Devices.of(call.runtime).signed_loads.resume(reference, call.idempotent))


async def sync(call: Call) -> web.Response:
    if call.request.content_type != CBOR:
        raise UnsupportedMediaType(f"send the device's log export as {CBOR}")
    if not call.raw_body:
        raise BadRequest("the body must be the device's log export")
    entry = call.audit_entry("devices.sync", decision="allowed", payload_hash=call.payload_hash())
    report = await Devices.of(call.runtime).sync(_device_id(call), call.raw_body, entry)
    return json_response(report)


async def unload(call: Call) -> web.Response:
    device_id = _device_id(call)
    body: UnloadRequest = call.body
    try:
        statement = base64.b64decode(body.statement, validate=True)
    except (binascii.Error, ValueError):
        raise ValidationFailed("statement must be base64") from None
    devices = Devices.of(call.runtime)
    entry = call.audit_entry("devices.unload", decision="allowed", payload_hash=call.payload_hash())

    def work(tx: Tx) -> bytes:
        return idempotency.respond_in(tx, call, devices.unload_in(tx, device_id, statement, entry))

    return idempotency.json_body(await call.runtime.database.write(work))


async def recertify(call: Call) -> web.Response:
    entry = call.audit_entry("devices.recertify", decision="allowed")
    return json_response(await Devices.of(call.runtime).recertify(_device_id(call), entry))


async def revoke(call: Call) -> web.Response:
    device_id = _device_id(call)
    reason = call.body.reason
    devices = Devices.of(call.runtime)
    issuer = None
    entry = call.audit_entry("devices.revoke", decision="allowed", payload_hash=call.payload_hash())

    def work(tx: Tx) -> bytes:
        document = device_document(devices.revoke_in(tx, device_id, reason, entry), issuer)
        return idempotency.respond_in(tx, call, document)

    body = await call.runtime.database.write(work)
    document = orjson.loads(body)
    document["issuer_public_key_pem"] = await devices.issuer_pem(document["kid"])
    return json_response(document)


async def list_discrepancies(call: Call) -> web.Response:
    query = call.request.query
    status = query.get("status", "open")
    if status not in ("open", "resolved", "all"):
        raise ValidationFailed("status must be open, resolved or all")
    device_id = query.get("device_id", "")
    if len(device_id) > 64:
        raise ValidationFailed("device_id is at most 64 characters")
    where, parameters = [], []
    if status != "all":
        where.append("status = ?")
        parameters.append(status)
    if device_id:
        where.append("device_id = ?")
        parameters.append(device_id)
    sql = "SELECT * FROM discrepancies " + ("WHERE " + " AND ".join(where) + " " if where else "")
    sql += "ORDER BY created_at DESC, discrepancy_id LIMIT ?"

    def find(tx: Tx) -> list[dict[str, Any]]:
        rows = tx.fetchall(sql, [*parameters, LIST_LIMIT])
        held: dict[str, list[str]] = {}
        ids = [r["discrepancy_id"] for r in rows]
        if ids:
            marks = ", ".join("?" for _ in ids)
            for row in tx.fetchall(f"SELECT discrepancy_id, payment_hash FROM offline_payments WHERE discrepancy_id IN "
                                   f"({marks}) ORDER BY payer_device, counter", ids):
                held.setdefault(row["discrepancy_id"], []).append(bytes(row["payment_hash"]).hex())
        return [discrepancy_document(r, held.get(r["discrepancy_id"])) for r in rows]

    return json_response({"discrepancies": await call.runtime.database.read(find)})


async def show_discrepancy(call: Call) -> web.Response:
    discrepancy_id = call.request.match_info["discrepancy_id"]
    return json_response(await call.runtime.database.read(lambda tx: discrepancy_in(tx, discrepancy_id)))


async def resolve(call: Call) -> web.Response:
    discrepancy_id = call.request.match_info["discrepancy_id"]
    body: ResolveRequest = call.body
    devices = Devices.of(call.runtime)
    entry = call.audit_entry("reconciliation.resolve", decision="allowed", payload_hash=call.payload_hash())

    def work(tx: Tx) -> tuple[bytes, int]:
        resolved = devices.resolve_in(tx, discrepancy_id, body.resolution, body.note, entry)
        status = 202 if is_pending_document(resolved) else 200  # honour: the approval it waits for
        return idempotency.respond_in(tx, call, resolved, status), status

    return idempotency.json_body(*await call.runtime.database.write(work))


ENDPOINTS = [
    Endpoint("POST", "/v1/devices", register, "Register a hard wallet: the gateway signs its certificate",
             Permission.DEVICES_OPERATE, "devices", request_model=DeviceRegisterRequest, response_model=DeviceDocument,
             response_status=201, idempotency="optional", audited_action="devices.register",
             responses={422: "Wallet not active"}),
    Endpoint("GET", DEVICE, show, "Show a hard wallet", Permission.DEVICES_READ, "devices",
             response_model=DeviceDocument, audited_action="devices.show"),
    Endpoint("POST", DEVICE + "/loads", load, "Load value: wallet → offline reserve, and an HSM-signed voucher",
             Permission.DEVICES_OPERATE, "devices", request_model=LoadRequest, response_model=LoadDocument,
             response_status=201, idempotency="required", resume=resume_load, audited_action="devices.load",
             accepted_model=ApprovalDocument, key_read_in_transaction=True,
             responses={202: "Above the load approval threshold: the pending approval, nothing moved yet",
                        422: "Refused by policy (device or wallet not active, funds, offline balance cap)"}),
    Endpoint("POST", DEVICE + "/sync", sync,
             "Reconcile the device's log export (body: the signed export, application/cbor)",
             Permission.DEVICES_OPERATE, "devices", response_model=SyncReport, idempotency="optional",
             raw_body="application/cbor",
             audited_action="devices.sync", responses={413: "Export too large", 415: "Not application/cbor",
                                                       422: "The export's signature does not verify"}),
    Endpoint("POST", DEVICE + "/unload", unload,
             "Unload: check the device's final statement, return its unspent value to the wallet",
             Permission.DEVICES_OPERATE, "devices", request_model=UnloadRequest, response_model=UnloadResult,
             idempotency="optional", audited_action="devices.unload",
             responses={422: "Statement signature invalid or device not active"}),
    Endpoint("POST", DEVICE + "/certificate", recertify,
             "Certify a hard wallet again under the voucher key that signs now (after a rotation), with the "
             "endorsements that lead the device from the key it pins", Permission.DEVICES_OPERATE, "devices",
             response_model=RecertifiedDevice, audited_action="devices.recertify",
             responses={404: "No such device", 409: "No endorsement leads from the device's issuer to the voucher key",
                        422: "Device or wallet not active"}),
    Endpoint("POST", DEVICE + "/revoke", revoke, "Revoke a hard wallet (supervisor)", Permission.DEVICES_REVOKE,
             "devices", request_model=RevokeRequest, response_model=DeviceDocument, idempotency="optional",
             audited_action="devices.revoke", responses={422: "Already revoked or unloaded"}),
    Endpoint("GET", "/v1/reconciliation/discrepancies", list_discrepancies,
             "Discrepancies found by reconciliation, newest first (200 at most)", Permission.RECONCILIATION_READ,
             "reconciliation", response_model=DiscrepancyList, audited_action="reconciliation.list",
             query=(("status", {"type": "string", "enum": ["open", "resolved", "all"]},
                     "open (default), resolved or all"),
                    ("device_id", {"type": "string", "maxLength": 64}, "Only this device's"))),
    Endpoint("GET", DISCREPANCY, show_discrepancy, "Show a discrepancy with its evidence",
             Permission.RECONCILIATION_READ, "reconciliation", response_model=DiscrepancyDocument,
             audited_action="reconciliation.show"),
    Endpoint("POST", DISCREPANCY + "/resolve", resolve,
             "Resolve a discrepancy: post, reject or acknowledge; honour waits for a second supervisor's approval",
             Permission.RECONCILIATION_RESOLVE, "reconciliation", request_model=ResolveRequest,
             response_model=DiscrepancyDocument, idempotency="optional", audited_action="reconciliation.resolve",
             accepted_model=ApprovalDocument,
             responses={202: "honour: the pending approval (nothing is paid until a second supervisor approves)",
                        409: "Already resolved, or an honour of it is pending",
                        422: "The resolution cannot be carried out (honour: a payment above its payer's cap)"}),
]
