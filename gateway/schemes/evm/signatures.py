"""secp256k1 signatures as Ethereum takes them: low-S, with their recovery id.

About half of SoftHSM2's signatures are high-S; Ethereum accepts only low-S (EIP-2), so ``s`` becomes
``n - s`` when above ``n/2``. The recovery id (y parity) is found by public-key recovery (``coincurve``)
against the key's known public key — never guessed.
"""

from __future__ import annotations

from dataclasses import dataclass

from coincurve import PublicKey

from gateway.errors import SignatureRecoveryFailed

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
HALF_N = SECP256K1_N // 2


@dataclass(frozen=True)
class RecoverableSignature:
    """A low-S secp256k1 signature with its recovery id."""

    r: int
    s: int
    y_parity: int

    def rsv(self, v_offset: int = 27) -> bytes:
        """65 bytes r‖s‖v, as EIP-712 and ``personal_sign`` consumers expect (v = 27 or 28)."""
        return self.r.to_bytes(32, "big") + self.s.to_bytes(32, "big") + bytes([self.y_parity + v_offset])


def low_s(raw_signature: bytes) -> tuple[int, int]:
    """(r, s) from the HSM's raw r‖s, with s normalised to the lower half of the curve order (EIP-2).

    Raises:
        SignatureRecoveryFailed: not 64 bytes, or r/s out of range.
    """
    if len(raw_signature) != 64:
        raise SignatureRecoveryFailed(f"expected a 64-byte r‖s signature, got {len(raw_signature)} bytes")
    r = int.from_bytes(raw_signature[:32], "big")
    s = int.from_bytes(raw_signature[32:], "big")
    if not (0 < r < SECP256K1_N and 0 < s < SECP256K1_N):
        raise SignatureRecoveryFailed("signature r or s out of range")
    return r, (SECP256K1_N - s if s > HALF_N else s)


def recover_signature(digest: bytes, raw_signature: bytes, public_key: bytes) -> RecoverableSignature:
    """Normalise an HSM signature over ``digest`` to low-S and find its recovery id by recovering the
    public key with each candidate id and comparing with the key's known (uncompressed) point.

    Raises:
        SignatureRecoveryFailed: neither recovery id gives ``public_key`` (a wrong key or corrupt signature).
    """
    r, s = low_s(raw_signature)
    body = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    for y_parity in (0, 1):
        try:
            recovered = PublicKey.from_signature_and_message(body + bytes([y_parity]), digest, hasher=None)
        except Exception:  # coincurve raises a plain Exception for an unrecoverable id
            continue
        if recovered.format(compressed=False) == public_key:
            return RecoverableSignature(r, s, y_parity)
    raise SignatureRecoveryFailed("the HSM signature does not recover to the key's public key")
