"""Set-at-a-time SQL for reconciliation: multi-row INSERTs, chunked ``IN`` lookups and batch postings.

A sync of a few thousand payments (and a benchmark of 100,000) must not pay one statement per row.
:class:`gateway.ledger.store.Tx` has no ``executemany``; a multi-row ``VALUES`` list does the same
work on both engines (SQLite allows 32,766 parameters a statement, PostgreSQL 65,535).

:func:`post_offline` is the batch form of :func:`gateway.ledger.journal.post`, with the same
invariants: every entry balances, and wallet and reserve accounts never go negative (the account
UPDATE carries the guard, and a refused guard rolls the whole transaction back).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from itertools import chain
from typing import Any, NamedTuple

from gateway import clock
from gateway.ledger.journal import LedgerInvariantBroken, business_day
from gateway.ledger.store import Row, Tx

MAX_PARAMETERS = 30_000
CHUNK = 500


def chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def insert_many(tx: Tx, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                suffix: str = "") -> None:
    """INSERT ``rows`` (tuples in ``columns`` order) with as few statements as the parameter limit allows."""
    if not rows:
        return
    per_row = "(" + ", ".join("?" for _ in columns) + ")"
    size = max(1, min(CHUNK, MAX_PARAMETERS // len(columns)))
    head = f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
    for part in chunks(rows, size):
        tx.execute(head + ", ".join([per_row] * len(part)) + suffix, list(chain.from_iterable(part)))


def select_in(tx: Tx, sql: str, values: Sequence[Any], extra: Sequence[Any] = ()) -> list[Row]:
    """Run ``sql`` (with one ``IN ({in})`` placeholder list, after any ``extra`` parameters) over ``values``
    in chunks, and return every row."""
    rows: list[Row] = []
    for part in chunks(list(values), CHUNK):
        rows += tx.fetchall(sql.format(**{"in": ", ".join("?" for _ in part)}), [*extra, *part])
    return rows


def update_in(tx: Tx, sql: str, keys: Sequence[Any], values: Sequence[Any] = ()) -> int:
    """Run an UPDATE whose WHERE has one ``IN ({in})`` list over ``keys``, chunked; ``values`` are the SET
    parameters (the same for every row). Returns the rows changed."""
    changed = 0
    for part in chunks(list(keys), CHUNK):
        changed += tx.execute(sql.format(**{"in": ", ".join("?" for _ in part)}), [*values, *part])
    return changed


class Transfer(NamedTuple):
    """One offline payment to post: ``debit`` loses ``amount``, ``credit`` gains it."""

    entry_id: str
    reference: str
    debit: str
    credit: str
    amount: int
    memo: str


def post_offline(tx: Tx, kind: str, transfers: Sequence[Transfer], actor: str) -> None:
    """Post one balanced two-leg journal entry per transfer, moving the balances once per account.

    Raises:
        LedgerInvariantBroken: an amount is not positive, or an account is unknown or would go negative.
    """
    if not transfers:
        return
    if any(t.amount <= 0 for t in transfers):
        raise LedgerInvariantBroken("offline transfers must move a positive amount")
    day, now = business_day(), clock.now_iso()
    transfers = sorted(transfers)  # in entry id order: index inserts close together
    insert_many(tx, "journal", ("entry_id", "kind", "reference", "memo", "actor", "business_day", "created_at"),
                [(t.entry_id, kind, t.reference, t.memo, actor, day, now) for t in transfers])
    legs: list[tuple[str, str, int]] = []
    deltas: dict[str, int] = defaultdict(int)
    for t in transfers:
        legs.append((t.entry_id, t.debit, -t.amount))
        legs.append((t.entry_id, t.credit, t.amount))
        deltas[t.debit] -= t.amount
        deltas[t.credit] += t.amount
    insert_many(tx, "postings", ("entry_id", "account_id", "amount"), legs)
    for account_id in sorted(deltas):
        delta = deltas[account_id]
        if delta == 0:
            continue
        changed = tx.execute(
            "UPDATE accounts SET balance = balance + ? WHERE account_id = ? "
            "AND (kind NOT IN ('wallet', 'reserve') OR balance + ? >= 0)",
            (delta, account_id, delta),
        )
        if changed != 1:
            raise LedgerInvariantBroken(f"account {account_id} is unknown or would go negative")
