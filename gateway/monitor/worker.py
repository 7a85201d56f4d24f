"""The risk monitor: evaluates the outbox of signals after commit, off the request path.

One task per HTTP process (:class:`RiskMonitor`, started by ``gateway.app.monitor_context``):

1. it holds the evaluator's **lease** (``risk_monitor_lease``) — one evaluator at a time across every
   process and instance; a dead holder's lease expires after ``[risk] lease_seconds``;
2. it moves a batch of signals from the outbox (``risk_outbox``, where decisions write them) into
   ``risk_signals``, the rules' indexed history, in one write transaction that also renews the lease —
   moved and deleted together, or neither; then it reads the oldest unevaluated signals (in seq order)
   and evaluates the rules over their windows in a read transaction (no write lock held while the
   rules read);
3. in ONE write transaction it checks it still holds the lease, marks exactly those signals evaluated
   (all of them still unevaluated, or nothing is written), stores the events they gave rise to and
   renews the lease. A crash before that commit leaves the signals unevaluated: the next evaluator
   finds them and writes the same events; after it nothing is evaluated twice. Event ids are derived
   from the rule, the subject and the triggering signal, and stored ``ON CONFLICT DO NOTHING``: an
   evaluation repeated by any path cannot store an event twice.

A commit in this process wakes it at once (:meth:`RiskMonitor.nudge`, called by the HTTP layer after
every write request); signals committed by other processes and instances are found within
``[risk] poll_seconds``. It also watches the signer: an HSM outage is no store decision, so the monitor
writes its ``hsm.outage`` (and ``hsm.restored``) signal in a transaction of its own, once per
transition per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from gateway import clock
from gateway.config import Settings
from gateway.errors import GatewayError
from gateway.ledger.store import Database, Tx
from gateway.metrics import Metrics
from gateway.monitor.rules import (
    EVM_TRANSACTION,
    MOVEMENTS,
    TRANSFER,
    Rule,
    SignalRecord,
    WindowQuery,
    configured_rules,
    triggers,
)
from gateway.risk.events import RiskEvent, deterministic_event_id, head_seq_in, insert_event_in
from gateway.risk.signals import pending_signals_in, record_signal_in
from gateway.signing import Signer

LEASE = "evaluator"
MARK_CHUNK = 500


@dataclass
class WindowMemo:
    """What the monitor keeps between batches, so that a busy wallet or client costs no scan of its window per
    batch: an upper bound of each velocity window's count, and when each payer last paid each payee. Kept
    only while this process evaluates — every signal then passes it, once, in seq order — and cleared
    whenever a batch is not stored. A bound only grows (by the key's signals in each batch) until the rule
    needs the exact count, which resets it; the rules never report a bound."""

    counts: dict[tuple[Any, ...], int] = field(default_factory=dict)
    paid: dict[tuple[str, str], str | None] = field(default_factory=dict)

    MAX_ENTRIES = 200_000  # beyond it the memo starts again (it is a cache: nothing depends on its content)

    def update(self, other: WindowMemo) -> None:
        if len(self.counts) + len(other.counts) > self.MAX_ENTRIES or len(self.paid) + len(other.paid) > \
                self.MAX_ENTRIES:
            self.counts.clear()
            self.paid.clear()
        self.counts.update(other.counts)
        self.paid.update(other.paid)


class StoreWindow:
    """The rules' :class:`~gateway.monitor.rules.Window` over ``risk_signals`` and ``risk_events``, read by index.

    ``memo``: what earlier batches left (read only); what this batch learns goes to ``learned``, which the
    monitor keeps once the batch is stored."""

    def __init__(self, tx: Tx, batch: Sequence[SignalRecord] = (), memo: WindowMemo | None = None) -> None:
        self.tx = tx
        self.memo = memo or WindowMemo()
        self.learned = WindowMemo()
        self.found: dict[tuple[str, str], tuple[int, str]] = {}
        """``last_seq`` and ``last_ts`` of the events found in this batch (not stored yet), by rule and subject."""
        self.batch = batch
        self.batch_start = batch[0].seq if batch else 0
        self.batch_payments: dict[tuple[str, str], list[SignalRecord]] = {}
        for signal in batch:
            if signal.kind == TRANSFER:
                self.batch_payments.setdefault((signal.subject, signal.counterparty), []).append(signal)

    @staticmethod
    def _where(query: WindowQuery) -> tuple[str, list[Any]]:
        sql = f"kind IN ({', '.join('?' * len(query.kinds))})"
        params: list[Any] = list(query.kinds)
        if query.column is not None:  # a fixed column name from the rules, never request data
            sql += f" AND {query.column} = ?"
            params.append(query.value)
        sql += " AND ts >= ? AND seq <= ? AND seq > ?"
        params += [query.since, query.upto_seq, query.after_seq]
        if query.min_fen is not None:
            sql, params = sql + " AND amount_fen > ?", [*params, query.min_fen]
        if query.max_fen is not None:
            sql, params = sql + " AND amount_fen <= ?", [*params, query.max_fen]
        return sql, params

    def count(self, query: WindowQuery, cap: int) -> int:
        where, params = self._where(query)
        row = self.tx.fetchone(f"SELECT COUNT(*) AS n FROM (SELECT 1 FROM risk_signals WHERE {where} LIMIT ?) t",
                               [*params, cap])
        return 0 if row is None else int(row["n"])

    def _count_all(self, query: WindowQuery) -> int:
        where, params = self._where(query)
        row = self.tx.fetchone(f"SELECT COUNT(*) AS n FROM risk_signals WHERE {where}", params)
        return 0 if row is None else int(row["n"])

    def window_count(self, query: WindowQuery, cap: int) -> int:
        key = (query.kinds, query.column, query.value)
        if key in self.learned.counts:
            return self.learned.counts[key]
        known = self.memo.counts.get(key)
        if known is not None:  # the bound grows by this key's signals in the batch
            assert query.column is not None
            bound = known + sum(1 for s in self.batch if s.kind in query.kinds and s.seq <= query.upto_seq
                                and getattr(s, query.column) == query.value)
            if bound < cap:
                self.learned.counts[key] = bound
                return bound
        count = self.count(query, cap)
        self.learned.counts[key] = count
        return count

    def signals(self, query: WindowQuery, newest: int) -> list[SignalRecord]:
        where, params = self._where(query)
        rows = self.tx.fetchall(f"SELECT * FROM risk_signals WHERE {where} ORDER BY seq DESC LIMIT ?",
                                [*params, newest])
        return [SignalRecord.from_row(row) for row in reversed(rows)]

    def reported_upto(self, rule: str, subject: str) -> tuple[int, str]:
        if (rule, subject) in self.found:
            return self.found[(rule, subject)]
        row = self.tx.fetchone("SELECT evidence FROM risk_events WHERE rule = ? AND subject = ? "
                               "ORDER BY seq DESC LIMIT 1", (rule, subject))
        if row is None:
            return 0, ""
        evidence = json.loads(row["evidence"])
        return int(evidence.get("last_seq", 0)), str(evidence.get("last_ts", ""))

    def paid_before(self, payer: str, payee: str, before: str) -> bool:
        return self.tx.fetchone("SELECT 1 FROM risk_signals WHERE kind = ? AND counterparty = ? AND subject = ? "
                                "AND ts < ? LIMIT 1", (TRANSFER, payee, payer, before)) is not None

    def last_paid(self, payer: str, payee: str, before_seq: int) -> str | None:
        pair = (payer, payee)
        earlier = [s.ts for s in self.batch_payments.get(pair, ()) if s.seq < before_seq]
        if earlier:
            return max(earlier)
        if pair in self.memo.paid:
            return self.memo.paid[pair]
        row = self.tx.fetchone("SELECT MAX(ts) AS ts FROM risk_signals WHERE kind = ? AND counterparty = ? "
                               "AND subject = ? AND seq < ?", (TRANSFER, payee, payer, self.batch_start))
        return None if row is None or row["ts"] is None else str(row["ts"])

    def remember_payments(self) -> None:
        """After the batch: each pair's last payment, for the next batches."""
        for pair, payments in self.batch_payments.items():
            self.learned.paid[pair] = max(s.ts for s in payments)

    def last_movement(self, wallet: str, before_seq: int) -> str | None:
        moments = []
        for kind in MOVEMENTS:
            row = self.tx.fetchone("SELECT MAX(ts) AS ts FROM risk_signals WHERE kind = ? AND subject = ? AND seq < ?",
                                   (kind, wallet, before_seq))
            if row is not None and row["ts"] is not None:
                moments.append(str(row["ts"]))
        row = self.tx.fetchone("SELECT MAX(ts) AS ts FROM risk_signals WHERE kind = ? AND counterparty = ? "
                               "AND seq < ?", (TRANSFER, wallet, before_seq))
        if row is not None and row["ts"] is not None:
            moments.append(str(row["ts"]))
        return max(moments) if moments else None

    def recipient_seen(self, recipient: str, chain_id: int, before_seq: int) -> bool:
        rows = self.tx.fetchall("SELECT detail FROM risk_signals WHERE kind = ? AND counterparty = ? AND seq < ? "
                                "ORDER BY seq DESC LIMIT 1000", (EVM_TRANSACTION, recipient, before_seq))
        return any(json.loads(row["detail"]).get("chain_id") == chain_id for row in rows)


@dataclass(frozen=True)
class Evaluation:
    """One batch evaluated: the signals (by seq), the events they gave rise to, and what the monitor may
    remember of it once it is stored."""

    seqs: list[int]
    events: list[RiskEvent]
    learned: WindowMemo = field(default_factory=WindowMemo)


def evaluate_batch_in(tx: Tx, rules: Sequence[Rule], batch_max: int, memo: WindowMemo | None = None) -> Evaluation:
    """Read the oldest unevaluated signals and evaluate every rule over them (reads only)."""
    rows = tx.fetchall("SELECT * FROM risk_signals WHERE evaluated = 0 ORDER BY seq LIMIT ?", (batch_max,))
    batch = [SignalRecord.from_row(row) for row in rows]
    window = StoreWindow(tx, batch, memo)
    events: list[RiskEvent] = []
    for rule in rules:
        for signal in triggers(rule, batch):
            for finding in rule.evaluate(signal, window):
                window.found[(rule.name, finding.subject)] = (int(finding.evidence["last_seq"]),
                                                              str(finding.evidence["last_ts"]))
                events.append(RiskEvent(
                    rule.name, rule.version, finding.severity or rule.severity, finding.score, finding.subject,
                    finding.evidence, deterministic_event_id(rule.name, rule.version, finding.subject, signal.seq),
                    parties=finding.parties))
    window.remember_payments()
    return Evaluation([signal.seq for signal in batch], events, window.learned)


class LeaseLost(Exception):
    """Another evaluator holds the lease, or took the batch: nothing of this evaluation is written (the
    monitor's own affair, never shown to a client)."""


def take_lease_in(tx: Tx, holder: str, seconds: float) -> bool:
    """Take or renew the evaluator's lease for ``holder``; False when another holds it unexpired."""
    tx.lock("risk-monitor-lease")
    now = clock.now_iso()
    row = tx.fetchone("SELECT holder, expires_at FROM risk_monitor_lease WHERE name = ?", (LEASE,))
    if row is not None and row["holder"] != holder and row["expires_at"] > now:
        return False
    expires = clock.after(seconds)
    if row is None:
        tx.execute("INSERT INTO risk_monitor_lease (name, holder, expires_at) VALUES (?, ?, ?)",
                   (LEASE, holder, expires))
    else:
        tx.execute("UPDATE risk_monitor_lease SET holder = ?, expires_at = ? WHERE name = ?", (holder, expires, LEASE))
    return True


def move_outbox_in(tx: Tx, holder: str, lease_seconds: float, batch_max: int) -> int | None:
    """Take or renew the lease, then move the oldest ``batch_max`` signals of the outbox into
    ``risk_signals`` (in outbox order) and delete exactly those. Returns how many were moved, or None when
    another evaluator holds the lease (nothing is written)."""
    if not take_lease_in(tx, holder, lease_seconds):
        return None
    seqs = [int(row["seq"]) for row in tx.fetchall("SELECT seq FROM risk_outbox ORDER BY seq LIMIT ?", (batch_max,))]
    for start in range(0, len(seqs), MARK_CHUNK):
        chunk = seqs[start:start + MARK_CHUNK]
        among = f"seq IN ({', '.join('?' * len(chunk))})"
        tx.execute("INSERT INTO risk_signals (ts, kind, subject, amount_fen, detail, actor, counterparty) "
                   f"SELECT ts, kind, subject, amount_fen, detail, actor, counterparty FROM risk_outbox WHERE {among} "
                   "ORDER BY seq", chunk)
        tx.execute(f"DELETE FROM risk_outbox WHERE {among}", chunk)
    return len(seqs)


def store_evaluation_in(tx: Tx, evaluation: Evaluation, holder: str, lease_seconds: float) -> list[RiskEvent]:
    """Mark the batch evaluated and store its events — only while ``holder`` holds the lease and every signal
    of the batch is still unevaluated. Returns the events stored (not those stored before under their ids).

    Raises:
        LeaseLost: nothing is written (another evaluator holds the lease or took these signals).
    """
    if not take_lease_in(tx, holder, lease_seconds):
        raise LeaseLost("another evaluator holds the risk monitor's lease")
    marked = 0
    for start in range(0, len(evaluation.seqs), MARK_CHUNK):
        chunk = evaluation.seqs[start:start + MARK_CHUNK]
        marked += tx.execute(f"UPDATE risk_signals SET evaluated = 1 WHERE evaluated = 0 AND seq IN "
                             f"({', '.join('?' * len(chunk))})", chunk)
    if marked != len(evaluation.seqs):
        raise LeaseLost("these signals were evaluated by another evaluator")
    return [event for event in evaluation.events if insert_event_in(tx, event) is not None]


class RiskMonitor:
    """The risk monitor of one HTTP process (see the module's docstring)."""

    def __init__(self, database: Database, settings: Settings, metrics: Metrics, signer: Signer | None = None,
                 on_stored: Callable[[RiskEvent], None] | None = None, holder: str | None = None) -> None:
        self.database = database
        self.on_stored = on_stored
        """Told of every event this monitor stores (the evaluator process reports them to its HTTP process)."""
        self.forward: Callable[[], None] | None = None
        """Where nudges go besides this monitor (the evaluator process, when the rules run there)."""
        self.settings = settings
        self.metrics = metrics
        self.signer = signer
        self.rules = configured_rules(settings.risk, settings.approvals)
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        """Who holds the evaluator's lease: an evaluator process restarted by its HTTP process (which saw the
        last one end) takes its predecessor's name, and so its lease, at once."""
        self._wake = asyncio.Event()
        self._stored = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._hsm_ready: bool | None = None
        self._memo = WindowMemo()
        self.closing = False
        """Set at shutdown: the live streams end (``GET /v1/risk/stream``)."""
        self._log = structlog.get_logger("gateway.monitor")

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        self._stopping = True  # the loop ends at its next turn even if a cancellation were lost
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def end_streams(self) -> None:
        """The server is shutting down: let every live stream end now rather than at the shutdown timeout."""
        self.closing = True
        async with self._stored:
            self._stored.notify_all()

    def nudge(self) -> None:
        """Something may have committed a signal in this process: evaluate soon (cheap; any task may call it)."""
        self._wake.set()
        if self.forward is not None:
            self.forward()

    async def wait_for_events(self, timeout: float) -> None:
        """Return when this process has stored events, or after ``timeout`` (events of other processes and
        instances are found by reading again)."""
        async with self._stored:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):  # not wait_for: on 3.11 it can swallow a cancellation
                    await self._stored.wait()

    async def head(self) -> int:
        """The cursor of the newest stored event."""
        return await self.database.read(head_seq_in)

    # --- the loop -------------------------------------------------------------------------------

    async def _run(self) -> None:
        risk = self.settings.risk
        while not self._stopping:
            if risk.monitor:
                with contextlib.suppress(TimeoutError):
                    # Not asyncio.wait_for: on Python 3.11 it returns instead of raising when the event is set
                    # as the task is cancelled, and the cancellation is lost — a close() that waits for ever
                    # (seen in CI: a test gateway's teardown hung). asyncio.timeout counts cancellations right.
                    async with asyncio.timeout(risk.poll_seconds):
                        await self._wake.wait()
            else:  # nothing to evaluate here: only the signer is watched
                await asyncio.sleep(risk.poll_seconds)
            if self._stopping:
                return
            self._wake.clear()
            try:
                await self._watch_signer()
                if risk.monitor:
                    if risk.settle_seconds:
                        await asyncio.sleep(risk.settle_seconds)
                    while await self.evaluate_pending() >= risk.batch_max:
                        pass
                self.metrics.risk_signals_pending.set(await self.database.read(pending_signals_in))
            except LeaseLost as exc:  # another process evaluates: it will have done these
                self._log.info("risk evaluation left to another process", reason=str(exc))
            except GatewayError as exc:  # the store is away: the signals wait in the outbox
                self._log.warning("risk evaluation deferred", error=exc.detail)
            except Exception:  # never let the monitor die: the signals wait in the outbox
                self._log.exception("risk evaluation failed")

    async def evaluate_pending(self) -> int:
        """Evaluate one batch of pending signals if this process holds (or can take) the lease. Returns how
        many signals it evaluated."""
        risk = self.settings.risk
        moved = await self.database.write(
            lambda tx: move_outbox_in(tx, self.holder, risk.lease_seconds, risk.batch_max))
        if moved is None:
            return 0
        rules, memo = self.rules, self._memo
        evaluation = await self.database.read(lambda tx: evaluate_batch_in(tx, rules, risk.batch_max, memo))
        if not evaluation.seqs:
            return 0
        try:
            stored = await self.database.write(
                lambda tx: store_evaluation_in(tx, evaluation, self.holder, risk.lease_seconds))
        except BaseException:
            self._memo = WindowMemo()  # what the batch taught is not so: forget everything
            raise
        self._memo.update(evaluation.learned)
        for event in stored:
            self.metrics.risk_events.labels(event.rule, event.severity).inc()
            if self.on_stored is not None:
                self.on_stored(event)
        if stored:
            async with self._stored:
                self._stored.notify_all()
        return len(evaluation.seqs)

    async def stored_elsewhere(self, rule: str, severity: str) -> None:
        """An event the evaluator process stored: counted here, and live streams woken."""
        self.metrics.risk_events.labels(rule, severity).inc()
        async with self._stored:
            self._stored.notify_all()

    async def _watch_signer(self) -> None:
        """Write ``hsm.outage`` / ``hsm.restored`` when the signer's readiness changes (its own transaction:
        an outage is no decision of a request)."""
        if self.signer is None:
            return
        health = self.signer.health()
        previous, self._hsm_ready = self._hsm_ready, health.ready
        if previous is None or previous == health.ready:
            return
        kind = "hsm.restored" if health.ready else "hsm.outage"
        await self.database.write(lambda tx: record_signal_in(
            tx, kind, "hsm", workers=health.workers, workers_up=health.workers_up, detail=health.detail[:200],
            process=self.holder))
        self.nudge()

