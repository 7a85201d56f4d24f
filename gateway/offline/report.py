"""The report of one device's sync: what became of each record it uploaded (docs/device-protocol.md).

Filled in by the rules (:class:`gateway.offline.rules.Reconciliation`), stored with the sync and
returned to the teller by :func:`gateway.offline.reconcile.reconcile_in`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SideCounts:
    """Every record received is exactly one of new, known (reconciled before) or invalid."""

    received: int = 0
    new: int = 0
    known: int = 0
    posted: int = 0
    awaiting: int = 0
    held: int = 0
    invalid: int = 0


@dataclass
class Report:
    sync_id: str
    device_id: str
    export_hash: bytes
    counter: int
    rx: int
    payments: SideCounts = field(default_factory=SideCounts)
    receipts: SideCounts = field(default_factory=SideCounts)
    posted_fen: int = 0
    held_fen: int = 0
    discrepancies: list[dict[str, Any]] = field(default_factory=list)

    def document(self, device: dict[str, Any]) -> dict[str, Any]:
        def side(counts: SideCounts, awaiting: str) -> dict[str, int]:
            return {"received": counts.received, "new": counts.new, "known": counts.known, "posted": counts.posted,
                    awaiting: counts.awaiting, "held": counts.held, "invalid": counts.invalid}

        return {
            "sync_id": self.sync_id, "device_id": self.device_id, "export_hash": self.export_hash.hex(),
            "replayed": False, "counter": self.counter, "rx": self.rx,
            "payments": side(self.payments, "awaiting_payee"), "receipts": side(self.receipts, "awaiting_payer"),
            "posted_fen": self.posted_fen, "held_fen": self.held_fen, "discrepancies": self.discrepancies,
            "device": {"status": device["status"], "chain_counter": int(device["chain_counter"]),
                       "spent_fen": int(device["spent_fen"]),
                       "outstanding_fen": int(device["issued_fen"]) - int(device["spent_fen"])
                       - int(device["returned_fen"])},
        }
