"""The risk rules in a process of their own (``[risk] evaluator = "process"``, the default).

The rules read windows of signals and run Python over them: in the HTTP process they share the
interpreter lock with every request (BENCHMARKS.md, "Session 8"). Here the first HTTP process spawns
one evaluator process, as it spawns its signer workers, and keeps it running:

- the two speak over a socketpair, one line at a time: the HTTP process sends ``n`` (a nudge: a write
  request may have committed a signal); the evaluator sends ``RULE<TAB>SEVERITY`` for each event it
  stores, which the HTTP process counts in ``ecny_risk_events_total`` and which wakes its live streams;
- the evaluator is a complete :class:`~gateway.monitor.worker.RiskMonitor` on a store connection of its
  own: one evaluator at a time across processes and instances still holds the lease, and a crash loses
  nothing (the outbox keeps what was not evaluated);
- with ``[server] processes > 1`` the other HTTP processes nudge it too: each nudge is one datagram to an
  abstract Unix socket the evaluator binds (its name, chosen by the supervisor, is in
  :data:`NUDGE_ADDRESS_ENV`), so a signal committed by any process is evaluated at once rather than at
  the evaluator's next poll — even while the first process is stalled;
- the evaluator ends when its socket closes (its HTTP process stopped, or was killed); the HTTP process
  starts a new one when it ends, at most once per ``RESPAWN_INTERVAL``, under the same lease holder's
  name (the last one is dead by then: the next need not wait for its lease to expire).

The evaluator gets the settings without the HSM PIN: it never signs.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import socket
import uuid
from collections.abc import Callable
from multiprocessing.process import BaseProcess

import structlog

from gateway.config import Settings
from gateway.ledger.engines import open_database
from gateway.metrics import METRICS_DIR_ENV, Metrics
from gateway.monitor.worker import RiskMonitor
from gateway.risk.events import RiskEvent
from gateway.spawn import without_environment, without_main_module

RESPAWN_INTERVAL = 1.0
NUDGE = b"n\n"
DRAIN_MAX = 256
"""Nudge datagrams read per turn of the evaluator's loop at most (what is left wakes it again)."""
NUDGE_ADDRESS_ENV = "ECNY_RISK_NUDGE_ADDRESS"
"""Set by the supervisor of several HTTP processes: the name of the abstract Unix datagram socket where the
evaluator takes nudges from every HTTP process."""


def evaluator_settings(settings: Settings) -> Settings:
    """What the evaluator process is given: the rules evaluated there, and no HSM PIN."""
    return settings.model_copy(update={
        "risk": settings.risk.model_copy(update={"monitor": True, "evaluator": "inline"}),
        "hsm": settings.hsm.model_copy(update={"pin": None}),
    })


def evaluator_main(settings: Settings, sock: socket.socket, holder: str, nudge_address: str | None = None) -> None:
    """The evaluator process's entry point (spawned)."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_evaluate(settings, sock, holder, nudge_address))


def _abstract(name: str) -> bytes:
    """A Linux abstract socket address: no file, gone with the last socket bound to it."""
    return b"\0" + name.encode()


def bind_nudge_socket(name: str, nudge: Callable[[], None]) -> socket.socket | None:
    """Bind the datagram socket other HTTP processes nudge (None, logged, if the name is taken)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(_abstract(name))
    except OSError as exc:
        sock.close()
        structlog.get_logger("gateway.monitor").warning(
            "nudges from the other HTTP processes cannot reach the risk evaluator; it finds their signals at "
            "its poll", error=str(exc))
        return None
    sock.setblocking(False)

    def drain() -> None:  # a bounded number per turn: a flood never holds the evaluator's loop
        with contextlib.suppress(BlockingIOError, InterruptedError):
            for _ in range(DRAIN_MAX):
                sock.recv(16)
        nudge()

    asyncio.get_running_loop().add_reader(sock.fileno(), drain)
    return sock


async def _evaluate(settings: Settings, sock: socket.socket, holder: str, nudge_address: str | None) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=sock)

    def report(event: RiskEvent) -> None:
        writer.write(f"{event.rule}\t{event.severity}\n".encode())

    database = await open_database(settings.store.dsn)
    monitor = RiskMonitor(database, settings, Metrics(), on_stored=report, holder=holder)
    monitor.start()
    datagrams = bind_nudge_socket(nudge_address, monitor.nudge) if nudge_address else None
    try:
        while await reader.readline():  # a nudge; b"" once the HTTP process is gone
            monitor.nudge()
    finally:
        if datagrams is not None:
            asyncio.get_running_loop().remove_reader(datagrams.fileno())
            datagrams.close()
        await monitor.close()
        await database.close()
        writer.close()


