"""The risk outbox: a decision writes its signal in its own store transaction.

Whatever the monitor (:mod:`gateway.monitor`) later makes of a signal, the signal itself commits or
rolls back with the decision that caused it — a crash can neither keep a decision and lose its signal
nor leave a signal of a decision that never happened. Writing one is an INSERT, nothing more: the rules
run after commit, off the request path.
"""

from __future__ import annotations

import json
from typing import Any

from gateway import clock
from gateway.ledger.store import Tx


def record_signal_in(tx: Tx, kind: str, subject: str, amount_fen: int | None = None, **detail: Any) -> None:
    """Queue a signal of ``kind`` (e.g. ``transfer.signed``, ``policy.refused``) about ``subject`` (a wallet,
    device, client or EVM address). ``detail`` holds ids and counterparties; token amounts as decimal text."""
    if amount_fen is not None and type(amount_fen) is not int:
        raise TypeError("amount_fen is an integer number of fen")
    tx.execute(
        "INSERT INTO risk_signals (ts, kind, subject, amount_fen, detail) VALUES (?, ?, ?, ?, ?)",
        (clock.now_iso(), kind, subject, amount_fen, json.dumps(detail, sort_keys=True, separators=(",", ":"))),
    )
