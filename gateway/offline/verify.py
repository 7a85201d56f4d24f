"""Batch verification of ES256 signatures made by hard wallets.

Reconciliation collects every signature it must check into one list of :data:`Job` and hands it to
a :class:`Verifier`. :class:`InlineVerifier` checks them in the calling thread (a sync from the
API: a few thousand at most); :class:`PoolVerifier` spreads a large batch over spawned worker
processes (``cryptography`` holds the GIL while it verifies, so threads would not help).

A job carries what the check needs and nothing to parse: the signer's uncompressed P-256 point,
the SHA-256 of the COSE ``Sig_structure``, and the raw r‖s signature.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Protocol, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

T = TypeVar("T")

Job = tuple[bytes, bytes, bytes]
"""(public point, SHA-256 of the Sig_structure, raw r‖s signature)."""

_PREHASHED = ec.ECDSA(utils.Prehashed(hashes.SHA256()))


class Verifier(Protocol):
    """Checks many ES256 signatures at once."""

    def verify_many(self, jobs: Sequence[Job]) -> list[bool]:
        """Check every job.

        Returns:
            One flag per job, in order: True when the signature verifies. Never raises for a bad
            key or signature (that is a False).
        """
        ...


def verify_jobs(jobs: Sequence[Job]) -> list[bool]:
    """Check ``jobs`` here, parsing each public key once."""
    keys: dict[bytes, ec.EllipticCurvePublicKey | None] = {}
    results = []
    for point, digest, signature in jobs:
        key = keys.get(point, False)
        if key is False:
            try:
                key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
            except ValueError:
                key = None
            keys[point] = key
        if key is None or len(signature) != 64:
            results.append(False)
            continue
        der = utils.encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
        try:
            key.verify(der, digest, _PREHASHED)  # type: ignore[union-attr]
            results.append(True)
        except (InvalidSignature, ValueError):
            results.append(False)
    return results


class InlineVerifier:
    """Verifies in the calling thread."""

    def verify_many(self, jobs: Sequence[Job]) -> list[bool]:
        return verify_jobs(jobs)


class PoolVerifier:
    """Verifies in ``workers`` spawned processes, ``chunk`` jobs a message; small batches stay inline.

    Start it once and reuse it: spawning the workers costs about a third of a second.
    """

    def __init__(self, workers: int | None = None, chunk: int = 2048, inline_below: int = 512) -> None:
        self.workers = workers or os.cpu_count() or 1
        self.chunk = chunk
        self.inline_below = inline_below
        self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))

    def warm_up(self) -> None:
        """Start the worker processes now rather than on the first batch."""
        list(self._pool.map(verify_jobs, [[] for _ in range(self.workers)]))

    def verify_many(self, jobs: Sequence[Job]) -> list[bool]:
        if len(jobs) < self.inline_below:
            return verify_jobs(jobs)
        return self.submit_many(jobs)()

    def submit_many(self, jobs: Sequence[Job]) -> Callable[[], list[bool]]:
        """Start checking ``jobs`` in the workers and return at once; call the result to wait for the flags.
        Lets a caller reconcile one batch while the next one's signatures are being checked."""
        futures = [self._pool.submit(verify_jobs, list(jobs[start:start + self.chunk]))
                   for start in range(0, len(jobs), self.chunk)]

        def collect() -> list[bool]:
            results: list[bool] = []
            for future in futures:
                results += future.result()
            return results

        return collect

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run another pure function in the workers (reading log exports ahead:
        :func:`gateway.offline.upload.read_uploads`); ``fn`` must be importable by a spawned process."""
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> PoolVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
