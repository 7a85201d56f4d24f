"""Signing through the API with keys generated inside a real SoftHSM2 token, checked by other code:
`cryptography` for P-256 and Ed25519, `coincurve` for secp256k1."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import coincurve
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, utils

from gateway.auth.roles import Role
from tests.conftest import Gateway

pytestmark = pytest.mark.softhsm


def _public(document: dict[str, Any]) -> Any:
    return serialization.load_pem_public_key(document["public_key_pem"].encode())


async def test_p256_signature_verifies_with_cryptography(gateway: Gateway, raw_keys: dict[str, Any]) -> None:
    key = raw_keys["p256"]
    digest = hashlib.sha256(b"pay 100 fen").digest()
    response = await gateway.client.post(
        f"/v1/keys/{key['key_id']}/sign", json={"digest": digest.hex()}, headers=gateway.auth(Role.BACKEND)
    )
    assert response.status == 200, await response.text()
    body = await response.json()
    signature = bytes.fromhex(body["signature"])
    assert len(signature) == 64
    public = _public(key)
    assert isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256R1)
    public.verify(bytes.fromhex(body["der"]), digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    r, s = utils.decode_dss_signature(bytes.fromhex(body["der"]))
    assert signature == r.to_bytes(32, "big") + s.to_bytes(32, "big")


async def test_ed25519_signature_verifies_with_cryptography(gateway: Gateway, raw_keys: dict[str, Any]) -> None:
    key = raw_keys["ed"]
    message = b"an arbitrary message, not a digest"
    response = await gateway.client.post(
        f"/v1/keys/{key['key_id']}/sign", json={"digest": message.hex()}, headers=gateway.auth(Role.BACKEND)
    )
    assert response.status == 200, await response.text()
    body = await response.json()
    assert "der" not in body
    public = _public(key)
    assert isinstance(public, ed25519.Ed25519PublicKey)
    public.verify(bytes.fromhex(body["signature"]), message)


async def test_secp256k1_signature_verifies_with_coincurve(gateway: Gateway, raw_keys: dict[str, Any]) -> None:
    key = raw_keys["k1"]
    point = _public(key).public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    verifier = coincurve.PublicKey(point)
    for _ in range(8):
        digest = os.urandom(32)
        response = await gateway.client.post(
            f"/v1/keys/{key['key_id']}/sign", json={"digest": digest.hex()}, headers=gateway.auth(Role.BACKEND)
        )
        body = await response.json()
        # coincurve (libsecp256k1) accepts only low-S signatures; normalise as any verifier would.
        r, s = utils.decode_dss_signature(bytes.fromhex(body["der"]))
        n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
        s = min(s, n - s)
        assert verifier.verify(utils.encode_dss_signature(r, s), digest, hasher=None)


async def test_secp256k1_key_document_has_eip55_address(raw_keys: dict[str, Any]) -> None:
    from eth_keys import keys as eth

    key = raw_keys["k1"]
    point = _public(key).public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    assert key["address"] == eth.PublicKey(point[1:]).to_checksum_address()
    assert "address" not in raw_keys["p256"]


async def test_batch_signatures_in_request_order(gateway: Gateway, raw_keys: dict[str, Any]) -> None:
    key = raw_keys["p256"]
    digests = [hashlib.sha256(str(i).encode()).digest() for i in range(250)]
    response = await gateway.client.post(
        "/v1/sign/batch", json={"key_id": key["key_id"], "digests": [d.hex() for d in digests]},
        headers=gateway.auth(Role.BACKEND),
    )
    assert response.status == 200, await response.text()
    signatures = (await response.json())["signatures"]
    assert len(signatures) == len(digests)
    public = _public(key)
    for digest, signature in zip(digests, signatures, strict=True):
        raw = bytes.fromhex(signature)
        der = utils.encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
        public.verify(der, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


async def test_private_keys_are_sensitive_and_not_extractable(gateway: Gateway, raw_keys: dict[str, Any]) -> None:
    from gateway.runtime import RUNTIME

    signer = gateway.client.server.app[RUNTIME].signer
    for key in raw_keys.values():
        attributes = await signer.key_attributes(key["key_id"])
        assert attributes["sensitive"] is True
        assert attributes["extractable"] is False
        assert attributes["always_sensitive"] is True
        assert attributes["never_extractable"] is True
        assert attributes["token"] is True