class EvaluatorProcess:
    """The HTTP process's side: spawns the evaluator, forwards nudges, reads what it stored, restarts it."""

    def __init__(self, settings: Settings, monitor: RiskMonitor, nudge_address: str | None = None) -> None:
        self.settings = evaluator_settings(settings)
        self.monitor = monitor
        self.nudge_address = nudge_address
        """Where the other HTTP processes' nudges go (:data:`NUDGE_ADDRESS_ENV`); the evaluator binds it."""
        self._context = multiprocessing.get_context("spawn")
        self._process: BaseProcess | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._nudged = False
        self._log = structlog.get_logger("gateway.monitor")
        self.holder = f"{socket.gethostname()}:{os.getpid()}:evaluator:{uuid.uuid4().hex[:8]}"
        """The lease holder's name of every evaluator this process starts: one is started only once the
        last has ended (joined), so the next takes over its lease at once instead of waiting it out."""

    def start(self) -> None:
        self.monitor.forward = self.nudge
        self._task = asyncio.create_task(self._keep_running())

    def pid(self) -> int | None:
        """The evaluator process's pid while it runs (tests, operators)."""
        process = self._process
        return process.pid if process is not None and process.is_alive() else None

    def nudge(self) -> None:
        """Tell the evaluator a signal may have committed: one line per ``[risk] settle_seconds`` at most, at
        the end of that time (the evaluator would wait as long before reading the burst anyway)."""
        if self._writer is None or self._nudged:
            return
        self._nudged = True
        asyncio.get_running_loop().call_later(self.settings.risk.settle_seconds, self._send_nudge)

    def _send_nudge(self) -> None:
        self._nudged = False
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(NUDGE)

    async def close(self) -> None:
        self.monitor.forward = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._stop()

    async def _keep_running(self) -> None:
        while True:
            try:
                reader = await self._spawn()
                while line := await reader.readline():
                    rule, _, severity = line.decode().rstrip("\n").partition("\t")
                    await self.monitor.stored_elsewhere(rule, severity)
                self._log.warning("the risk evaluator process ended; starting another")
            except OSError as exc:
                self._log.warning("the risk evaluator process could not start", error=str(exc))
            await self._stop()
            await asyncio.sleep(RESPAWN_INTERVAL)

    async def _spawn(self) -> asyncio.StreamReader:
        parent, child = socket.socketpair()
        process = self._context.Process(target=evaluator_main,
                                        args=(self.settings, child, self.holder, self.nudge_address),
                                        name="ecny-risk-evaluator", daemon=True)
        # The evaluator's own counts are reported here, never written to the processes' metrics directory.
        with without_main_module(), without_environment(METRICS_DIR_ENV):
            process.start()
        child.close()
        self._process = process
        reader, self._writer = await asyncio.open_unix_connection(sock=parent)
        self._writer.write(NUDGE)  # evaluate what is pending now
        return reader

    async def _stop(self) -> None:
        writer, process = self._writer, self._process
        self._writer = self._process = None
        if writer is not None:
            writer.close()  # the evaluator reads end-of-file and stops after the batch it is storing
        if process is not None:
            await asyncio.to_thread(process.join, 10)
            if process.is_alive():
                process.kill()
                await asyncio.to_thread(process.join, 5)


class NudgeSender:
    """How an HTTP process other than the first nudges the evaluator: one datagram to its socket
    (:data:`NUDGE_ADDRESS_ENV`) at most once per ``[risk] settle_seconds``. A nudge the evaluator cannot
    take (it is restarting, or its socket's queue is full) is dropped: it finds the signal at its poll."""

    def __init__(self, name: str, settle_seconds: float) -> None:
        self._address = _abstract(name)
        self._settle = settle_seconds
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._nudged = False

    def nudge(self) -> None:
        if self._nudged:
            return
        self._nudged = True
        asyncio.get_running_loop().call_later(self._settle, self._send)

    def _send(self) -> None:
        self._nudged = False
        with contextlib.suppress(OSError):
            self._sock.sendto(b"n", self._address)

    def close(self) -> None:
        self._sock.close()
