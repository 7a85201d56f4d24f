"""A pool of spawned signer worker processes behind the :class:`~gateway.hsm.signer.Signer` protocol.

The event loop never calls PKCS#11. Requests queue here; whenever a worker has room, everything
queued (up to ``max_batch`` items) goes to it in one message, so under load one pipe round trip
carries many signatures. Each worker may have ``depth`` messages in flight so it never waits for
the event loop between batches.

Failure handling:
- a result of kind ``unavailable`` marks the worker down; requests go to the workers still up, and
  fail at once with :class:`HsmUnavailable` (503, ``Retry-After``) when none is;
- a health task pings down workers (the worker rebuilds its session or reinitialises the module
  at a bounded rate) and marks them up when a ping succeeds;
- a worker process that dies is respawned (at most once per ``respawn_interval``);
- a wrong PIN at start is fatal and never retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import pickle
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from gateway.errors import AmbiguousKey, GatewayError, HsmError, HsmLoginFailed, HsmUnavailable, KeyNotFound
from gateway.hsm.profile import HsmProfile
from gateway.hsm.worker import AlgorithmSpec, WorkerConfig, worker_main
from gateway.signing import SignerHealth
from gateway.spawn import without_main_module


@dataclass
class PoolSettings:
    """How the pool is run (from ``[hsm]`` in the config)."""

    module_path: str
    token_label: str
    pin: str = field(repr=False)
    workers: int = 2
    max_batch: int = 256
    depth: int = 2
    health_interval: float = 0.5
    start_timeout: float = 30.0
    respawn_interval: float = 1.0
    token_attributes: dict[str, str] = field(default_factory=dict)
    """What the token must match besides its label (the profile's ``token.uri``)."""


def worker_config(profile: HsmProfile, settings: PoolSettings) -> WorkerConfig:
    """Translate a profile and pool settings into what a worker needs."""
    return WorkerConfig(
        module_path=settings.module_path,
        token_label=settings.token_label,
        pin=settings.pin,
        algorithms={
            str(name): AlgorithmSpec(
                key_type=section.key_type_value,
                curve_oid=section.curve_oid,
                mechanism=section.sign_mechanism_value,
                der_signatures=section.signature_encoding == "der",
            )
            for name, section in profile.algorithms.items()
        },
        private_template=dict(profile.key_templates.private),
        public_template=dict(profile.key_templates.public),
        token_attributes=dict(settings.token_attributes),
    )


@dataclass
class _Job:
    payload: tuple[Any, ...]
    future: asyncio.Future[Any]


class _WorkerPipe(asyncio.Protocol):
    """The event loop's end of one worker's socketpair: multiprocessing's framing (:func:`_frame`) read
    as bytes arrive, each whole message handed to ``on_message`` in the same callback.

    No reader task and no await per message: a result wakes the request waiting for it one turn of
    the event loop sooner than a StreamReader and a task reading from it would (at one connection a
    signature waits for each of those turns). Partial and coalesced reads are both framed here.
    """

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[Any] = asyncio.get_running_loop().create_future()  # the first message
        self.on_message: Callable[[Any], None] = self._first
        self.on_lost: Callable[[], None] = _nothing

    def _first(self, message: Any) -> None:
        if not self.ready.done():
            self.ready.set_result(message)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while len(buffer) >= 4:
            (size,) = struct.unpack_from("!i", buffer)
            start = 4
            if size == -1:
                if len(buffer) < 12:
                    return
                (size,) = struct.unpack_from("!Q", buffer, 4)
                start = 12
            end = start + size
            if len(buffer) < end:
                return
            try:
                message = pickle.loads(buffer[start:end])
            except (pickle.UnpicklingError, EOFError, ValueError) as exc:
                self._lost(ConnectionError(f"unreadable message from the signer worker: {exc!r}"))
                return
            del buffer[:end]
            self.on_message(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc or ConnectionError("the signer worker closed its pipe"))

    def _lost(self, exc: Exception) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)
        if self.transport is not None:
            self.transport.close()
        self.on_lost()

    def write(self, data: bytes) -> None:
        """Raises ConnectionError once the pipe is closed."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionError("the signer worker's pipe is closed")
        self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _nothing() -> None:
    """What a pipe does when it is lost before its worker's handle exists."""


