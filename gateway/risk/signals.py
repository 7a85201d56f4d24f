"""The risk outbox: a decision writes its signal in its own store transaction.

Whatever the monitor (:mod:`gateway.monitor`) later makes of a signal, the signal itself commits or
rolls back with the decision that caused it — a crash can neither keep a decision and lose its signal
nor leave a signal of a decision that never happened. Writing one is an INSERT into ``risk_outbox``, a
table with no secondary index, nothing more: the monitor moves signals into ``risk_signals`` (the rules'
indexed history) in batches and runs the rules after commit, off the request path.

The kinds written, their subject, actor and counterparty are listed in docs/risk.md ("Signals").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from gateway import clock
from gateway.ledger.store import Tx


def record_signal_in(tx: Tx, kind: str, subject: str, amount_fen: int | None = None, *, actor: str = "",
                     counterparty: str = "", **detail: Any) -> None:
    """Queue a signal of ``kind`` (e.g. ``transfer.posted``, ``request.refused``) about ``subject`` (a wallet,
    device, client or EVM address). ``actor``: the principal scope whose decision it is (``client:NAME``,
    ``user:NAME``); ``counterparty``: whom it names besides the subject (a payee wallet, an EVM recipient).
    ``detail`` holds ids and the rest; token amounts as decimal text."""
    if amount_fen is not None and type(amount_fen) is not int:
        raise TypeError("amount_fen is an integer number of fen")
    tx.queue(  # an insert under a fresh identity: it cannot collide (PostgreSQL pipelines it)
        "INSERT INTO risk_outbox (ts, kind, subject, amount_fen, detail, actor, counterparty) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (clock.now_iso(), kind, subject, amount_fen, json.dumps(detail, sort_keys=True, separators=(",", ":")),
         actor, counterparty),
    )


def pending_signals_in(tx: Tx) -> int:
    """Signals the rules have not evaluated yet: those in the outbox and those moved but not evaluated."""
    row = tx.fetchone("SELECT (SELECT COUNT(*) FROM risk_outbox) + "
                      "(SELECT COUNT(*) FROM risk_signals WHERE evaluated = 0) AS n")
    return 0 if row is None else int(row["n"])


@dataclass(frozen=True)
class Signal:
    """A signal to be written later in a transaction that is not the caller's own — the grouped audit
    writer's, for a refusal audited through :class:`gateway.audit.chain.AuditLog` (see ``AuditEntry.signals``)."""

    kind: str
    subject: str
    amount_fen: int | None = None
    actor: str = ""
    counterparty: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    def record_in(self, tx: Tx) -> None:
        record_signal_in(tx, self.kind, self.subject, self.amount_fen, actor=self.actor,
                         counterparty=self.counterparty, **self.detail)
