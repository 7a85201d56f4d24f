"""The signing vocabulary every layer shares: algorithms, the :class:`Signer` protocol and its health,
and what the gateway does around a signature without the HSM — the input a signer is handed for a
message, and verification with `cryptography`.

Nothing here reaches a key or a token: ``gateway.hsm`` implements :class:`Signer`; schemes, audit,
the application layer and the API only use it. That keeps the pure layers (schemes, policy) free
of the HSM package and its configuration.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, utils
from eth_hash.auto import keccak


class Algorithm(StrEnum):
    """Signature algorithms the gateway knows. An HSM profile says which of them its HSM supports."""

    ECDSA_P256 = "ecdsa-p256"
    ECDSA_SECP256K1 = "ecdsa-secp256k1"
    ED25519 = "ed25519"
    SM2 = "sm2"


@dataclass(frozen=True)
class SignerHealth:
    """What /v1/status and the dashboard show of the signer (/readyz shows only ``ready``)."""

    ready: bool
    workers: int
    workers_up: int
    detail: str = ""


class Signer(Protocol):
    """Signs with keys that never leave the HSM.

    ``algorithm`` is the key's algorithm as recorded at generation (``ecdsa-p256``,
    ``ecdsa-secp256k1``, ``ed25519``, ``sm2``). For ECDSA the data is a digest the caller computed;
    for Ed25519 and SM2-with-SM3 it is the message. ECDSA signatures come back raw r‖s.
    """

    async def sign(self, key_id: str, algorithm: str, data: bytes) -> bytes:
        """Sign one item.

        Raises:
            HsmUnavailable: the HSM is down or recovering (retry after a delay).
            KeyNotFound / AmbiguousKey: the token has no / more than one private key with this id.
            HsmError: the HSM refused the operation.
        """
        ...

    async def sign_many(self, key_id: str, algorithm: str, items: Sequence[bytes]) -> list[bytes]:
        """Sign many items with one key; signatures in the order of ``items``. Raises as :meth:`sign`."""
        ...

    async def generate(self, key_id: str, label: str, algorithm: str) -> bytes:
        """Generate a key pair inside the token (sensitive, not extractable) and return its public key.

        Returns:
            The public key: an uncompressed SEC1 point for ECDSA/SM2, 32 bytes for Ed25519.
        """
        ...

    async def public_key(self, key_id: str, algorithm: str) -> bytes:
        """The public key of a key pair already in the token, encoded as :meth:`generate` returns it."""
        ...

    async def key_attributes(self, key_id: str) -> dict[str, bool]:
        """The private key's protection attributes as the token reports them (sensitive, extractable…)."""
        ...

    def health(self) -> SignerHealth:
        """Current readiness, without touching the HSM."""
        ...


def signing_input(algorithm: Algorithm, message: bytes) -> bytes:
    """What to hand the HSM to sign ``message`` the COSE/audit way: SHA-256 digest for ECDSA P-256,
    Keccak-256 for secp256k1, the message itself for Ed25519 and SM2-with-SM3 (the HSM hashes)."""
    if algorithm is Algorithm.ECDSA_P256:
        return hashlib.sha256(message).digest()
    if algorithm is Algorithm.ECDSA_SECP256K1:
        return bytes(keccak(message))
    return message


# --- verification (with `cryptography`, never the HSM) -------------------------------------------


def cryptography_public_key(algorithm: Algorithm, public_key: bytes) -> Any:
    """The `cryptography` public key object of an encoded public key; None for SM2 (not supported there)."""
    if algorithm is Algorithm.ED25519:
        return ed25519.Ed25519PublicKey.from_public_bytes(public_key)
    if algorithm is Algorithm.ECDSA_P256:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public_key)
    if algorithm is Algorithm.ECDSA_SECP256K1:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), public_key)
    return None


def der_from_raw(signature: bytes) -> bytes:
    """DER SEQUENCE{r, s} of a raw r‖s ECDSA signature."""
    half = len(signature) // 2
    return bytes(
        utils.encode_dss_signature(int.from_bytes(signature[:half], "big"), int.from_bytes(signature[half:], "big"))
    )


def verify(algorithm: Algorithm, public_key: bytes, data: bytes, signature: bytes) -> bool:
    """Verify what the HSM produced: ``data`` is the digest for ECDSA, the message for Ed25519.

    Returns False (never raises) for a bad signature; SM2 cannot be verified here and returns False.
    """
    key = cryptography_public_key(algorithm, public_key)
    try:
        if algorithm is Algorithm.ED25519:
            key.verify(signature, data)
        elif key is not None:
            key.verify(der_from_raw(signature), data, ec.ECDSA(utils.Prehashed(_prehash_algorithm(len(data)))))
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True


def _prehash_algorithm(size: int) -> hashes.HashAlgorithm:
    return {32: hashes.SHA256(), 48: hashes.SHA384(), 64: hashes.SHA512()}.get(size, hashes.SHA256())
