"""The risk rules as pure logic, over a window made of a list (the worker's reads the store by index);
and the HSM outage watch, which has no request transaction to share."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.config import ApprovalSettings, FrozenPayeeRule, RiskSettings, StructuringRule, load_settings
from gateway.ledger.engines import open_database
from gateway.metrics import Metrics
from gateway.monitor.process import bind_nudge_socket
from gateway.monitor.rules import (
    DEVICE_FROZEN,
    TRANSFER,
    FrozenPayee,
    Notable,
    SignalRecord,
    Structuring,
    WindowQuery,
    configured_rules,
    triggers,
)
from gateway.monitor.worker import RiskMonitor
from gateway.risk.events import deterministic_event_id
from gateway.signing import SignerHealth

T0 = "2026-12-05T10:00:00.000000Z"


def at(minute: int) -> str:
    return f"2026-12-05T10:{minute:02d}:00.000000Z"


@dataclass
class ListWindow:
    """A :class:`~gateway.monitor.rules.Window` over a list of signals (and the events reported so far)."""

    signals_: list[SignalRecord]
    reported: dict[tuple[str, str], tuple[int, str]] = field(default_factory=dict)

    def _match(self, query: WindowQuery) -> list[SignalRecord]:
        return [s for s in self.signals_ if s.kind in query.kinds
                and (query.column is None or getattr(s, query.column) == query.value)
                and s.ts >= query.since and query.after_seq < s.seq <= query.upto_seq
                and (query.min_fen is None or (s.amount_fen or 0) > query.min_fen)
                and (query.max_fen is None or (s.amount_fen or 0) <= query.max_fen)]

    def count(self, query: WindowQuery, cap: int) -> int:
        return min(cap, len(self._match(query)))

    def window_count(self, query: WindowQuery, cap: int) -> int:
        return len(self._match(query))

    def signals(self, query: WindowQuery, newest: int) -> list[SignalRecord]:
        return self._match(query)[-newest:]

    def reported_upto(self, rule: str, subject: str) -> tuple[int, str]:
        return self.reported.get((rule, subject), (0, ""))

    def paid_before(self, payer: str, payee: str, before: str) -> bool:
        return any(s.kind == TRANSFER and s.subject == payer and s.counterparty == payee and s.ts < before
                   for s in self.signals_)

    def last_paid(self, payer: str, payee: str, before_seq: int) -> str | None:
        return max((s.ts for s in self.signals_ if s.kind == TRANSFER and s.subject == payer
                    and s.counterparty == payee and s.seq < before_seq), default=None)

    def last_movement(self, wallet: str, before_seq: int) -> str | None:
        return None

    def recipient_seen(self, recipient: str, chain_id: int, before_seq: int) -> bool:
        return False


def transfer(seq: int, amount: int, minute: int = 0, wallet: str = "W1", actor: str = "client:b") -> SignalRecord:
    return SignalRecord(seq, at(minute), TRANSFER, wallet, amount, actor, "W2", {"transfer_id": f"t_{seq}"})


def structuring(min_count: int = 3) -> Structuring:
    settings = RiskSettings(structuring=StructuringRule(min_count=min_count, window_seconds=600))
    return Structuring(settings, ApprovalSettings())


def test_structuring_counts_only_the_band_just_under_the_threshold() -> None:
    """Structuring: the band is (threshold − 10 %, threshold]; at the threshold still counts, below the band not."""
    rule = structuring()
    assert rule.band(TRANSFER) == (4_500_000, 5_000_000)
    window = ListWindow([transfer(1, 5_000_000), transfer(2, 4_500_000), transfer(3, 4_500_001, 1)])
    assert rule.key(window.signals_[1]) is None  # at the band's low edge: an ordinary amount
    assert rule.evaluate(window.signals_[2], window) == []  # two in the band
    window.signals_.append(transfer(4, 4_999_999, 2))
    [finding] = rule.evaluate(window.signals_[3], window)
    assert finding.evidence["ids"] == ["t_1", "t_3", "t_4"] and finding.evidence["last_seq"] == 4
    assert finding.parties == ("client:b",)


def test_structuring_outside_the_window_and_after_a_report_does_not_count() -> None:
    rule = structuring()
    window = ListWindow([transfer(1, 4_900_000, 0), transfer(2, 4_900_000, 11), transfer(3, 4_900_000, 12)])
    assert rule.evaluate(window.signals_[2], window) == []  # the first is 12 minutes old: outside 600 s
    window = ListWindow([transfer(i, 4_900_000, i) for i in range(1, 7)], {("structuring", "W1"): (3, at(3))})
    [finding] = rule.evaluate(window.signals_[5], window)
    assert finding.evidence["ids"] == ["t_4", "t_5", "t_6"]  # never the three reported already


def test_aggregate_rules_evaluate_the_last_signal_of_each_key_in_a_batch() -> None:
    rule = structuring()
    batch = [transfer(1, 4_900_000, wallet="A"), transfer(2, 4_900_000, wallet="B"), transfer(3, 4_900_000, wallet="A"),
             transfer(4, 100, wallet="A")]
    assert [s.seq for s in triggers(rule, batch)] == [2, 3]


def test_one_payee_paid_by_several_frozen_devices() -> None:
    """Frozen devices' payee: one device collecting from several cloned or tampered hard wallets."""
    settings = RiskSettings(frozen_payee=FrozenPayeeRule(min_devices=2))
    rule = FrozenPayee(settings)
    first = SignalRecord(1, at(0), DEVICE_FROZEN, "D1", None, "user:t", "", {"payees": ["P", "Q"], "reason": "x"})
    second = SignalRecord(2, at(5), DEVICE_FROZEN, "D2", None, "user:t", "", {"payees": ["P"], "reason": "y"})
    window = ListWindow([first, second])
    assert rule.evaluate(first, window) == []
    [finding] = rule.evaluate(second, window)
    assert finding.subject == "P" and finding.evidence["devices"] == ["D1", "D2"]
    assert finding.evidence["reasons"] == ["x", "y"]


