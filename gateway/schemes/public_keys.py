"""Public keys as JWK (RFC 7517; EC keys per RFC 7518 §6.2, secp256k1 per RFC 8812, Ed25519 as OKP per
RFC 8037) and as COSE_Key (RFC 9052 §7, RFC 9053 §7; secp256k1 per RFC 8812).

Pure: encodings of a public key the gateway already holds. SM2 has no registered JWK or COSE curve:
asking for one is refused (VerificationUnsupported), never answered with a made-up name.
"""

from __future__ import annotations

import base64
from typing import Any

import cbor2

from gateway.errors import VerificationUnsupported
from gateway.signing import Algorithm

#: JWK ``crv`` and ``alg`` per algorithm.
_JWK: dict[Algorithm, tuple[str, str, str]] = {  # kty, crv, alg
    Algorithm.ECDSA_P256: ("EC", "P-256", "ES256"),
    Algorithm.ECDSA_SECP256K1: ("EC", "secp256k1", "ES256K"),
    Algorithm.ED25519: ("OKP", "Ed25519", "EdDSA"),
}

# COSE_Key labels (RFC 9052 §7.1, RFC 9053 §7.1-7.2).
COSE_KTY, COSE_KID, COSE_ALG = 1, 2, 3
COSE_CRV, COSE_X, COSE_Y = -1, -2, -3
KTY_OKP, KTY_EC2 = 1, 2
#: COSE kty, crv and alg per algorithm (P-256 = 1, secp256k1 = 8, Ed25519 = 6; ES256 = -7, EdDSA = -8).
#: secp256k1 keys sign EVM transactions and raw digests, never COSE: their COSE_Key names no ``alg``
#: (it is optional, RFC 9052 §7.1) rather than claim ES256K (-47, RFC 8812) for a key that never uses it.
_COSE: dict[Algorithm, tuple[int, int, int | None]] = {
    Algorithm.ECDSA_P256: (KTY_EC2, 1, -7),
    Algorithm.ECDSA_SECP256K1: (KTY_EC2, 8, None),
    Algorithm.ED25519: (KTY_OKP, 6, -8),
}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unsupported(algorithm: Algorithm, what: str) -> VerificationUnsupported:
    return VerificationUnsupported(f"{algorithm.value} has no registered {what} encoding")


def _coordinates(public_key: bytes) -> tuple[bytes, bytes]:
    """x and y of an uncompressed SEC1 point (04 ‖ x ‖ y)."""
    if len(public_key) != 65 or public_key[0] != 0x04:
        raise ValueError("an EC public key is stored as a 65-byte uncompressed point")
    return public_key[1:33], public_key[33:]


def jwk(algorithm: Algorithm, public_key: bytes, kid: str) -> dict[str, Any]:
    """The public JWK of a key (``use`` = ``sig``, ``kid`` = the gateway's key id)."""
    if algorithm not in _JWK:
        raise _unsupported(algorithm, "JWK")
    kty, crv, alg = _JWK[algorithm]
    document: dict[str, Any] = {"kty": kty, "crv": crv}
    if kty == "OKP":
        document["x"] = _b64url(public_key)
    else:
        x, y = _coordinates(public_key)
        document["x"], document["y"] = _b64url(x), _b64url(y)
    document.update({"kid": kid, "use": "sig", "alg": alg})
    return document


def cose_key(algorithm: Algorithm, public_key: bytes, kid: bytes, alg: int | None = None) -> bytes:
    """The COSE_Key (CBOR map) of a public key; ``kid`` as in the key's COSE_Sign1 headers, ``alg`` the
    COSE algorithm it signs with (the registered one when None; none for secp256k1)."""
    if algorithm not in _COSE:
        raise _unsupported(algorithm, "COSE_Key")
    kty, crv, default_alg = _COSE[algorithm]
    key: dict[int, Any] = {COSE_KTY: kty, COSE_KID: kid, COSE_CRV: crv}
    chosen = alg if alg is not None else default_alg
    if chosen is not None:
        key[COSE_ALG] = chosen
    if kty == KTY_OKP:
        key[COSE_X] = public_key
    else:
        key[COSE_X], key[COSE_Y] = _coordinates(public_key)
    return cbor2.dumps(key, canonical=True)
