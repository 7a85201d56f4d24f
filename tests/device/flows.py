"""Helpers for hard-wallet tests: a `voucher` key, wallets, and the teller's flows (register, load,
pay, sync) against simulated devices — in process, or over a serial link."""

from __future__ import annotations

import base64
import secrets
import uuid
from typing import Any

import cbor2
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pycose.keys import EC2Key
from pycose.messages import Sign1Message

from gateway.auth.roles import Role
from gateway.hardwallet.simulator import SimulatedDevice
from gateway.ledger.journal import check_invariants
from gateway.offline.invariants import check_offline_entries
from gateway.runtime import RUNTIME
from tests.api.support import approve_opened_tier
from tests.conftest import Gateway

CBOR = {"Content-Type": "application/cbor"}


def idem() -> dict[str, str]:
    return {"Idempotency-Key": uuid.uuid4().hex}


async def ensure_voucher_key(gw: Gateway) -> dict[str, Any]:
    """The gateway's one `voucher` key (made on first use)."""
    keys = await (await gw.client.get("/v1/keys", headers=gw.auth(Role.ADMIN))).json()
    for key in keys["keys"] if isinstance(keys, dict) else keys:
        if "voucher" in key["usage"]:
            return dict(key)
    response = await gw.client.post("/v1/keys", json={"label": f"voucher-{secrets.token_hex(4)}",
                                                      "algorithm": "ecdsa-p256", "usage": ["voucher"]},
                                    headers=gw.auth(Role.ADMIN))
    assert response.status == 201, await response.text()
    return dict(await response.json())


async def open_wallet(gw: Gateway, tier: int = 1, cash: int = 0) -> str:
    body = {"holder_name": "Offline Test", "phone": "13800138000", "tier": tier, "kind": "personal"}
    response = await gw.client.post("/v1/wallets", json=body, headers=gw.auth(Role.TELLER))
    assert response.status == 201, await response.text()
    wallet_id: str = (await approve_opened_tier(gw, await response.json()))["wallet_id"]
    if cash:
        response = await gw.client.post(f"/v1/wallets/{wallet_id}/cash-in", json={"amount_fen": cash},
                                        headers={**gw.auth(Role.TELLER), **idem()})
        assert response.status == 200, await response.text()
    return wallet_id


async def wallet(gw: Gateway, wallet_id: str) -> dict[str, Any]:
    response = await gw.client.get(f"/v1/wallets/{wallet_id}", headers=gw.auth(Role.TELLER))
    assert response.status == 200
    document: dict[str, Any] = await response.json()
    return document


async def register(gw: Gateway, device: SimulatedDevice, wallet_id: str) -> dict[str, Any]:
    """Register an in-process simulated device and install its certificate."""
    info = device.info()
    response = await gw.client.post("/v1/devices", json={"wallet_id": wallet_id, "device_id": info["device_id"],
                                                         "public_key_pem": info["public_key_pem"],
                                                         "model": info["model"]}, headers=gw.auth(Role.TELLER))
    assert response.status == 201, await response.text()
    document: dict[str, Any] = await response.json()
    device.certify(base64.b64decode(document["certificate"]), document["issuer_public_key_pem"])
    return document


async def issue_load(gw: Gateway, device_id: str, amount: int) -> dict[str, Any]:
    response = await gw.client.post(f"/v1/devices/{device_id}/loads", json={"amount_fen": amount},
                                    headers={**gw.auth(Role.TELLER), **idem()})
    assert response.status == 201, await response.text()
    document: dict[str, Any] = await response.json()
    return document


async def load(gw: Gateway, device: SimulatedDevice, amount: int, **options: Any) -> dict[str, Any]:
    document = await issue_load(gw, device.state.device_id, amount)
    device.load(base64.b64decode(document["voucher"]), **options)
    return document


def pay(payer: SimulatedDevice, payee: SimulatedDevice | None, amount: int, payee_id: str | None = None,
        receive: bool = True, careless: bool = False, **options: Any) -> dict[str, Any]:
    """An offline payment from ``payer`` to ``payee``, received by it unless ``receive`` is false
    (``careless``: the payee takes it without the checks an honest device makes)."""
    target = payee_id or (payee.state.device_id if payee else "")
    made = payer.pay(target, amount, **options)
    if receive and payee is not None:
        payee.receive(made["payment"], made["certificate"], misbehave="accept-anything" if careless else None)
    return made


async def post_sync(gw: Gateway, device_id: str, export: bytes, role: Role = Role.TELLER) -> Any:
    return await gw.client.post(f"/v1/devices/{device_id}/sync", data=export, headers={**gw.auth(role), **CBOR})


async def sync(gw: Gateway, device: SimulatedDevice, ack: bool = True) -> dict[str, Any]:
    """Upload the device's log export; hand the acknowledgement back to the device."""
    device.export_log(0)  # a fresh export of everything not yet acknowledged
    blob = device.export()
    response = await post_sync(gw, device.state.device_id, blob)
    assert response.status == 200, await response.text()
    report: dict[str, Any] = await response.json()
    report["export"] = blob  # for tests that upload it again
    if ack:
        device.ack_log(base64.b64decode(report["ack"]))
    return report


async def device_doc(gw: Gateway, device_id: str) -> dict[str, Any]:
    response = await gw.client.get(f"/v1/devices/{device_id}", headers=gw.auth(Role.TELLER))
    assert response.status == 200, await response.text()
    document: dict[str, Any] = await response.json()
    return document


async def discrepancies(gw: Gateway, device_id: str | None = None, status: str = "open") -> list[dict[str, Any]]:
    params = {"status": status, **({"device_id": device_id} if device_id else {})}
    response = await gw.client.get("/v1/reconciliation/discrepancies", params=params,
                                   headers=gw.auth(Role.SUPERVISOR))
    assert response.status == 200, await response.text()
    found: list[dict[str, Any]] = (await response.json())["discrepancies"]
    return found


async def ledger_problems(gw: Gateway) -> list[str]:
    database = gw.client.server.app[RUNTIME].database
    problems: list[str] = await database.read(check_invariants)
    return problems + await database.read(check_offline_entries)


def verify_with_pycose(envelope: bytes, public_key_pem: str) -> dict[str, Any]:
    """Verify a COSE_Sign1 with pycose (an independent implementation); return its claims."""
    tagged = cbor2.loads(envelope)
    assert isinstance(tagged, cbor2.CBORTag) and tagged.tag == 18
    # pycose 1.1 cannot decode cbor2 6 output directly (tuples inside tags): hand it the array.
    items = list(tagged.value)
    items[1] = dict(items[1])
    message = Sign1Message.from_cose_obj(items, True)
    public = serialization.load_pem_public_key(public_key_pem.encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    numbers = public.public_numbers()
    message.key = EC2Key(crv="P_256", x=numbers.x.to_bytes(32, "big"), y=numbers.y.to_bytes(32, "big"))
    assert message.verify_signature() and message.payload is not None
    claims: dict[str, Any] = cbor2.loads(message.payload)
    return claims