def test_notable_signals_carry_their_configured_severity() -> None:
    rule = Notable(RiskSettings())
    outage = SignalRecord(7, T0, "hsm.outage", "hsm", None, "", "", {"workers_up": 0})
    [finding] = rule.evaluate(outage, ListWindow([outage]))
    assert finding.severity == "high" and finding.evidence["kind"] == "hsm.outage" and finding.score == 75
    assert rule.key(SignalRecord(8, T0, "transfer.posted", "W", 1)) is None


def test_every_rule_can_be_disabled() -> None:
    settings = RiskSettings()
    assert {rule.name for rule in configured_rules(settings, ApprovalSettings())} == {
        "structuring", "velocity", "fan_out", "fan_in", "dormant_wallet", "new_evm_recipient", "repeated_refusals",
        "frozen_devices_payee", "notable"}
    for section in ("structuring", "velocity", "fan", "dormant", "evm_recipient", "refusals", "frozen_payee"):
        getattr(settings, section).enabled = False
    settings.notable = {}
    assert configured_rules(settings, ApprovalSettings()) == []


def test_event_ids_are_derived_from_rule_subject_and_trigger() -> None:
    assert deterministic_event_id("velocity", 1, "W1", 42) == deterministic_event_id("velocity", 1, "W1", 42)
    assert deterministic_event_id("velocity", 1, "W1", 42) != deterministic_event_id("velocity", 1, "W1", 43)
    assert deterministic_event_id("velocity", 1, "W1", 42) != deterministic_event_id("velocity", 2, "W1", 42)


class FlakySigner:
    def __init__(self) -> None:
        self.ready = True

    def health(self) -> SignerHealth:
        return SignerHealth(self.ready, 2, 2 if self.ready else 0, "" if self.ready else "token removed")


