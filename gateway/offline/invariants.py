"""The ledger invariants of offline payments, and the journal entry ids they check (docs/device-protocol.md).

``ecny-gateway ledger check`` runs :func:`check_offline_entries` (and through it :func:`check_offline_reserves`)
after the journal's own checks; a reconciliation refuses to write a device whose figures break
:func:`outstanding_problem` (:meth:`gateway.offline.rules.Reconciliation.write`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from gateway.ledger.journal import reserve_account
from gateway.ledger.store import Tx


def offline_entry_id(payment_hash: bytes) -> str:
    """The journal entry id of a payment: derived from its hash (96 bits of it, as long as the ledger's
    other entry ids), so it can only ever post once. The entry's reference is the full hash."""
    return "off_" + payment_hash[:12].hex()


def check_offline_entries(tx: Tx) -> list[str]:
    """Offline payments against the journal (``ecny-gateway ledger check`` covers the journal itself): every
    posted or honoured payment names the journal entry that moved it, and every such entry credits exactly
    the sum of the payments naming it. Returns the problems found (none: sound)."""
    problems = []
    for row in tx.fetchall("SELECT payment_hash, status FROM offline_payments "
                           "WHERE status IN ('posted', 'honoured') AND entry_id IS NULL"):
        # Recorded before payments named their entry: then each had its own, offline_entry_id(hash).
        digest = bytes(row["payment_hash"])
        if tx.fetchone("SELECT 1 FROM journal WHERE entry_id = ?", (offline_entry_id(digest),)) is None:
            problems.append(f"offline payment {digest.hex()} is {row['status']} but has no journal entry")
    for row in tx.fetchall(
            "SELECT p.entry_id, p.paid, (SELECT COALESCE(SUM(amount), 0) FROM postings "
            "WHERE postings.entry_id = p.entry_id AND amount > 0) AS credited FROM (SELECT entry_id, SUM(amount) "
            "AS paid FROM offline_payments WHERE entry_id IS NOT NULL GROUP BY entry_id) p"):
        if int(row["paid"]) != int(row["credited"]):
            problems.append(f"journal entry {row['entry_id']} credits {row['credited']} for offline payments of "
                            f"{row['paid']}")
    return problems + check_offline_reserves(tx)


def outstanding_problem(device: Any) -> str:
    """What is wrong with a device's figures (empty: nothing): its payments within the loaded value
    (``spent_fen``) and the value returned at unload never add up to more than was loaded (``issued_fen``),
    so its outstanding value (issued - spent - returned) is never negative."""
    issued, spent, returned = int(device["issued_fen"]), int(device["spent_fen"]), int(device["returned_fen"])
    if spent < 0 or returned < 0 or spent + returned > issued:
        return (f"device {device['device_id']}: spent {spent} + returned {returned} fen exceed the {issued} fen "
                f"loaded (outstanding {issued - spent - returned})")
    return ""


def check_offline_reserves(tx: Tx) -> list[str]:
    """Hard wallets against the ledger: no device's outstanding value is negative, and every wallet's offline
    reserve holds exactly its devices' outstanding value plus the payments within their loaded value that are
    not settled yet (awaiting a record or held). Returns the problems found (none: sound)."""
    problems = [outstanding_problem(row) for row in tx.fetchall(
        "SELECT device_id, issued_fen, spent_fen, returned_fen FROM devices "
        "WHERE spent_fen < 0 OR returned_fen < 0 OR spent_fen + returned_fen > issued_fen")]
    # Three grouped scans (a store of millions of payments is checked in linear time), compared here.
    expected: dict[str, int] = defaultdict(int)
    held: dict[str, int] = defaultdict(int)
    for row in tx.fetchall("SELECT wallet_id, SUM(issued_fen - spent_fen - returned_fen) AS outstanding "
                           "FROM devices GROUP BY wallet_id"):
        expected[reserve_account(row["wallet_id"])] += int(row["outstanding"])
    for row in tx.fetchall("SELECT d.wallet_id, SUM(p.amount) AS unsettled FROM offline_payments p JOIN devices d "
                           "ON d.device_id = p.payer_device WHERE p.in_budget = 1 "
                           "AND p.status NOT IN ('posted', 'honoured', 'rejected') GROUP BY d.wallet_id"):
        expected[reserve_account(row["wallet_id"])] += int(row["unsettled"])
        held[reserve_account(row["wallet_id"])] = int(row["unsettled"])
    reserves = {row["account_id"]: int(row["balance"]) for row in tx.fetchall(
        "SELECT account_id, balance FROM accounts WHERE kind = 'reserve'")}
    for account_id in sorted(set(reserves) | set(expected)):
        balance, want = reserves.get(account_id, 0), expected.get(account_id, 0)
        if balance != want:
            wallet_id = account_id.removeprefix(reserve_account(""))
            problems.append(f"wallet {wallet_id}: offline reserve {balance} fen, but its devices hold "
                            f"{want - held[account_id]} and {held[account_id]} awaits settlement")
    return problems
