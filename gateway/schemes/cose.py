"""COSE_Sign1 (RFC 9052 §4.2) assembled around a signature made in the HSM.

No COSE library can ask a PKCS#11 token to sign, so this small part is written by hand and
tested against an independent implementation (pycose). Structure:

    COSE_Sign1 = #6.18([protected: bstr .cbor {1: alg, 4: kid}, unprotected: {}, payload: bstr, signature: bstr])
    Sig_structure = ["Signature1", protected, external_aad: h'', payload]

ECDSA signs SHA-256(Sig_structure) and COSE carries it as raw r‖s (RFC 9053 §2.1); EdDSA signs
Sig_structure itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cbor2

from gateway.errors import ValidationFailed
from gateway.signing import Algorithm, Signer, signing_input, verify

COSE_SIGN1_TAG = 18
HEADER_ALG = 1
HEADER_KID = 4

#: RFC 9053 values; SM2 has no registered value and takes the profile's private-use one.
DEFAULT_ALGS: dict[Algorithm, int] = {Algorithm.ECDSA_P256: -7, Algorithm.ED25519: -8}


def cose_alg(algorithm: Algorithm, configured: int | None = None) -> int:
    """The COSE algorithm number of ``algorithm``: ``configured`` (an HSM profile's ``cose_alg``) when
    given, else the registered RFC 9053 value. Raises ValidationFailed when there is neither (SM2)."""
    if configured is not None:
        return configured
    if algorithm in DEFAULT_ALGS:
        return DEFAULT_ALGS[algorithm]
    raise ValidationFailed(f"no COSE algorithm for {algorithm.value}; the profile must give cose_alg")


def protected_header(alg: int, kid: bytes) -> bytes:
    return cbor2.dumps({HEADER_ALG: alg, HEADER_KID: kid}, canonical=True)


def sig_structure(protected: bytes, payload: bytes, external_aad: bytes = b"") -> bytes:
    return cbor2.dumps(["Signature1", protected, external_aad, payload])


def assemble(protected: bytes, payload: bytes, signature: bytes) -> bytes:
    return cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, [protected, {}, payload, signature]))


async def sign1(signer: Signer, alg: int, key_id: str, algorithm: Algorithm, payload: bytes) -> bytes:
    """A tagged COSE_Sign1 over ``payload`` (CBOR bytes) signed by ``signer`` with key ``key_id`` of
    ``algorithm``; ``alg`` is the COSE algorithm number put in the protected header (:func:`cose_alg`),
    kid = the key id."""
    protected = protected_header(alg, key_id.encode())
    to_be_signed = sig_structure(protected, payload)
    signature = await signer.sign(key_id, algorithm.value, signing_input(algorithm, to_be_signed))
    return assemble(protected, payload, signature)


@dataclass(frozen=True)
class Sign1:
    protected: bytes
    alg: int
    kid: bytes
    payload: bytes
    signature: bytes

    def claims(self) -> Any:
        return cbor2.loads(self.payload)


class CoseError(ValidationFailed):
    code = "invalid-cose"
    title = "Malformed or unverifiable COSE_Sign1"


def parse(envelope: bytes) -> Sign1:
    """Take a (tagged or untagged) COSE_Sign1 apart. Raises CoseError, never anything else."""
    try:
        item = cbor2.loads(envelope)
    except Exception as exc:  # cbor2 raises several types on garbage
        raise CoseError(f"not CBOR: {exc}") from None
    if isinstance(item, cbor2.CBORTag):
        if item.tag != COSE_SIGN1_TAG:
            raise CoseError(f"CBOR tag {item.tag} is not COSE_Sign1 (18)")
        item = item.value
    if not isinstance(item, list | tuple) or len(item) != 4:
        raise CoseError("COSE_Sign1 must be an array of 4 items")
    protected, unprotected, payload, signature = item
    # cbor2 6 decodes maps inside tags as immutable mappings: accept any Mapping.
    if not all(isinstance(x, bytes) for x in (protected, payload, signature)) or not isinstance(unprotected, Mapping):
        raise CoseError("COSE_Sign1 items have the wrong types")
    try:
        header = cbor2.loads(protected) if protected else {}
    except Exception as exc:
        raise CoseError(f"protected header is not CBOR: {exc}") from None
    if not isinstance(header, Mapping) or not isinstance(header.get(HEADER_ALG), int):
        raise CoseError("protected header has no alg")
    kid = header.get(HEADER_KID, unprotected.get(HEADER_KID, b""))
    if not isinstance(kid, bytes):
        raise CoseError("kid must be a byte string")
    return Sign1(protected, header[HEADER_ALG], kid, payload, signature)


def verify_sign1(message: Sign1, algorithm: Algorithm, public_key: bytes) -> bool:
    """Check a COSE_Sign1 signature with `cryptography` (for messages devices sign)."""
    to_be_signed = sig_structure(message.protected, message.payload)
    return verify(algorithm, public_key, signing_input(algorithm, to_be_signed), message.signature)
