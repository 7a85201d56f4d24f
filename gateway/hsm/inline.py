"""A :class:`~gateway.hsm.signer.Signer` that calls PKCS#11 from the event loop's own thread.

The signer pool (:mod:`gateway.hsm.pool`) puts every signature one pipe round trip away: the request
is pickled, written, read by a worker process, signed, pickled back and read again — two processes
woken per batch. With a token that signs in tens of microseconds (SoftHSM2, a PCIe card) that trip
costs more machine than the signature. ``[hsm] mode = "inline"`` instead gives each HTTP process
one PKCS#11 session of its own, driven by the :class:`~gateway.hsm.worker.Worker` the pool's
processes run, from the only thread that may call it: the event loop's. Scale it with
``[server] processes``, one session per HTTP process.

What that costs, and why it is not the default:
- the loop waits while the token signs: fine for a local token signing P-256 in ~50 µs, wrong for a
  network HSM or secp256k1 on SoftHSM2 (~0.5 ms) — there the pool's processes sign while the loop
  goes on;
- a batch of ``max_batch`` items is signed in chunks, the loop given a turn between chunks;
- recovery never waits for another process's turn at opening the token: when one holds it, this
  signer stays down and the health task tries again ``health_interval`` later.

Thread rule (FACTS: SoftHSM2 loaded directly does no locking): nothing else in the process may call
PKCS#11. The gateway's other threads (SQLite, PostgreSQL, password hashing) never do.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from gateway.errors import GatewayError, HsmError, HsmUnavailable
from gateway.hsm.pool import FAILURES, PoolSettings, worker_config
from gateway.hsm.profile import HsmProfile
from gateway.hsm.signer import HsmHealth
from gateway.hsm.worker import Worker, WorkerFailure

#: Items signed before the event loop gets a turn during a large batch (~2 ms of SoftHSM2 P-256).
CHUNK = 32


class InlineSigner:
    """One PKCS#11 session in this process, used from the event loop. Create with :meth:`start`."""

    def __init__(self, settings: PoolSettings, worker: Worker) -> None:
        self.settings = settings
        self._worker = worker
        self._up = False
        self._detail = ""
        self._closing = False
        self._health_task: asyncio.Task[None] | None = None
        self.signatures = 0

    @classmethod
    async def start(cls, profile: HsmProfile, settings: PoolSettings) -> InlineSigner:
        """Load the module and log in (taking turns with other processes opening the same token).

        Raises:
            HsmLoginFailed: the token rejected the PIN (never retried).
            HsmUnavailable: the module cannot be loaded.
        """
        try:
            worker = Worker(worker_config(profile, settings))
        except Exception as exc:  # pkcs11 not importable
            raise HsmUnavailable(f"cannot start the PKCS#11 session: {exc}") from None
        signer = cls(settings, worker)
        try:
            worker.open()
            signer._up = True
        except WorkerFailure as failure:
            if failure.kind != "unavailable":
                raise FAILURES.get(failure.kind, HsmError)(str(failure)) from None
            signer._detail = str(failure)  # the HSM is down at start: serve anyway, recover later
        worker.open_lock_wait = 0  # from now on the event loop must never wait for another process
        signer._health_task = asyncio.create_task(signer._health_loop())
        return signer

    async def close(self) -> None:
        """Stop the health task and close the session."""
        self._closing = True
        self._up = False
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        self._worker.close()

    # --- Signer protocol --------------------------------------------------------------------

    async def sign(self, key_id: str, algorithm: str, data: bytes) -> bytes:
        signatures: list[bytes] = self._run(("sign", key_id, algorithm, [data]))
        self.signatures += 1
        return signatures[0]

    async def sign_many(self, key_id: str, algorithm: str, items: Sequence[bytes]) -> list[bytes]:
        signatures: list[bytes] = []
        for start in range(0, len(items), CHUNK):
            if start:
                await asyncio.sleep(0)  # let the loop answer others between chunks
            signatures.extend(self._run(("sign", key_id, algorithm, list(items[start : start + CHUNK]))))
        self.signatures += len(signatures)
        return signatures

    async def generate(self, key_id: str, label: str, algorithm: str) -> bytes:
        result: bytes = self._run(("generate", key_id, label, algorithm))
        return result

    async def public_key(self, key_id: str, algorithm: str) -> bytes:
        result: bytes = self._run(("public_key", key_id, algorithm))
        return result

    async def key_attributes(self, key_id: str) -> dict[str, bool]:
        result: dict[str, bool] = self._run(("attributes", key_id))
        return result

    def health(self) -> HsmHealth:
        return HsmHealth(ready=self._up, workers=1, workers_up=int(self._up), detail="" if self._up else self._detail)

    # --- dispatch ---------------------------------------------------------------------------

    def _run(self, job: tuple[Any, ...]) -> Any:
        if self._closing:
            raise HsmUnavailable("the signer is shutting down")
        if not self._up:
            raise HsmUnavailable(self._detail or "HSM unavailable; recovery is under way")
        result = self._worker.handle(job)
        if result[0]:
            return result[1]
        kind, detail = result[1], result[2]
        if kind == "unavailable":
            self._up = False
            self._detail = detail
        error: type[GatewayError] = FAILURES.get(kind, HsmError)
        raise error(detail)

    async def _health_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.settings.health_interval)
            if not self._up and not self._closing:
                result = self._worker.handle(("ping",))
                if result[0]:
                    self._up, self._detail = True, ""
                else:
                    self._detail = result[2]
