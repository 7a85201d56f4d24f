"""The risk rules: what a window of signals must hold to raise an event (docs/risk.md).

A rule looks at one signal (the *trigger*) and at the signals before it in a time window, read by
index through a :class:`Window` — never by a scan of the store. Its logic is pure: the worker
(:mod:`gateway.monitor.worker`) hands it a window over the store, the unit tests a list.

Each rule reports only evidence newer than its last event about the same subject (the event's
``evidence.last_seq``): six transfers just under the threshold raise one event listing the six, and the
next six in the window raise the next one, never the same six again.

``aggregate`` rules count: of the signals of one batch with the same key (a wallet, a client) only the
last is evaluated, since its window holds the others. The other rules are evaluated for every signal.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from gateway.config import ApprovalSettings, RiskSettings
from gateway.ledger.store import Row
from gateway.risk.events import Severity

TRANSFER = "transfer.posted"
CASH_IN = "cash.in"
CASH_OUT = "cash.out"
EVM_TRANSACTION = "evm.transaction"
REFUSED = "request.refused"
DEVICE_LOADED = "device.loaded"
DEVICE_FROZEN = "device.frozen"
MOVEMENTS = (TRANSFER, CASH_IN, CASH_OUT)
EVIDENCE_IDS_MAX = 50  # a velocity event of 10,000 transfers lists the newest 50 (and the count)

Column = Literal["subject", "actor", "counterparty"]
SEVERITY_SCORES: dict[str, int] = {"info": 10, "low": 25, "medium": 50, "high": 75, "critical": 95}


@dataclass(frozen=True)
class SignalRecord:
    """One stored signal (``risk_signals``)."""

    seq: int
    ts: str
    kind: str
    subject: str
    amount_fen: int | None = None
    actor: str = ""
    counterparty: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: Row) -> SignalRecord:
        amount = row["amount_fen"]
        return cls(int(row["seq"]), row["ts"], row["kind"], row["subject"], None if amount is None else int(amount),
                   row["actor"], row["counterparty"], json.loads(row["detail"]))

    @property
    def reference(self) -> str:
        """The id the decision gave what it made (a transfer, an entry, a transaction), else ``signal:<seq>``."""
        for name in ("transfer_id", "entry_id", "transaction_id", "approval_id", "discrepancy_id", "device_id"):
            value = self.detail.get(name)
            if isinstance(value, str) and value:
                return value
        return f"signal:{self.seq}"

    def moment(self) -> datetime:
        return datetime.fromisoformat(self.ts.replace("Z", "+00:00"))


@dataclass(frozen=True)
class WindowQuery:
    """Signals of ``kinds`` whose ``column`` is ``value`` (any, when ``column`` is None), committed at or after
    ``since``, with ``after_seq < seq <= upto_seq`` and, when given, ``min_fen < amount <= max_fen``."""

    kinds: tuple[str, ...]
    column: Column | None
    value: str
    since: str
    upto_seq: int
    after_seq: int = 0
    min_fen: int | None = None
    max_fen: int | None = None


def after_report(query: WindowQuery, reported: tuple[int, str]) -> WindowQuery:
    """``query`` narrowed to what follows the last event's evidence (``reported``: its last seq and time)."""
    last_seq, last_ts = reported
    return replace(query, after_seq=max(query.after_seq, last_seq), since=max(query.since, last_ts))


