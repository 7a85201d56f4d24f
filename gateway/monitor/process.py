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


def evaluator_settings(settings: Settings) -> Settings:
    """What the evaluator process is given: the rules evaluated there, and no HSM PIN."""
    return settings.model_copy(update={
        "risk": settings.risk.model_copy(update={"monitor": True, "evaluator": "inline"}),
        "hsm": settings.hsm.model_copy(update={"pin": None}),
    })


def evaluator_main(settings: Settings, sock: socket.socket, holder: str) -> None:
    """The evaluator process's entry point (spawned)."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_evaluate(settings, sock, holder))


async def _evaluate(settings: Settings, sock: socket.socket, holder: str) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=sock)

    def report(event: RiskEvent) -> None:
        writer.write(f"{event.rule}\t{event.severity}\n".encode())

    database = await open_database(settings.store.dsn)
    monitor = RiskMonitor(database, settings, Metrics(), on_stored=report, holder=holder)
    monitor.start()
    try:
        while await reader.readline():  # a nudge; b"" once the HTTP process is gone
            monitor.nudge()
    finally:
        await monitor.close()
        await database.close()
        writer.close()


class EvaluatorProcess:
    """The HTTP process's side: spawns the evaluator, forwards nudges, reads what it stored, restarts it."""

    def __init__(self, settings: Settings, monitor: RiskMonitor) -> None:
        self.settings = evaluator_settings(settings)
        self.monitor = monitor
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
        process = self._context.Process(target=evaluator_main, args=(self.settings, child, self.holder),
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
