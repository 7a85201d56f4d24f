"""Key lifecycle (issue 18): one active key per usage, rotation, disable, verify, public keys as JWK and
COSE_Key — on a real SoftHSM token, through the API, on SQLite and on PostgreSQL.

Every signature a test relies on is checked by an independent implementation: pycose for COSE_Sign1
envelopes and COSE_Keys, jwcrypto for JWKs, `cryptography` for raw signatures.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import cbor2
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from eth_hash.auto import keccak
from jwcrypto import jwk as jwcrypto_jwk
from pycose.keys import CoseKey
from pycose.messages import Sign1Message

from gateway.auth.roles import Role
from gateway.errors import DeviceRefused
from gateway.hardwallet.simulator import SimulatedDevice
from gateway.runtime import RUNTIME
from gateway.schemes import offline
from gateway.signing import Signer
from tests.api.support import assert_problem, audit_entries, audit_head
from tests.conftest import Gateway
from tests.device.flows import idem, issue_load, load, open_wallet, register, verify_with_pycose

pytestmark = pytest.mark.softhsm


@pytest_asyncio.fixture(scope="module")
async def gw(ledger_gateway: Gateway) -> AsyncIterator[Gateway]:
    """A gateway per store with an `ecny` and an `audit` key (``ledger_gateway``); tests add their own keys."""
    yield ledger_gateway


async def make_key(gw: Gateway, usage: list[str], algorithm: str = "ecdsa-p256") -> dict[str, Any]:
    response = await gw.client.post("/v1/keys", json={"label": f"lc-{usage[0]}-{secrets.token_hex(4)}",
                                                      "algorithm": algorithm, "usage": usage},
                                    headers=gw.auth(Role.ADMIN))
    assert response.status == 201, await response.text()
    document: dict[str, Any] = await response.json()
    return document


async def key_doc(gw: Gateway, key_id: str) -> dict[str, Any]:
    response = await gw.client.get(f"/v1/keys/{key_id}", headers=gw.auth(Role.ADMIN))
    assert response.status == 200, await response.text()
    document: dict[str, Any] = await response.json()
    return document


async def rotate(gw: Gateway, key_id: str) -> dict[str, Any]:
    response = await gw.client.post(f"/v1/keys/{key_id}/rotate", headers=gw.auth(Role.ADMIN))
    assert response.status == 201, await response.text()
    document: dict[str, Any] = await response.json()
    return document


async def sign_raw(gw: Gateway, key_id: str, digest: bytes) -> Any:
    return await gw.client.post(f"/v1/keys/{key_id}/sign", json={"digest": digest.hex()},
                                headers=gw.auth(Role.BACKEND))


async def verify(gw: Gateway, key_id: str, signature: bytes, **data: bytes) -> Any:
    body = {name: value.hex() for name, value in data.items()} | {"signature": signature.hex()}
    return await gw.client.post(f"/v1/keys/{key_id}/verify", json=body, headers=gw.auth(Role.AUDITOR))


def sig_structure_of(envelope: bytes) -> tuple[bytes, bytes, bytes]:
    """(kid, Sig_structure, raw signature) of a tagged COSE_Sign1, read independently of the gateway."""
    items = cbor2.loads(envelope).value
    protected, payload, signature = items[0], items[2], items[3]
    kid = cbor2.loads(protected)[4]
    return kid, cbor2.dumps(["Signature1", protected, b"", payload]), signature


def verify_sign1_with_cose_key(envelope: bytes, cose_key: bytes) -> bool:
    """pycose verifies an envelope with the COSE_Key the gateway published (no PEM involved)."""
    items = list(cbor2.loads(envelope).value)
    items[1] = dict(items[1])
    message = Sign1Message.from_cose_obj(items, True)
    message.key = CoseKey.decode(cose_key)
    return bool(message.verify_signature())


async def transfer(gw: Gateway, from_wallet: str, to_wallet: str, amount: int) -> dict[str, Any]:
    response = await gw.client.post("/v1/transfers", json={"from_wallet": from_wallet, "to_wallet": to_wallet,
                                                           "amount_fen": amount},
                                    headers={**gw.auth(Role.BACKEND), **idem()})
    assert response.status == 201, await response.text()
    document: dict[str, Any] = await response.json()
    return document


async def active_voucher_key(gw: Gateway) -> dict[str, Any]:
    """The voucher key devices are certified with now (made if there is none)."""
    keys = (await (await gw.client.get("/v1/keys", headers=gw.auth(Role.ADMIN))).json())["keys"]
    active = [key for key in keys if "voucher" in key["usage"] and key["status"] == "active"]
    return active[-1] if active else await make_key(gw, ["voucher"])


# --- one active key per usage ----------------------------------------------------------------------------


async def test_a_second_voucher_key_is_a_rotation_not_an_outage(gw: Gateway) -> None:
    """Threat: an admin makes a second `voucher` key and every device registration fails (409 ambiguous-key)."""
    first = await active_voucher_key(gw)
    wallet_a, wallet_b = await open_wallet(gw, 1, 100_000), await open_wallet(gw, 1)
    old_device = SimulatedDevice.create()
    registered = await register(gw, old_device, wallet_a)
    assert registered["kid"] == first["key_id"]
    old_voucher = await issue_load(gw, old_device.state.device_id, 1_000)
    head = await audit_head(gw)

    second = await make_key(gw, ["voucher"])  # what the admin did

    entry = [e for e in await audit_entries(gw, head) if e["action"] == "keys.create"][-1]
    assert entry["result"]["takes_over"] == {"voucher": first["key_id"]}
    assert second["active_for"] == ["voucher"]
    assert (await key_doc(gw, first["key_id"]))["active_for"] == []  # it signs the usage no more
    # Device registration keeps working, with the active key.
    new_device = SimulatedDevice.create()
    document = await register(gw, new_device, wallet_b)  # asserts 201
    assert document["kid"] == second["key_id"] and document["issuer_public_key_pem"] == second["public_key_pem"]
    claims = verify_with_pycose(base64.b64decode(document["certificate"]), second["public_key_pem"])
    assert claims["device_id"] == new_device.state.device_id
    # Old certificates and vouchers still verify: their kid still resolves to the old key's public key.
    old = await (await gw.client.get(f"/v1/devices/{old_device.state.device_id}",
                                     headers=gw.auth(Role.TELLER))).json()
    assert old["kid"] == first["key_id"] and old["issuer_public_key_pem"] == first["public_key_pem"]
    verify_with_pycose(base64.b64decode(old["certificate"]), old["issuer_public_key_pem"])
    envelope = base64.b64decode(old_voucher["voucher"])
    kid, to_be_signed, signature = sig_structure_of(envelope)
    assert kid == first["key_id"].encode()
    claims = verify_with_pycose(envelope, first["public_key_pem"])
    assert claims["amount"] == 1_000
    response = await verify(gw, kid.decode(), signature, message=to_be_signed)
    assert (await response.json())["valid"] is True


async def test_rotation_moves_the_ecny_key_and_old_envelopes_still_verify(gw: Gateway) -> None:
    """Threat: a rotated e-CNY key keeps signing, or rotation orphans the envelopes it signed."""
    payer, payee = await open_wallet(gw, 1, 100_000), await open_wallet(gw, 1)
    before = await transfer(gw, payer, payee, 100)
    old = await key_doc(gw, before["kid"])
    head = await audit_head(gw)
    new = await rotate(gw, old["key_id"])
    assert (new["family_id"], new["version"], new["status"]) == (old["family_id"], old["version"] + 1, "active")
    assert new["label"].startswith(old["label"].split(".v")[0]) and new["usage"] == old["usage"]
    assert new["algorithm"] == old["algorithm"] and new["key_id"] != old["key_id"]
    assert (await key_doc(gw, old["key_id"]))["status"] == "retired"
    entry = [e for e in await audit_entries(gw, head) if e["action"] == "keys.rotate"][-1]
    assert entry["decision"] == "allowed" and entry["result"]["previous_key_id"] == old["key_id"]
    assert entry["result"]["retired"] == [old["key_id"]] and entry["key_id"] == new["key_id"]
    after = await transfer(gw, payer, payee, 200)
    assert after["kid"] == new["key_id"]
    verify_with_pycose(base64.b64decode(after["envelope"]), new["public_key_pem"])
    # The old envelope still verifies, found by its kid — with pycose and through /verify.
    verify_with_pycose(base64.b64decode(before["envelope"]), old["public_key_pem"])
    kid, to_be_signed, signature = sig_structure_of(base64.b64decode(before["envelope"]))
    assert kid.decode() == old["key_id"]
    assert (await (await verify(gw, old["key_id"], signature, message=to_be_signed)).json())["valid"] is True
    # Rotating by naming the old version rotates the family again (it never forks it).
    third = await rotate(gw, old["key_id"])
    assert third["version"] == new["version"] + 1 and (await key_doc(gw, new["key_id"]))["status"] == "retired"
    assert (await transfer(gw, payer, payee, 300))["kid"] == third["key_id"]


async def test_a_disabled_ecny_key_refuses_the_transfer_before_anything_is_posted(gw: Gateway) -> None:
    """Threat: with the e-CNY key disabled (a suspected compromise), transfers are still posted, moving
    money with no envelope, or signed by some other key."""
    payer, payee = await open_wallet(gw, 1, 100_000), await open_wallet(gw, 1)
    signed = await transfer(gw, payer, payee, 100)  # positive control
    balances = [(await (await gw.client.get(f"/v1/wallets/{w}", headers=gw.auth(Role.BACKEND))).json())["balance_fen"]
                for w in (payer, payee)]
    response = await gw.client.post(f"/v1/keys/{signed['kid']}/disable", headers=gw.auth(Role.ADMIN))
    assert response.status == 200, await response.text()
    refused = await gw.client.post("/v1/transfers", json={"from_wallet": payer, "to_wallet": payee, "amount_fen": 7},
                                   headers={**gw.auth(Role.BACKEND), **idem()})
    problem = await assert_problem(refused, 409, "key-disabled")
    assert signed["kid"] in problem["detail"]
    after = [(await (await gw.client.get(f"/v1/wallets/{w}", headers=gw.auth(Role.BACKEND))).json())["balance_fen"]
             for w in (payer, payee)]
    assert after == balances  # nothing was posted
    # Positive control: the rotation signs again (and later tests of this module have an e-CNY key).
    new = await rotate(gw, signed["kid"])
    assert (await transfer(gw, payer, payee, 7))["kid"] == new["key_id"]


async def test_a_pinned_ecny_key_keeps_signing_when_a_new_key_takes_the_usage(gw: Gateway) -> None:
    """Threat: with `ecny.key_id` set, an admin's new `ecny` key stops every transfer."""
    payer, payee = await open_wallet(gw, 1, 100_000), await open_wallet(gw, 1)
    pinned = await make_key(gw, ["ecny"])
    gw.settings.ecny.key_id = pinned["key_id"]
    try:
        newer = await make_key(gw, ["ecny"])  # takes the usage over
        assert newer["active_for"] == ["ecny"] and (await key_doc(gw, pinned["key_id"]))["status"] == "active"
        assert (await transfer(gw, payer, payee, 10))["kid"] == pinned["key_id"]  # the setting still decides
        rotated = await rotate(gw, pinned["key_id"])  # the pin names the family: its new version signs
        assert (await transfer(gw, payer, payee, 20))["kid"] == rotated["key_id"]
    finally:
        gw.settings.ecny.key_id = None
    assert (await transfer(gw, payer, payee, 30))["kid"] == rotated["key_id"]  # the rotation took the usage over