class Window(Protocol):
    """What the rules read of the past (the worker's is :class:`gateway.monitor.worker.StoreWindow`)."""

    def count(self, query: WindowQuery, cap: int) -> int:
        """How many signals match, counting at most ``cap``."""
        ...

    def signals(self, query: WindowQuery, newest: int) -> list[SignalRecord]:
        """The newest ``newest`` matching signals, oldest first."""
        ...

    def reported_upto(self, rule: str, subject: str) -> tuple[int, str]:
        """``evidence.last_seq`` and ``last_ts`` of the last event of ``rule`` about ``subject`` ((0, ""): none)."""
        ...

    def window_count(self, query: WindowQuery, cap: int) -> int:
        """At most how many signals match ``query`` — an upper bound the monitor keeps between batches, or the
        count up to ``cap``: a rule asks it first, and counts exactly only when it reaches ``cap``."""
        ...

    def paid_before(self, payer: str, payee: str, before: str) -> bool:
        """Whether ``payer`` made a transfer to ``payee`` committed before ``before``."""
        ...

    def last_paid(self, payer: str, payee: str, before_seq: int) -> str | None:
        """When ``payer`` last paid ``payee`` before signal ``before_seq`` (None: never, since signals began)."""
        ...

    def last_movement(self, wallet: str, before_seq: int) -> str | None:
        """When ``wallet`` last moved money (a transfer either way, a cash-in or cash-out) before signal
        ``before_seq``; None when it never did since signals began."""
        ...

    def recipient_seen(self, recipient: str, chain_id: int, before_seq: int) -> bool:
        """Whether the gateway signed a transaction to ``recipient`` on ``chain_id`` before signal ``before_seq``."""
        ...


@dataclass(frozen=True)
class Finding:
    """What a rule found: the worker turns it into a :class:`~gateway.risk.events.RiskEvent`."""

    subject: str
    score: int
    evidence: dict[str, Any]  # always with last_seq (the newest signal it cites)
    parties: tuple[str, ...] = ()
    severity: Severity | None = None  # None: the rule's own


