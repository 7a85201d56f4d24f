"""A :class:`~gateway.signing.Signer` that counts what it signs (the protocol itself is in gateway.signing)."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import Counter

from gateway.signing import Signer, SignerHealth


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

    def health(self) -> SignerHealth:
        return self._inner.health()
