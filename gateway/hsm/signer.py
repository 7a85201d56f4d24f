"""The one way the rest of the gateway reaches private keys."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import Counter


@dataclass(frozen=True)
class HsmHealth:
    """What /v1/status and the dashboard show of the HSM (/readyz shows only ``ready``)."""

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

    def health(self) -> HsmHealth:
        """Current readiness, without touching the HSM."""
        ...


class CountedSigner:
    """A :class:`Signer` that counts every signature it makes in ``ecny_signatures_total`` under one
    usage (``ecny``, ``voucher``, ``evm``, ``audit``, ``raw``).

    Each consumer of the HSM gets its own view, so every signature is counted exactly once, where it
    is made, whatever endpoint or background task asked for it.
    """

    def __init__(self, inner: Signer, counter: Counter, usage: str) -> None:
        self._inner = inner
        self._counter = counter
        self.usage = usage

    async def sign(self, key_id: str, algorithm: str, data: bytes) -> bytes:
        signature = await self._inner.sign(key_id, algorithm, data)
        self._counter.labels(algorithm, self.usage).inc()
        return signature

    async def sign_many(self, key_id: str, algorithm: str, items: Sequence[bytes]) -> list[bytes]:
        signatures = await self._inner.sign_many(key_id, algorithm, items)
        self._counter.labels(algorithm, self.usage).inc(len(signatures))
        return signatures

    async def generate(self, key_id: str, label: str, algorithm: str) -> bytes:
        return await self._inner.generate(key_id, label, algorithm)

    async def public_key(self, key_id: str, algorithm: str) -> bytes:
        return await self._inner.public_key(key_id, algorithm)

    async def key_attributes(self, key_id: str) -> dict[str, bool]:
        return await self._inner.key_attributes(key_id)

    def health(self) -> HsmHealth:
        return self._inner.health()