def test_an_hsm_outage_is_written_once_per_transition(tmp_path: Path) -> None:
    """An HSM outage has no request transaction: the monitor writes its signal in one of its own."""

    async def scenario() -> list[Any]:
        database = await open_database(f"sqlite:///{tmp_path / 'store.db'}")
        await database.migrate()
        signer = FlakySigner()
        monitor = RiskMonitor(database, load_settings(None, environ={}), Metrics(), signer)  # type: ignore[arg-type]
        try:
            await monitor._watch_signer()  # the first look only learns the state
            signer.ready = False
            await monitor._watch_signer()
            await monitor._watch_signer()  # still down: nothing new
            signer.ready = True
            await monitor._watch_signer()
            return await database.read(lambda tx: tx.fetchall("SELECT kind, subject FROM risk_outbox ORDER BY seq"))
        finally:
            await database.close()

    rows = asyncio.run(scenario())
    assert [(row["kind"], row["subject"]) for row in rows] == [("hsm.outage", "hsm"), ("hsm.restored", "hsm")]


def test_close_ends_the_monitor_when_a_nudge_meets_the_cancellation(tmp_path: Path) -> None:
    """Threat (seen in CI, a test gateway's teardown waiting for ever): a write request's nudge wakes the
    monitor in the very turn its gateway shuts down. On Python 3.11, ``asyncio.wait_for`` then returns
    instead of raising, the cancellation is lost, and ``close()`` never returns. It must, every time."""

    async def scenario() -> int:
        database = await open_database(f"sqlite:///{tmp_path / 'store.db'}")
        await database.migrate()
        closed = 0
        try:
            for _ in range(10):
                monitor = RiskMonitor(database, load_settings(None, environ={}), Metrics())
                monitor.start()
                await asyncio.sleep(0.05)  # the loop waits for a nudge
                monitor.nudge()  # the event is set ...
                deadline = asyncio.timeout(10)  # ... and the task cancelled in the same turn (a hang detector)
                async with deadline:
                    await monitor.close()
                assert not deadline.expired(), "close() returned only when its waiter was cancelled"
                closed += 1
        finally:
            await database.close()
        return closed

    assert asyncio.run(scenario()) == 10


def test_a_flood_on_the_evaluators_nudge_socket_costs_at_most_one_evaluation_per_settle(tmp_path: Path) -> None:
    """Threat: the evaluator's nudge socket (``[server] processes > 1``) is an abstract Unix socket, which any
    local process can find in /proc/net/unix and write to. A datagram is never read as anything — any bytes
    only wake the monitor — and a flood of them costs at most one evaluation per ``settle_seconds``
    (slowness can only lower the count), never one per datagram."""
    name = f"ecny-test-nudge-{uuid.uuid4().hex}"
    settle, flood_seconds = 0.2, 1.0

    async def scenario() -> tuple[int, int]:
        database = await open_database(f"sqlite:///{tmp_path / 'store.db'}")
        await database.migrate()
        settings = load_settings(None, environ={})
        settings.risk.settle_seconds = settle
        monitor = RiskMonitor(database, settings, Metrics())
        evaluations = 0
        evaluate = monitor.evaluate_pending

        async def counted() -> int:
            nonlocal evaluations
            evaluations += 1
            return await evaluate()

        monitor.evaluate_pending = counted  # type: ignore[method-assign]
        monitor.start()
        bound = bind_nudge_socket(name, monitor.nudge)
        assert bound is not None
        sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sent = 0
        try:
            deadline = asyncio.get_running_loop().time() + flood_seconds
            while asyncio.get_running_loop().time() < deadline:
                for payload in (b"n", b"\x00" * 200, b"DROP TABLE risk_signals; --", os.urandom(64)):
                    with contextlib.suppress(BlockingIOError):
                        sender.sendto(payload, b"\0" + name.encode())
                        sent += 1
                await asyncio.sleep(0)
            await asyncio.sleep(2 * settle)
        finally:
            sender.close()
            asyncio.get_running_loop().remove_reader(bound.fileno())
            bound.close()
            await monitor.close()
            await database.close()
        return sent, evaluations

    sent, evaluations = asyncio.run(scenario())
    assert sent >= 1_000  # a flood
    assert 1 <= evaluations <= (flood_seconds + 2 * settle) / settle + 1