class Rule(Protocol):
    """One rule: its name and version (carried by its events), its severity, and whether it counts."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> int: ...

    @property
    def severity(self) -> Severity: ...

    @property
    def aggregate(self) -> bool:
        """True: only the last signal of a key in a batch is evaluated (see the module's docstring)."""
        ...

    def key(self, signal: SignalRecord) -> str | None:
        """What the rule groups ``signal`` by (None: the rule does not apply to it)."""
        ...

    def evaluate(self, signal: SignalRecord, window: Window) -> list[Finding]:
        ...


def since(signal: SignalRecord, seconds: float) -> str:
    """The start of the window of ``seconds`` that ends at ``signal``."""
    return before(signal.ts, seconds)


def before(ts: str, seconds: float) -> str:
    """The time ``seconds`` before ``ts``, both as :func:`gateway.clock.iso` writes them (UTC, ending in ``Z``:
    naive arithmetic on the digits is exact, and several times cheaper than through a time zone)."""
    return (datetime.fromisoformat(ts[:-1]) - timedelta(seconds=seconds)).isoformat(timespec="microseconds") + "Z"


def score(observed: int, threshold: int) -> int:
    """50 at the threshold, 100 at twice it or more."""
    return max(1, min(100, 50 * observed // max(1, threshold)))


def principal_parties(*scopes: str) -> tuple[str, ...]:
    """The principal scopes among ``scopes`` (actors and principal subjects), each once, sorted."""
    return tuple(sorted({s for s in scopes if s.startswith(("client:", "user:"))}))


def window_evidence(signals: Sequence[SignalRecord], seconds: float, trigger: SignalRecord) -> dict[str, Any]:
    return {"window": {"seconds": seconds, "from": since(trigger, seconds), "to": trigger.ts},
            "first_seq": signals[0].seq if signals else trigger.seq, "last_seq": trigger.seq,
            "last_ts": trigger.ts}


def single_evidence(signal: SignalRecord) -> dict[str, Any]:
    """The bounds of an event that cites one signal."""
    return {"first_seq": signal.seq, "last_seq": signal.seq, "last_ts": signal.ts}


# --- structuring ------------------------------------------------------------------------------------


@dataclass
class Structuring:
    """n transfers or cash-outs just under their approval threshold from one wallet (``by = "subject"``),
    or made by one teller across several wallets (``by = "actor"``), within the window."""

    settings: RiskSettings
    approvals: ApprovalSettings
    by: Column = "subject"
    name: str = "structuring"
    version: int = 1
    aggregate: bool = True

    @property
    def severity(self) -> Severity:
        return self.settings.structuring.severity

    def band(self, kind: str) -> tuple[int, int]:
        """(exclusive low, inclusive high) of "just under" for ``kind``: above the threshold needs approval."""
        threshold = self.approvals.transfer_threshold_fen if kind == TRANSFER else self.approvals.cash_out_threshold_fen
        return threshold - threshold * self.settings.structuring.band_percent // 100, threshold

    def key(self, signal: SignalRecord) -> str | None:
        if signal.kind not in (TRANSFER, CASH_OUT) or signal.amount_fen is None:
            return None
        low, high = self.band(signal.kind)
        if self.by == "actor" and not signal.actor.startswith("user:"):  # a client acts for one wallet's owner
            return None
        value = signal.subject if self.by == "subject" else signal.actor
        return value if value and low < signal.amount_fen <= high else None

    def evaluate(self, signal: SignalRecord, window: Window) -> list[Finding]:
        config = self.settings.structuring
        value = signal.subject if self.by == "subject" else signal.actor
        start = since(signal, config.window_seconds)
        reported = window.reported_upto(self.name, value)
        found: list[SignalRecord] = []
        for kind in (TRANSFER, CASH_OUT):
            low, high = self.band(kind)
            query = WindowQuery((kind,), self.by, value, start, signal.seq, 0, low, high)
            found += window.signals(after_report(query, reported), EVIDENCE_IDS_MAX)
        found.sort(key=lambda s: s.seq)
        if len(found) < config.min_count:
            return []
        if self.by == "actor" and len({s.subject for s in found}) < 2:  # one wallet: its own event says it
            return []
        evidence = {**window_evidence(found, config.window_seconds, signal), "by": self.by,
                    "count": len(found), "ids": [s.reference for s in found],
                    "amounts_fen": [s.amount_fen for s in found], "total_fen": sum(s.amount_fen or 0 for s in found),
                    "wallets": sorted({s.subject for s in found}), "actors": sorted({s.actor for s in found})}
        return [Finding(value, score(len(found), config.min_count), evidence,
                        principal_parties(value, *(s.actor for s in found)))]


# --- velocity ----------------------------------------------------------------------------------------


@dataclass
class Velocity:
    """More than a configured number of signals of ``kinds`` with one ``column`` value within the window."""

    settings: RiskSettings
    dimension: Literal["wallet", "client", "device", "evm_address"]
    name: str = "velocity"
    version: int = 1
    aggregate: bool = True

    @property
    def severity(self) -> Severity:
        return self.settings.velocity.severity

    @property
    def _shape(self) -> tuple[tuple[str, ...], Column, int]:
        """The kinds counted, the column that keys the window, and the maximum (read from the settings at
        each evaluation, as every rule's thresholds are)."""
        velocity = self.settings.velocity
        shapes: dict[str, tuple[tuple[str, ...], Column, int]] = {
            "wallet": ((TRANSFER, CASH_OUT), "subject", velocity.wallet_max),
            "client": ((TRANSFER, EVM_TRANSACTION), "actor", velocity.client_max),
            "device": ((DEVICE_LOADED,), "subject", velocity.device_max),
            "evm_address": ((EVM_TRANSACTION,), "subject", velocity.evm_address_max),
        }
        return shapes[self.dimension]

    def _value(self, signal: SignalRecord, column: Column) -> str:
        value = getattr(signal, column)
        if self.dimension == "evm_address" and value:
            return f"{signal.detail.get('chain_id')}:{value}"
        return str(value)

    def key(self, signal: SignalRecord) -> str | None:
        kinds, column, _ = self._shape
        if signal.kind not in kinds:
            return None
        return self._value(signal, column) or None

    def evaluate(self, signal: SignalRecord, window: Window) -> list[Finding]:
        kinds, column, maximum = self._shape
        velocity = self.settings.velocity
        seconds = velocity.client_window_seconds if self.dimension == "client" else velocity.window_seconds
        value = getattr(signal, column)
        subject = self._value(signal, column)
        query = WindowQuery(kinds, column, value, since(signal, seconds), signal.seq)
        if window.window_count(query, maximum) < maximum:  # the cheap test first: most windows are quiet
            return []
        query = after_report(query, window.reported_upto(self.name, subject))
        count = window.count(query, 10 * maximum)
        if count < maximum:
            return []
        newest = window.signals(query, EVIDENCE_IDS_MAX)
        if self.dimension == "evm_address":
            newest = [s for s in newest if s.detail.get("chain_id") == signal.detail.get("chain_id")]
        evidence = {**window_evidence(newest, seconds, signal), "dimension": self.dimension, "count": count,
                    "threshold": maximum, "ids": [s.reference for s in newest],
                    "total_fen": sum(s.amount_fen or 0 for s in newest)}
        return [Finding(subject, score(count, maximum), evidence,
                        principal_parties(subject, *(s.actor for s in newest)))]


# --- fan-out / fan-in --------------------------------------------------------------------------------


@dataclass
class Fan:
    """Fan-out: one wallet paying many payees it never paid before the window. Fan-in: many wallets paying one.

    The distinct count grows only with a payment to a payee the payer never paid (fan-out) or did not pay
    within the window (fan-in): every other transfer is dismissed by one index probe, so a busy pair of
    wallets costs nothing more."""

    settings: RiskSettings
    direction: Literal["out", "in"]
    version: int = 1
    aggregate: bool = False
    scan_max: int = 10_000  # transfers read of one window at most

    @property
    def name(self) -> str:
        return f"fan_{self.direction}"

    @property
    def severity(self) -> Severity:
        return self.settings.fan.severity

    def key(self, signal: SignalRecord) -> str | None:
        if signal.kind != TRANSFER:
            return None
        return (signal.subject if self.direction == "out" else signal.counterparty) or None

    def evaluate(self, signal: SignalRecord, window: Window) -> list[Finding]:
        fan = self.settings.fan
        last = window.last_paid(signal.subject, signal.counterparty, signal.seq)
        if last is not None and (self.direction == "out" or last >= since(signal, fan.window_seconds)):
            return []  # not a new payee (fan-out: ever; fan-in: in the window): the count did not grow
        start = since(signal, fan.window_seconds)
        column: Column = "subject" if self.direction == "out" else "counterparty"
        value = getattr(signal, column)
        threshold = fan.out_payees if self.direction == "out" else fan.in_payers
        query = after_report(WindowQuery((TRANSFER,), column, value, start, signal.seq),
                             window.reported_upto(self.name, value))
        transfers = window.signals(query, self.scan_max)
        others: dict[str, list[SignalRecord]] = {}
        for transfer in transfers:
            other = transfer.counterparty if self.direction == "out" else transfer.subject
            others.setdefault(other, []).append(transfer)
        if len(others) < threshold:
            return []
        if self.direction == "out":  # only payees the wallet never paid before the window count
            others = {payee: found for payee, found in others.items() if not window.paid_before(value, payee, start)}
            if len(others) < threshold:
                return []
        cited = sorted((s for found in others.values() for s in found), key=lambda s: s.seq)
        evidence = {**window_evidence(cited, fan.window_seconds, signal), "count": len(others),
                    "threshold": threshold, ("payees" if self.direction == "out" else "payers"): sorted(others),
                    "ids": [s.reference for s in cited[-EVIDENCE_IDS_MAX:]],
                    "total_fen": sum(s.amount_fen or 0 for s in cited)}
        return [Finding(value, score(len(others), threshold), evidence,
                        principal_parties(*(s.actor for s in cited)))]


# --- dormant wallet ----------------------------------------------------------------------------------


@dataclass
class Dormant:
    """A transfer out or a cash-out of at least ``min_fen`` from a wallet idle for ``idle_days``."""

    settings: RiskSettings
    name: str = "dormant_wallet"
    version: int = 1
    aggregate: bool = False

    @property
    def severity(self) -> Severity:
        return self.settings.dormant.severity

    def key(self, signal: SignalRecord) -> str | None:
        large = (signal.amount_fen or 0) >= self.settings.dormant.min_fen
        return signal.subject if signal.kind in (TRANSFER, CASH_OUT) and large else None

    def evaluate(self, signal: SignalRecord, window: Window) -> list[Finding]:
        dormant = self.settings.dormant
        last = window.last_movement(signal.subject, signal.seq)
        if last is None or last > since(signal, dormant.idle_days * 86_400):
            return []
        idle = signal.moment() - datetime.fromisoformat(last.replace("Z", "+00:00"))
        evidence = {"id": signal.reference, "kind": signal.kind, "amount_fen": signal.amount_fen,
                    "previous_movement": last, "idle_days": idle.days, "threshold_days": dormant.idle_days,
                    "min_fen": dormant.min_fen, **single_evidence(signal)}
        return [Finding(signal.subject, score(signal.amount_fen or 0, dormant.min_fen), evidence,
                        principal_parties(signal.actor))]


# --- new EVM recipient -------------------------------------------------------------------------------


@dataclass
class NewEvmRecipient:
    """An EVM transaction of at least ``min_units`` whole tokens to a recipient never paid before."""

    settings: RiskSettings
    name: str = "new_evm_recipient"
    version: int = 1
    aggregate: bool = False

    @property
    def severity(self) -> Severity:
        return self.settings.evm_recipient.severity

    def _amount(self, signal: SignalRecord) -> tuple[int, int]:
        try:
            return int(signal.detail.get("amount", "0")), int(signal.detail.get("decimals", 0))
        except (TypeError, ValueError):
            return 0, 0

    def key(self, signal: SignalRecord) -> str | None:
        if signal.kind != EVM_TRANSACTION or not signal.counterparty:
            return None
        amount, decimals = self._amount(signal)
        return signal.counterparty if amount >= self.settings.evm_recipient.min_units * 10**decimals else None

    def evaluate(self, signal: SignalRecord, window: Window) -> list[Finding]:
        chain_id = int(signal.detail.get("chain_id", 0))
        if window.recipient_seen(signal.counterparty, chain_id, signal.seq):
            return []
        amount, decimals = self._amount(signal)
        minimum = self.settings.evm_recipient.min_units
        evidence = {"id": signal.reference, "chain_id": chain_id, "from": signal.subject,
                    "recipient": signal.counterparty, "asset": signal.detail.get("asset"),
                    "symbol": signal.detail.get("symbol"), "amount": str(amount), "decimals": decimals,
                    "min_units": minimum, **single_evidence(signal)}
        return [Finding(signal.counterparty, score(amount // 10**decimals, max(1, minimum)), evidence,
                        principal_parties(signal.actor))]


# --- repeated refusals -------------------------------------------------------------------------------


@dataclass
class RepeatedRefusals:
    """At least ``min_count`` permission or policy refusals of one API client or user within the window."""

    settings: RiskSettings
    name: str = "repeated_refusals"
    version: int = 1
    aggregate: bool = True

    @property
    def severity(self) -> Severity:
        return self.settings.refusals.severity

    def key(self, signal: SignalRecord) -> str | None:
        return signal.subject if signal.kind == REFUSED else None

    def evaluate(self, signal: SignalRecord, window: Window) -> list[Finding]:
        config = self.settings.refusals
        query = WindowQuery((REFUSED,), "subject", signal.subject, since(signal, config.window_seconds), signal.seq)
        refusals = window.signals(after_report(query, window.reported_upto(self.name, signal.subject)),
                                  EVIDENCE_IDS_MAX)
        if len(refusals) < config.min_count:
            return []
        evidence = {**window_evidence(refusals, config.window_seconds, signal), "count": len(refusals),
                    "threshold": config.min_count,
                    "refusals": [{"code": s.detail.get("code"), "action": s.detail.get("action"),
                                  "request_id": s.detail.get("request_id"), "seq": s.seq} for s in refusals]}
        return [Finding(signal.subject, score(len(refusals), config.min_count), evidence,
                        principal_parties(signal.subject))]


# --- one payee, several frozen devices ---------------------------------------------------------------


@dataclass
class FrozenPayee:
    """One payee device paid by at least ``min_devices`` hard wallets frozen by reconciliation."""

    settings: RiskSettings
    name: str = "frozen_devices_payee"
    version: int = 1
    aggregate: bool = False
    scan_max: int = 10_000

    @property
    def severity(self) -> Severity:
        return self.settings.frozen_payee.severity

    def key(self, signal: SignalRecord) -> str | None:
        return signal.subject if signal.kind == DEVICE_FROZEN and signal.detail.get("payees") else None

    def evaluate(self, signal: SignalRecord, window: Window) -> list[Finding]:
        config = self.settings.frozen_payee
        start = since(signal, config.window_seconds)
        findings = []
        for payee in sorted(set(signal.detail.get("payees", []))):
            query = after_report(WindowQuery((DEVICE_FROZEN,), None, "", start, signal.seq),
                                 window.reported_upto(self.name, payee))
            frozen = [s for s in window.signals(query, self.scan_max) if payee in s.detail.get("payees", [])]
            devices = sorted({s.subject for s in frozen})
            if len(devices) < config.min_devices:
                continue
            evidence = {**window_evidence(frozen, config.window_seconds, signal), "payee": payee,
                        "devices": devices, "count": len(devices), "threshold": config.min_devices,
                        "reasons": sorted({str(s.detail.get("reason", "")) for s in frozen})}
            findings.append(Finding(payee, score(len(devices), config.min_devices), evidence,
                                    principal_parties(*(s.actor for s in frozen))))
        return findings


# --- notable signals ---------------------------------------------------------------------------------


@dataclass
class Notable:
    """A signal that is an event by itself (``[risk] notable``: kind → severity)."""

    settings: RiskSettings
    name: str = "notable"
    version: int = 1
    aggregate: bool = False
    severity: Severity = "medium"

    def key(self, signal: SignalRecord) -> str | None:
        return signal.subject if signal.kind in self.settings.notable else None

    def evaluate(self, signal: SignalRecord, window: Window) -> list[Finding]:
        severity = self.settings.notable[signal.kind]
        evidence = {"kind": signal.kind, "id": signal.reference, "amount_fen": signal.amount_fen,
                    "actor": signal.actor, "counterparty": signal.counterparty, "detail": signal.detail,
                    "ts": signal.ts, **single_evidence(signal)}
        return [Finding(signal.subject, SEVERITY_SCORES[severity], evidence,
                        principal_parties(signal.actor, signal.subject), severity)]


def configured_rules(settings: RiskSettings, approvals: ApprovalSettings) -> list[Rule]:
    """The enabled rules, in the order they are evaluated."""
    rules: list[Rule] = []
    if settings.structuring.enabled:
        rules += [Structuring(settings, approvals, "subject"), Structuring(settings, approvals, "actor")]
    if settings.velocity.enabled:
        rules += [Velocity(settings, "wallet"), Velocity(settings, "client"), Velocity(settings, "device"),
                  Velocity(settings, "evm_address")]
    if settings.fan.enabled:
        rules += [Fan(settings, "out"), Fan(settings, "in")]
    if settings.dormant.enabled:
        rules.append(Dormant(settings))
    if settings.evm_recipient.enabled:
        rules.append(NewEvmRecipient(settings))
    if settings.refusals.enabled:
        rules.append(RepeatedRefusals(settings))
    if settings.frozen_payee.enabled:
        rules.append(FrozenPayee(settings))
    if settings.notable:
        rules.append(Notable(settings))
    return rules


RULE_NAMES = ("structuring", "velocity", "fan_out", "fan_in", "dormant_wallet", "new_evm_recipient",
              "repeated_refusals", "frozen_devices_payee", "notable")
"""Every rule name an event may carry (``GET /v1/risk/events?rule=``)."""


def triggers(rule: Rule, batch: Iterable[SignalRecord]) -> list[SignalRecord]:
    """The signals of ``batch`` (in seq order) that ``rule`` evaluates: every one it applies to, or for an
    aggregate rule the last one of each key."""
    keyed = [(signal, rule.key(signal)) for signal in batch]
    if not rule.aggregate:
        return [signal for signal, key in keyed if key is not None]
    last: dict[str, SignalRecord] = {}
    for signal, key in keyed:
        if key is not None:
            last[key] = signal
    return sorted(last.values(), key=lambda s: s.seq)