async def test_a_retired_version_is_refused_for_signing(gw: Gateway) -> None:
    """Threat: a client keeps signing with a superseded raw key version after a rotation."""
    old = await make_key(gw, ["raw"])
    digest = hashlib.sha256(b"before").digest()
    assert (await sign_raw(gw, old["key_id"], digest)).status == 200
    new = await rotate(gw, old["key_id"])
    await assert_problem(await sign_raw(gw, old["key_id"], digest), 409, "key-retired")
    batch = await gw.client.post("/v1/sign/batch", json={"key_id": old["key_id"], "digests": [digest.hex()]},
                                 headers=gw.auth(Role.BACKEND))
    await assert_problem(batch, 409, "key-retired")
    # Positive control: the new version signs, and its signature verifies with its own public key.
    response = await sign_raw(gw, new["key_id"], digest)
    assert response.status == 200
    signature = bytes.fromhex((await response.json())["signature"])
    public = serialization.load_pem_public_key(new["public_key_pem"].encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(encode_dss_signature(int.from_bytes(signature[:32]), int.from_bytes(signature[32:])), digest,
                  ec.ECDSA(Prehashed(hashes.SHA256())))


async def test_a_disabled_key_signs_nothing_but_what_it_signed_still_verifies(gw: Gateway) -> None:
    """Threat: a key an administrator stopped (say, suspected compromised) still signs."""
    key = await make_key(gw, ["raw"])
    digest = hashlib.sha256(b"signed before the disable").digest()
    signature = bytes.fromhex((await (await sign_raw(gw, key["key_id"], digest)).json())["signature"])
    head = await audit_head(gw)
    response = await gw.client.post(f"/v1/keys/{key['key_id']}/disable", headers=gw.auth(Role.ADMIN))
    assert response.status == 200 and (await response.json())["status"] == "disabled"
    await assert_problem(await sign_raw(gw, key["key_id"], digest), 409, "key-disabled")
    result = await (await verify(gw, key["key_id"], signature, digest=digest)).json()
    assert result["valid"] is True and result["status"] == "disabled"
    # Disabling again changes nothing and writes nothing.
    again = await gw.client.post(f"/v1/keys/{key['key_id']}/disable", headers=gw.auth(Role.ADMIN))
    assert again.status == 200
    entries = [e for e in await audit_entries(gw, head) if e["action"] == "keys.disable"]
    assert len(entries) == 1 and entries[0]["key_id"] == key["key_id"]
    assert entries[0]["result"]["previous_status"] == "active"


class StatusChangeWhileSigning:
    """The runtime's signer, wrapped: while the HSM signs with ``key_id``, an administrator disables or
    rotates that key over the API (a second request, served meanwhile) — the race of an insider who
    sent a signature request just before the key was stopped."""

    def __init__(self, gw: Gateway, signer: Signer, key_id: str, action: str) -> None:
        self.gw, self.signer, self.key_id, self.action = gw, signer, key_id, action
        self.made: list[bytes] = []

    async def sign(self, key_id: str, algorithm: str, data: bytes) -> bytes:
        signature = await self.signer.sign(key_id, algorithm, data)
        if key_id == self.key_id:
            self.made.append(signature)
            response = await self.gw.client.post(f"/v1/keys/{key_id}/{self.action}", headers=self.gw.auth(Role.ADMIN))
            assert response.status in (200, 201), await response.text()
        return signature

    def __getattr__(self, name: str) -> Any:
        return getattr(self.signer, name)


@pytest.mark.parametrize(("action", "code"), [("disable", "key-disabled"), ("rotate", "key-retired")])
async def test_a_key_stopped_while_its_signature_is_made_releases_nothing(
        gw: Gateway, monkeypatch: pytest.MonkeyPatch, action: str, code: str) -> None:
    """Threat: a raw signature requested just before an administrator disables (or rotates away) the key
    still leaves — the status was read before the HSM signed and the stop committed before the answer.
    The status is checked again in the transaction that releases the signature: the HSM's signature is
    withheld, and the one audit entry says so (with its hash), once."""
    key = await make_key(gw, ["raw"])
    digest = hashlib.sha256(f"stopped mid-flight by {action}".encode()).digest()
    runtime = gw.client.app[RUNTIME]
    # Positive control: the same key, unwrapped, signs (and this process caches its record as active).
    assert (await sign_raw(gw, key["key_id"], digest)).status == 200
    head = await audit_head(gw)
    racing = StatusChangeWhileSigning(gw, runtime.signer, key["key_id"], action)
    monkeypatch.setattr(runtime, "signer", racing)
    response = await sign_raw(gw, key["key_id"], digest)
    monkeypatch.undo()
    assert len(racing.made) == 1  # the HSM did sign: what matters is that it does not leave
    problem = await assert_problem(response, 409, code)
    assert "signature" not in problem and racing.made[0].hex() not in await response.text()
    entries = [e for e in await audit_entries(gw, head) if e["action"] == "keys.sign"]
    assert len(entries) == 1, entries  # the refusal is written once, in the releasing transaction
    (entry,) = entries
    assert entry["decision"] == "refused" and entry["reasons"] == [code] and entry["key_id"] == key["key_id"]
    assert entry["payload_hash"] == hashlib.sha256(digest).hexdigest()
    assert entry["result"]["withheld"] == {"signature_sha256": hashlib.sha256(racing.made[0]).hexdigest()}
    # And from now on the key is refused before the HSM is asked.
    again = StatusChangeWhileSigning(gw, runtime.signer, key["key_id"], action)
    monkeypatch.setattr(runtime, "signer", again)
    await assert_problem(await sign_raw(gw, key["key_id"], digest), 409, code)
    assert again.made == []


async def test_disabling_the_active_voucher_key_stops_the_usage_until_it_is_rotated(gw: Gateway) -> None:
    """Threat: a disabled voucher key is silently replaced by some other key, or still certifies devices."""
    key = await make_key(gw, ["voucher"])
    wallet_id = await open_wallet(gw, 1)
    response = await gw.client.post(f"/v1/keys/{key['key_id']}/disable", headers=gw.auth(Role.ADMIN))
    assert response.status == 200
    info = SimulatedDevice.create().info()
    refused = await gw.client.post("/v1/devices", json={"wallet_id": wallet_id, "device_id": info["device_id"],
                                                        "public_key_pem": info["public_key_pem"],
                                                        "model": info["model"]}, headers=gw.auth(Role.TELLER))
    problem = await assert_problem(refused, 409, "key-disabled")
    assert key["key_id"] in problem["detail"] and "rotate" in problem["detail"]
    # Positive control: the rotation of the disabled key certifies devices again.
    new = await rotate(gw, key["key_id"])
    document = await register(gw, SimulatedDevice.create(), wallet_id)
    assert document["kid"] == new["key_id"]
    assert (await key_doc(gw, key["key_id"]))["status"] == "disabled"  # a rotation does not revive it


async def voucher_holder(gw: Gateway) -> dict[str, Any]:
    """The key that signs vouchers and certificates now (made if there is none)."""
    keys = (await (await gw.client.get("/v1/keys", headers=gw.auth(Role.ADMIN))).json())["keys"]
    holders = [key for key in keys if "voucher" in key["active_for"]]
    return holders[0] if holders else await make_key(gw, ["voucher"])


async def recertify(gw: Gateway, device_id: str) -> Any:
    return await gw.client.post(f"/v1/devices/{device_id}/certificate", headers=gw.auth(Role.TELLER))


def rogue_issuer() -> tuple[ec.EllipticCurvePrivateKey, bytes, str]:
    """An insider's own P-256 key, posing as a voucher key: (private key, point, PEM)."""
    private = ec.generate_private_key(ec.SECP256R1())
    point = private.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return private, point, offline.pem_from_point(point)


async def test_a_device_follows_a_voucher_key_rotation_only_along_the_old_keys_endorsement(gw: Gateway) -> None:
    """Threat: after a voucher-key rotation the devices are stranded (they refuse every new voucher), or
    whoever holds a device's serial link re-pins it to a key of their own and loads vouchers they signed.
    The outgoing key endorses its successor at the rotation; re-certification hands the device the new
    certificate with that endorsement, and the device takes no other issuer."""
    first = await voucher_holder(gw)
    wallet_id = await open_wallet(gw, 1, 100_000)
    device = SimulatedDevice.create()
    await register(gw, device, wallet_id)
    await load(gw, device, 1_000)
    head = await audit_head(gw)
    middle = await rotate(gw, first["key_id"])  # two rotations before the device comes back
    new = await rotate(gw, middle["key_id"])
    rotations = [e for e in await audit_entries(gw, head) if e["action"] == "keys.rotate"]
    assert [e["result"]["endorsed_by"] for e in rotations] == [first["key_id"], middle["key_id"]]
    answer = await recertify(gw, device.state.device_id)
    assert answer.status == 200, await answer.text()
    document = await answer.json()
    assert document["kid"] == new["key_id"] and document["issuer_public_key_pem"] == new["public_key_pem"]
    certificate = base64.b64decode(document["certificate"])
    chain = [base64.b64decode(item) for item in document["endorsements"]]
    assert len(chain) == 2
    # An independent reading of the endorsements: pycose verifies each with its outgoing key alone, and
    # each names the next key as the successor.
    for endorsement, old, successor in zip(chain, (first, middle), (middle, new), strict=True):
        claims = verify_with_pycose(endorsement, old["public_key_pem"])
        assert claims["type"] == "endorsement"
        assert offline.point_from_cose_key(claims["old"]) == offline.point_from_pem(old["public_key_pem"])
        assert offline.point_from_cose_key(claims["new"]) == offline.point_from_pem(successor["public_key_pem"])
    # The attacks, each refused by the device: the new key's certificate without the endorsements, with
    # half of them or with them out of order; an insider's own issuer with no endorsement, with one it
    # signed itself, with one posing as the old key's, and with the genuine chain (which leads to the new
    # key, not to theirs), even followed by their own.
    private, point, pem = rogue_issuer()
    now = int(time.time() * 1000)
    caps = offline.Caps(1_000_000, 1_000_000, 100)
    rogue_certificate = offline.device_sign1(private, b"rogue", offline.Certificate(
        device.state.device_id, wallet_id, device.point, 1, caps, now, now + 86_400_000).payload())
    self_endorsed = offline.device_sign1(private, b"rogue", offline.Endorsement(point, point, now).payload())
    posing = offline.device_sign1(private, b"rogue", offline.Endorsement(
        offline.point_from_pem(first["public_key_pem"]), point, now).payload())
    for attempt, issuer, endorsements in ((certificate, new["public_key_pem"], []),
                                          (certificate, new["public_key_pem"], chain[:1]),
                                          (certificate, new["public_key_pem"], chain[::-1]),
                                          (rogue_certificate, pem, []), (rogue_certificate, pem, [self_endorsed]),
                                          (rogue_certificate, pem, [posing]), (rogue_certificate, pem, chain),
                                          (rogue_certificate, pem, [*chain, self_endorsed])):
        with pytest.raises(DeviceRefused) as refused:
            device.certify(attempt, issuer, endorsements)
        assert refused.value.extra["device_code"] == "issuer-not-endorsed"
    # Positive control: the genuine certificate with the genuine chain; a voucher from the new key loads.
    device.certify(certificate, document["issuer_public_key_pem"], chain)
    await load(gw, device, 500)
    assert device.balance == 1_500
    recorded = [e for e in await audit_entries(gw, head) if e["action"] == "devices.recertify"]
    assert [(e["result"]["previous_kid"], e["result"]["kid"], e["result"]["endorsements"]) for e in recorded] == [
        (first["key_id"], new["key_id"], 2)]
    # A renewal under the same key needs no endorsement.
    again = await (await recertify(gw, device.state.device_id)).json()
    assert again["kid"] == new["key_id"] and again["endorsements"] == []
    device.certify(base64.b64decode(again["certificate"]), again["issuer_public_key_pem"])


async def test_devices_pay_each_other_across_a_rotation_and_take_no_other_issuer(gw: Gateway) -> None:
    """Threat, both ways: after a voucher-key rotation, devices certified again refuse payments from devices
    not yet certified again (and the other way round), so a rotation strands offline payments; or a payee
    takes a payer certificate from any key the payer names — an insider's own issuer, with an endorsement
    chain of their own making. A payer shows its chain; the payee follows it from its own pinned key only,
    and trusts the keys it was pinned to before."""
    first = await voucher_holder(gw)
    wallet_id = await open_wallet(gw, 1, 100_000)
    early, late = SimulatedDevice.create(), SimulatedDevice.create()
    for device in (early, late):
        await register(gw, device, wallet_id)
        await load(gw, device, 3_000)
    middle = await rotate(gw, first["key_id"])
    between = SimulatedDevice.create()  # certified by the key in the middle
    await register(gw, between, wallet_id)
    await load(gw, between, 3_000)
    new = await rotate(gw, middle["key_id"])
    document = await (await recertify(gw, early.state.device_id)).json()  # `late` is not seen again yet
    early.certify(base64.b64decode(document["certificate"]), document["issuer_public_key_pem"],
                  [base64.b64decode(item) for item in document["endorsements"]])
    assert document["kid"] == new["key_id"]
    # The payee pinned on the old key follows the payer's chain to the new key...
    paid = early.pay(late.state.device_id, 200)
    assert len(paid["endorsements"]) == 2
    with pytest.raises(DeviceRefused) as refused:  # (without its chain, the payer is a stranger)
        late.receive(paid["payment"], paid["certificate"])
    assert refused.value.extra["device_code"] == "bad-certificate"
    late.receive(paid["payment"], paid["certificate"], endorsements=paid["endorsements"])
    # ...and the payee certified again takes the payer still on the key it was pinned to before, or on one
    # it was handed over through (a device certified between the two rotations).
    back = late.pay(early.state.device_id, 300)
    early.receive(back["payment"], back["certificate"], endorsements=back["endorsements"])
    across = between.pay(early.state.device_id, 400)
    early.receive(across["payment"], across["certificate"], endorsements=across["endorsements"])
    assert [offline.point_from_pem(pem) for pem in early.state.former_issuers] == [
        offline.point_from_pem(first["public_key_pem"]), offline.point_from_pem(middle["public_key_pem"])]
    # The attacks: an insider's own issuer certifies a device they hold (its key is theirs too), with no
    # chain, with one they signed themselves, with one posing as the old key's, with the genuine chain
    # followed by their own hand-over, and a chain that starts at a key the payee never pinned.
    private, point, _ = rogue_issuer()
    now = int(time.time() * 1000)
    stranger = SimulatedDevice.create()
    stranger.state.loads.append({"load_seq": 1, "amount": 5_000, "exp": now + 86_400_000, "at": now})
    stranger.certify(offline.device_sign1(private, b"rogue", offline.Certificate(
        stranger.state.device_id, wallet_id, stranger.point, 1, offline.Caps(1_000_000, 1_000_000, 100), now,
        now + 86_400_000).payload()), offline.pem_from_point(point))
    chain = paid["endorsements"]
    own = offline.device_sign1(private, b"rogue", offline.Endorsement(point, point, now).payload())
    posing = offline.device_sign1(private, b"rogue", offline.Endorsement(
        offline.point_from_pem(first["public_key_pem"]), point, now).payload())
    onto_theirs = offline.device_sign1(private, b"rogue", offline.Endorsement(
        offline.point_from_pem(new["public_key_pem"]), point, now).payload())
    elsewhere = offline.device_sign1(private, b"rogue", offline.Endorsement(
        offline.point_from_pem(middle["public_key_pem"]), point, now).payload())
    for payee in (early, late):
        for endorsements in ([], [own], [posing], [*chain, onto_theirs], [elsewhere], chain):
            forged = stranger.pay(payee.state.device_id, 100)
            with pytest.raises(DeviceRefused) as refused:
                payee.receive(forged["payment"], forged["certificate"], endorsements=endorsements)
            assert refused.value.extra["device_code"] == "bad-certificate", endorsements
    assert (late.state.rx, early.state.rx) == (1, 2)  # only the genuine payments were taken


async def test_a_disabled_voucher_key_endorses_nothing(gw: Gateway) -> None:
    """Threat: a voucher key disabled as compromised still hands its devices over (whoever stole it could
    then endorse a key of their own). Its successor comes with no endorsement: re-certifying a device it
    certified is refused (409), and such a device is provisioned again."""
    key = await voucher_holder(gw)
    wallet_id = await open_wallet(gw, 1)
    device = SimulatedDevice.create()
    await register(gw, device, wallet_id)
    assert (await gw.client.post(f"/v1/keys/{key['key_id']}/disable", headers=gw.auth(Role.ADMIN))).status == 200
    head = await audit_head(gw)
    successor = await rotate(gw, key["key_id"])
    rotation = [e for e in await audit_entries(gw, head) if e["action"] == "keys.rotate"][-1]
    assert "endorsed_by" not in rotation["result"]
    problem = await assert_problem(await recertify(gw, device.state.device_id), 409, "issuer-not-endorsed")
    assert key["key_id"] in problem["detail"] and successor["key_id"] in problem["detail"]
    # Unknown and stopped devices are refused as such.
    await assert_problem(await recertify(gw, "no-such-device"), 404, "device-not-found")


async def test_rotate_and_disable_need_the_key_admin(gw: Gateway) -> None:
    """Threat: a backend client or a teller rotates or disables the institution's keys."""
    key = await make_key(gw, ["raw"])
    for role in (Role.BACKEND, Role.TELLER, Role.AUDITOR):
        for action in ("rotate", "disable"):
            response = await gw.client.post(f"/v1/keys/{key['key_id']}/{action}", headers=gw.auth(role))
            await assert_problem(response, 403, "forbidden")
    assert (await key_doc(gw, key["key_id"]))["status"] == "active"


async def test_rotation_of_an_unknown_key_is_a_problem_not_a_crash(gw: Gateway) -> None:
    """Threat: a rotate or disable of an unknown or malformed key id ends in a 500 or a traceback."""
    for path in ("rotate", "disable"):
        response = await gw.client.post(f"/v1/keys/{'0' * 32}/{path}", headers=gw.auth(Role.ADMIN))
        await assert_problem(response, 404, "key-not-found")
    response = await gw.client.post("/v1/keys/not-a-key/rotate", headers=gw.auth(Role.ADMIN))
    await assert_problem(response, 404, "key-not-found")


async def _checkpoints_by(gw: Gateway, key_id: str) -> list[dict[str, Any]]:
    """Sign raw digests (each an audit entry) until the audit log has a checkpoint signed by ``key_id``."""
    raw = await make_key(gw, ["raw"])
    for _ in range(100):
        response = await gw.client.get("/v1/audit/checkpoints", params={"after": "0", "limit": "1000"},
                                       headers=gw.auth(Role.AUDITOR))
        found = [c for c in (await response.json())["checkpoints"] if c["key_id"] == key_id]
        if found:
            return found
        assert (await sign_raw(gw, raw["key_id"], secrets.token_bytes(32))).status == 200
    raise AssertionError(f"no checkpoint signed by {key_id}")


async def test_audit_checkpoints_signed_before_a_rotation_still_verify(gw: Gateway) -> None:
    """Threat: rotating the audit key orphans the checkpoints it signed, and the chain stops verifying."""
    keys = (await (await gw.client.get("/v1/keys", headers=gw.auth(Role.ADMIN))).json())["keys"]
    old = next(key for key in keys if "audit" in key["active_for"])
    assert await _checkpoints_by(gw, old["key_id"])
    new = await rotate(gw, old["key_id"])
    assert new["active_for"] == ["audit"]
    assert await _checkpoints_by(gw, new["key_id"])
    report = await (await gw.client.get("/v1/audit/verify", headers=gw.auth(Role.AUDITOR))).json()
    assert report["ok"] is True and report["problem"] == "" and report["first_bad_seq"] is None, report
    assert report["checkpoints"] >= 2


# --- verify ----------------------------------------------------------------------------------------------


async def test_verify_accepts_only_the_keys_own_signature(gw: Gateway) -> None:
    """Threat: /verify calls a signature valid that this key did not make (another key's, or a tampered one)."""
    p256, k1, ed = (await make_key(gw, ["raw"], "ecdsa-p256"), await make_key(gw, ["raw"], "ecdsa-secp256k1"),
                    await make_key(gw, ["raw"], "ed25519"))
    message = b"pay 100 fen to 8000000000000001"
    for key, digest in ((p256, hashlib.sha256(message).digest()), (k1, keccak(message))):
        signed = await (await sign_raw(gw, key["key_id"], digest)).json()
        raw, der = bytes.fromhex(signed["signature"]), bytes.fromhex(signed["der"])
        for form in (raw, der, raw + b"\x1b"):  # r‖s, DER, r‖s‖v
            assert (await (await verify(gw, key["key_id"], form, digest=digest)).json())["valid"] is True
        assert (await (await verify(gw, key["key_id"], raw, message=message)).json())["valid"] is True
        tampered = bytes([raw[0] ^ 1]) + raw[1:]
        assert (await (await verify(gw, key["key_id"], tampered, digest=digest)).json())["valid"] is False
        other = hashlib.sha256(b"another message").digest()
        assert (await (await verify(gw, key["key_id"], raw, digest=other)).json())["valid"] is False
    ed_signature = bytes.fromhex((await (await sign_raw(gw, ed["key_id"], message)).json())["signature"])
    assert (await (await verify(gw, ed["key_id"], ed_signature, message=message)).json())["valid"] is True
    assert (await (await verify(gw, ed["key_id"], ed_signature, message=message + b"!")).json())["valid"] is False
    # Another key's signature is not this key's.
    p256_signature = bytes.fromhex((await (await sign_raw(gw, p256["key_id"], hashlib.sha256(message).digest())
                                          ).json())["signature"])
    other_key = await make_key(gw, ["raw"], "ecdsa-p256")
    result = await (await verify(gw, other_key["key_id"], p256_signature, message=message)).json()
    assert result["valid"] is False
    # Bad requests are problems, not answers.
    both = await gw.client.post(f"/v1/keys/{p256['key_id']}/verify", headers=gw.auth(Role.AUDITOR),
                                json={"digest": "00" * 32, "message": "00", "signature": "00" * 64})
    await assert_problem(both, 400, "validation-failed")
    short = await verify(gw, p256["key_id"], p256_signature, digest=b"\x00" * 20)
    await assert_problem(short, 400, "validation-failed")
    for garbage in (b"\x30\x02\x00", bytes.fromhex("30060201ff020101"), b"\x00" * 10):  # torn DER, r = -1, short
        response = await verify(gw, p256["key_id"], garbage, digest=hashlib.sha256(message).digest())
        assert response.status == 200 and (await response.json())["valid"] is False


# --- public keys as JWK and COSE_Key -------------------------------------------------------------------


async def public(gw: Gateway, key_id: str, form: str) -> dict[str, Any]:
    response = await gw.client.get(f"/v1/keys/{key_id}/public", params={"format": form}, headers=gw.auth(Role.AUDITOR))
    assert response.status == 200, await response.text()
    document: dict[str, Any] = await response.json()
    return document


async def test_public_keys_as_jwk_and_cose_key_read_by_independent_libraries(gw: Gateway) -> None:
    """Threat: a published JWK or COSE_Key names another key than the one that signs (wrong curve or point)."""
    for algorithm in ("ecdsa-p256", "ecdsa-secp256k1", "ed25519"):
        key = await make_key(gw, ["raw"], algorithm)
        pem = serialization.load_pem_public_key(key["public_key_pem"].encode())
        document = (await public(gw, key["key_id"], "jwk"))["jwk"]
        imported = jwcrypto_jwk.JWK(**document)
        assert imported.get("kid") == key["key_id"] and not imported.has_private
        expected_pem = pem.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        assert imported.export_to_pem() == expected_pem, algorithm
        cose = CoseKey.decode(bytes.fromhex((await public(gw, key["key_id"], "cose"))["cose_key"]))
        assert cose.kid == key["key_id"].encode()
        if algorithm == "ed25519":
            assert isinstance(pem, ed25519.Ed25519PublicKey)
            assert document["kty"] == "OKP" and document["crv"] == "Ed25519"
            assert cose.x == pem.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        else:
            assert isinstance(pem, ec.EllipticCurvePublicKey)
            assert document["crv"] == ("P-256" if algorithm == "ecdsa-p256" else "secp256k1")
            numbers = pem.public_numbers()
            assert (cose.x, cose.y) == (numbers.x.to_bytes(32, "big"), numbers.y.to_bytes(32, "big"))
        assert (await public(gw, key["key_id"], "pem"))["public_key_pem"] == key["public_key_pem"]
    refused = await gw.client.get(f"/v1/keys/{key['key_id']}/public", params={"format": "x509"},
                                  headers=gw.auth(Role.AUDITOR))
    await assert_problem(refused, 400, "validation-failed")


async def test_an_envelope_verifies_with_the_published_cose_key_alone(gw: Gateway) -> None:
    """Threat: a relying party given only the COSE_Key cannot check the gateway's envelopes (or a wrong
    one passes)."""
    payer, payee = await open_wallet(gw, 1, 10_000), await open_wallet(gw, 1)
    made = await transfer(gw, payer, payee, 50)
    envelope = base64.b64decode(made["envelope"])
    cose_key = bytes.fromhex((await public(gw, made["kid"], "cose"))["cose_key"])
    assert verify_sign1_with_cose_key(envelope, cose_key)
    other = await make_key(gw, ["raw"])
    assert not verify_sign1_with_cose_key(envelope, bytes.fromhex((await public(gw, other["key_id"], "cose"))[
        "cose_key"]))


# --- an existing database -------------------------------------------------------------------------------


async def test_a_database_with_two_voucher_keys_upgrades_to_one_active_key(store_dsn: str) -> None:
    """Threat: a database where an admin already made a second `voucher` key stays broken after the upgrade
    (every registration 409 `ambiguous-key`), or the upgrade silently picks the older key."""
    from gateway.keys import KeyStatus, Usage, key_for_usage
    from gateway.ledger.engines import open_database
    from gateway.ledger.migrate import _statements, migration_files

    database = await open_database(store_dsn)
    try:
        def before_key_versions(tx: Any) -> None:  # the schema as it was before 0013
            tx.execute("CREATE TABLE schema_migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
            for name, sql in migration_files("postgresql" if store_dsn.startswith("postgresql") else "sqlite"):
                if name >= "0013":
                    break
                for statement in _statements(sql):
                    tx.execute(statement)
                tx.execute("INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)", (name, "2026-01-01"))
            for key_id, label, usages, created in (("a" * 32, "voucher-2025", "voucher", "2025-01-01T00:00:00Z"),
                                                   ("b" * 32, "voucher-2026", "voucher", "2026-01-01T00:00:00Z"),
                                                   ("c" * 32, "ecny-2025", "ecny", "2025-01-01T00:00:00Z")):
                tx.execute("INSERT INTO keys (key_id, label, algorithm, usages, public_key, created_at, created_by) "
                           "VALUES (?, ?, 'ecdsa-p256', ?, ?, ?, 'admin')", (key_id, label, usages, b"\x04" * 65,
                                                                              created))

        await database.write(before_key_versions)
        applied = await database.migrate()
        assert applied == [name for name, _ in migration_files("sqlite") if name >= "0013"]

        def state(tx: Any) -> tuple[dict[str, str], Any, Any, Any]:
            active = {row["usage"]: row["key_id"] for row in tx.fetchall("SELECT usage, key_id FROM key_usage_active")}
            return (active, key_for_usage(tx, Usage.VOUCHER, None, "offline.key_id"),
                    key_for_usage(tx, Usage.VOUCHER, "a" * 32, "offline.key_id"),
                    key_for_usage(tx, Usage.ECNY, None, "ecny.key_id"))

        active, voucher, pinned, ecny = await database.read(state)
        assert active == {"voucher": "b" * 32, "ecny": "c" * 32}  # the newest key of each usage
        assert voucher.key_id == "b" * 32 and voucher.family == "b" * 32 and voucher.version == 1
        assert pinned.key_id == "a" * 32 and pinned.status is KeyStatus.ACTIVE  # a configured key id still wins
        assert ecny.key_id == "c" * 32
    finally:
        await database.close()