@dataclass
class _WorkerHandle:
    index: int
    process: Any
    pipe: _WorkerPipe
    up: bool = True
    alive: bool = True
    inflight: deque[list[_Job]] = field(default_factory=deque)
    last_detail: str = ""


_FAILURES: dict[str, type[GatewayError]] = {
    "unavailable": HsmUnavailable,
    "not_found": KeyNotFound,
    "ambiguous": AmbiguousKey,
    "login": HsmLoginFailed,
    "error": HsmError,
}


class SignerPool:
    """Signer worker processes fed from the event loop. Create with :meth:`start`, end with :meth:`close`."""

    def __init__(self, settings: PoolSettings, config: WorkerConfig) -> None:
        self.settings = settings
        self._config = config
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[_WorkerHandle] = []
        self._queue: deque[_Job] = deque()
        self._health_task: asyncio.Task[None] | None = None
        self._closing = False
        self._last_respawn = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pump_scheduled = False
        self.signatures = 0

    # --- life -------------------------------------------------------------------------------

    @classmethod
    async def start(cls, profile: HsmProfile, settings: PoolSettings) -> SignerPool:
        """Spawn the workers and wait until each has logged in (or found the HSM down).

        Raises:
            HsmLoginFailed: the token rejected the PIN (never retried).
            HsmUnavailable: a worker could not start at all.
        """
        pool = cls(settings, worker_config(profile, settings))
        pool._loop = asyncio.get_running_loop()
        try:
            handles = await asyncio.gather(*(pool._spawn(i) for i in range(settings.workers)))
        except BaseException:
            await pool.close()
            raise
        pool._workers = list(handles)
        pool._health_task = asyncio.create_task(pool._health_loop())
        return pool

    async def _spawn(self, index: int) -> _WorkerHandle:
        parent, child = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=worker_main, args=(child, self._config), name=f"ecny-signer-{index}", daemon=True
        )
        with without_main_module():
            process.start()
        child.close()
        # The worker speaks multiprocessing's framing over a socketpair with blocking calls; the
        # event loop reads and writes the same framing through a non-blocking transport, which copes
        # with partial reads (a Connection.recv() on a non-blocking fd does not).
        sock = socket.socket(fileno=os.dup(parent.fileno()))
        parent.close()
        _, pipe = await asyncio.get_running_loop().create_unix_connection(_WorkerPipe, sock=sock)
        try:
            async with asyncio.timeout(self.settings.start_timeout):  # not wait_for: see gateway.monitor.worker
                status, kind, detail = await pipe.ready
        except (TimeoutError, ConnectionError, OSError) as exc:
            pipe.close()
            process.kill()
            raise HsmUnavailable(f"signer worker {index} did not start: {exc!r}") from None
        if status == "fatal":
            pipe.close()
            process.join(timeout=5)
            raise _FAILURES.get(kind, HsmError)(detail)
        handle = _WorkerHandle(index=index, process=process, pipe=pipe, up=kind is None, last_detail=detail)
        pipe.on_message = lambda results: self._on_results(handle, results)
        pipe.on_lost = lambda: self._retire(handle, f"signer worker {index} exited")
        return handle

    async def close(self) -> None:
        """Stop the health task and the workers; fail anything still queued."""
        self._closing = True
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        for job in self._queue:
            if not job.future.done():
                job.future.set_exception(HsmUnavailable("the signer pool is shutting down"))
        self._queue.clear()
        for handle in self._workers:
            self._retire(handle, "the signer pool is shutting down")
        for handle in self._workers:
            await asyncio.to_thread(handle.process.join, 5)
            if handle.process.is_alive():
                handle.process.kill()

    # --- Signer protocol --------------------------------------------------------------------

    async def sign(self, key_id: str, algorithm: str, data: bytes) -> bytes:
        signatures: list[bytes] = await self._submit(("sign", key_id, algorithm, [data]))
        return signatures[0]

    async def sign_many(self, key_id: str, algorithm: str, items: Sequence[bytes]) -> list[bytes]:
        # Split a large batch so every worker up takes a share.
        up = max(1, sum(1 for w in self._workers if w.up and w.alive))
        size = max(1, -(-len(items) // up))
        chunks = [list(items[i : i + size]) for i in range(0, len(items), size)]
        parts = await asyncio.gather(*(self._submit(("sign", key_id, algorithm, chunk)) for chunk in chunks))
        return [signature for part in parts for signature in part]

    async def generate(self, key_id: str, label: str, algorithm: str) -> bytes:
        result: bytes = await self._submit(("generate", key_id, label, algorithm))
        return result

    async def public_key(self, key_id: str, algorithm: str) -> bytes:
        result: bytes = await self._submit(("public_key", key_id, algorithm))
        return result

    async def key_attributes(self, key_id: str) -> dict[str, bool]:
        result: dict[str, bool] = await self._submit(("attributes", key_id))
        return result

    async def hmac_sha256(self, label: str, items: Sequence[bytes]) -> list[bytes]:
        """HMAC-SHA256 tags of ``items`` under the token's secret key ``label`` (the alliance key).

        Raises:
            KeyNotFound / AmbiguousKey: no / several secret keys with this label; else as :meth:`sign`.
        """
        result: list[bytes] = await self._submit(("hmac", label, list(items)))
        return result

    async def import_secret(self, label: str, value: bytes) -> dict[str, bool]:
        """Store ``value`` in the token as a sensitive, non-extractable HMAC key labelled ``label`` (a key
        ceremony); returns its protection attributes. Raises AmbiguousKey when the label is taken."""
        result: dict[str, bool] = await self._submit(("import_secret", label, bytes(value)))
        return result

    async def secret_attributes(self, label: str) -> dict[str, bool]:
        """The protection attributes of the secret key ``label`` as the token reports them."""
        result: dict[str, bool] = await self._submit(("secret_attributes", label))
        return result

    async def describe_key(self, id_hex: str | None, label: str | None) -> dict[str, Any]:
        """What the token says of one existing private key (by CKA_ID and/or CKA_LABEL), for adoption:
        see :meth:`gateway.hsm.worker.Worker.describe`. Raises KeyNotFound / AmbiguousKey."""
        result: dict[str, Any] = await self._submit(("describe", id_hex, label))
        return result

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (for operators' tools and fault tests)."""
        return [w.process.pid for w in self._workers if w.alive]

    def health(self) -> SignerHealth:
        up = sum(1 for w in self._workers if w.up and w.alive)
        details = "; ".join(w.last_detail for w in self._workers if not (w.up and w.alive) and w.last_detail)
        return SignerHealth(ready=up > 0, workers=len(self._workers), workers_up=up, detail=details)

    # --- dispatch ---------------------------------------------------------------------------

    def _submit(self, payload: tuple[Any, ...]) -> asyncio.Future[Any]:
        if self._closing:
            raise HsmUnavailable("the signer pool is shutting down")
        if not any(w.up and w.alive for w in self._workers):
            raise HsmUnavailable(self.health().detail or "HSM unavailable; recovery is under way")
        assert self._loop is not None
        future: asyncio.Future[Any] = self._loop.create_future()
        self._queue.append(_Job(payload, future))
        if not self._pump_scheduled:
            # Send at the end of this turn of the event loop, so that every request parsed in the
            # same turn shares one message (one write, one worker wake-up) instead of one each.
            self._pump_scheduled = True
            self._loop.call_soon(self._pump)
        return future

    def _pump(self) -> None:
        self._pump_scheduled = False
        while self._queue:
            candidates = [w for w in self._workers if w.up and w.alive and len(w.inflight) < self.settings.depth]
            if not candidates:
                return
            handle = min(candidates, key=lambda w: len(w.inflight))
            # Share what is queued between the workers that have room, rather than give it all to one.
            share = -(-len(self._queue) // len(candidates))
            batch: list[_Job] = []
            items = 0
            while self._queue and items < self.settings.max_batch and len(batch) < share:
                job = self._queue.popleft()
                if job.future.cancelled():
                    continue
                batch.append(job)
                items += len(job.payload[3]) if job.payload[0] == "sign" else 1
            if not batch:
                return
            self._send(handle, batch)

    def _send(self, handle: _WorkerHandle, batch: list[_Job]) -> None:
        try:
            handle.pipe.write(_frame([job.payload for job in batch]))
        except (ConnectionError, OSError, RuntimeError) as exc:
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(HsmUnavailable(f"signer worker lost: {exc}"))
            self._retire(handle, f"signer worker {handle.index} lost")
            return
        handle.inflight.append(batch)

    def _on_results(self, handle: _WorkerHandle, results: list[Any]) -> None:
        if not handle.inflight:
            return
        batch = handle.inflight.popleft()
        went_down = False
        for job, result in zip(batch, results, strict=True):
            if job.future.done():
                continue
            if result[0]:
                if job.payload[0] == "sign":
                    self.signatures += len(result[1])
                job.future.set_result(result[1])
            else:
                kind, detail = result[1], result[2]
                if kind == "unavailable":
                    went_down = True
                    handle.last_detail = detail
                job.future.set_exception(_FAILURES.get(kind, HsmError)(detail))
        if went_down:
            handle.up = False
            self._requeue_or_fail_queue()
        else:
            handle.up = True
        self._pump()

    def _requeue_or_fail_queue(self) -> None:
        if any(w.up and w.alive for w in self._workers):
            return
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(HsmUnavailable("HSM unavailable; recovery is under way"))

    def _retire(self, handle: _WorkerHandle, reason: str) -> None:
        if not handle.alive:
            return
        handle.alive = False
        handle.up = False
        handle.last_detail = reason
        while handle.inflight:
            for job in handle.inflight.popleft():
                if not job.future.done():
                    job.future.set_exception(HsmUnavailable(reason))
        with contextlib.suppress(Exception):
            handle.pipe.close()
        self._requeue_or_fail_queue()

    # --- health -----------------------------------------------------------------------------

    async def _health_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.settings.health_interval)
            for handle in list(self._workers):
                if not handle.alive:
                    await self._respawn(handle)
                elif not handle.up and not handle.inflight:
                    self._probe(handle)

    def _probe(self, handle: _WorkerHandle) -> None:
        assert self._loop is not None
        future: asyncio.Future[Any] = self._loop.create_future()
        future.add_done_callback(_consume)
        self._send(handle, [_Job(("ping",), future)])

    async def _respawn(self, dead: _WorkerHandle) -> None:
        now = time.monotonic()
        if now - self._last_respawn < self.settings.respawn_interval:
            return
        self._last_respawn = now
        with contextlib.suppress(Exception):
            dead.process.kill()
        try:
            handle = await self._spawn(dead.index)
        except GatewayError as exc:
            dead.last_detail = exc.detail
            return
        self._workers[self._workers.index(dead)] = handle
        self._pump()


def _frame(message: Any) -> bytes:
    """multiprocessing.Connection's wire format: a signed 4-byte big-endian length (or -1 and an
    8-byte length beyond 2 GiB), then the pickle."""
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if len(payload) > 0x7FFFFFFF:
        return struct.pack("!iQ", -1, len(payload)) + payload
    return struct.pack("!i", len(payload)) + payload


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
