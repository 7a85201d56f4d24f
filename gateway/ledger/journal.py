"""The double-entry journal: balanced postings, materialised balances, and the invariant check.

Every movement of money is one journal entry whose postings sum to zero. Wallet and reserve
accounts never go negative (checked before writing, and by a CHECK constraint as a backstop);
the bank's issuance account is the counterpart of cash-in and cash-out and runs negative by the
amount of e-CNY in circulation.

**The bank's own accounts** (:data:`HOUSE_ACCOUNTS`) are on one side of every cash movement and every
honour from suspense. A balance row that each of those updates would be a lock wider than a wallet:
on PostgreSQL every cash movement of every instance would wait for the one before it to commit. There
a posting to a bank account adds its amount to ``house_pending`` instead (an insert: no lock), and
:func:`fold_house` moves what has committed into ``accounts.balance`` every ``[store]
house_fold_seconds``; a bank account's balance is its row plus what is pending (:func:`balance`), and
:func:`check_invariants` compares that sum with its postings. SQLite has one writer: it updates the
row at once and ``house_pending`` stays empty.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from gateway import clock
from gateway.errors import GatewayError
from gateway.ledger.store import Tx

ISSUANCE = "bank:issuance"
SUSPENSE = "bank:suspense"
HOUSE_ACCOUNTS = frozenset((ISSUANCE, SUSPENSE))
"""The bank's own accounts, whose postings on PostgreSQL are pending until folded (see the module's docstring)."""
COUNTED_MOVES = frozenset(("cash_in", "cash_out", "device_load"))
"""Entry kinds whose daily total per wallet the approval thresholds read (``wallet_moves``, :func:`moved_today`)."""
CHINA_STANDARD_TIME = timezone(timedelta(hours=8), "CST")


class LedgerInvariantBroken(GatewayError):
    """A posting would break double entry (unbalanced entry, negative wallet): a bug, never user input."""

    code = "ledger-invariant"
    title = "Ledger invariant broken"


def wallet_account(wallet_id: str) -> str:
    return f"w:{wallet_id}"


def reserve_account(wallet_id: str) -> str:
    return f"r:{wallet_id}"


def business_day(moment: datetime | None = None) -> str:
    """The business day (YYYY-MM-DD) in China Standard Time."""
    return (moment or clock.now()).astimezone(CHINA_STANDARD_TIME).strftime("%Y-%m-%d")


def open_accounts(tx: Tx, wallet_id: str) -> None:
    tx.execute(
        "INSERT INTO accounts (account_id, wallet_id, kind, balance) VALUES (?, ?, 'wallet', 0)",
        (wallet_account(wallet_id), wallet_id),
    )
    tx.execute(
        "INSERT INTO accounts (account_id, wallet_id, kind, balance) VALUES (?, ?, 'reserve', 0)",
        (reserve_account(wallet_id), wallet_id),
    )


def balance(tx: Tx, account_id: str) -> int:
    """An account's balance (a bank account's: its row plus what is pending, see the module's docstring)."""
    if account_id in HOUSE_ACCOUNTS:
        row = tx.fetchone("SELECT a.balance + COALESCE((SELECT SUM(h.amount) FROM house_pending h "
                          "WHERE h.account_id = a.account_id), 0) AS balance FROM accounts a WHERE a.account_id = ?",
                          (account_id,))
    else:
        row = tx.fetchone("SELECT balance FROM accounts WHERE account_id = ?", (account_id,))
    return 0 if row is None else int(row["balance"])


def fold_house(tx: Tx) -> int:
    """Move the committed pending amounts of the bank's accounts into their balance rows, in one statement;
    returns how many were folded. Folds running at once in several processes never count one twice: each
    pending row is deleted by one of them (the others skip it), in the transaction that adds it."""
    if tx.dialect != "postgresql":
        return 0  # SQLite updates the rows at once: nothing is ever pending
    row = tx.fetchone(
        "WITH folded AS (DELETE FROM house_pending RETURNING account_id, amount), "
        "sums AS (SELECT account_id, SUM(amount) AS amount, COUNT(*) AS n FROM folded GROUP BY account_id), "
        "moved AS (UPDATE accounts SET balance = accounts.balance + sums.amount FROM sums "
        "WHERE accounts.account_id = sums.account_id RETURNING sums.n) "
        "SELECT COALESCE(SUM(n), 0) AS n FROM moved")
    return 0 if row is None else int(row["n"])


def post(tx: Tx, kind: str, reference: str, legs: Sequence[tuple[str, int]], actor: str, memo: str = "") -> str:
    """Write one balanced journal entry and move the balances. Returns the entry id.

    Raises:
        LedgerInvariantBroken: the legs do not sum to zero, a leg is zero, or a wallet or reserve
            account would go negative (callers check funds first; this is the backstop).
    """
    if sum(amount for _, amount in legs) != 0 or any(amount == 0 for _, amount in legs) or len(legs) < 2:
        raise LedgerInvariantBroken(f"unbalanced entry for {reference}: {list(legs)}")
    entry_id = secrets.token_hex(12)
    day = business_day()
    tx.queue(
        "INSERT INTO journal (entry_id, kind, reference, memo, actor, business_day, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (entry_id, kind, reference, memo, actor, day, clock.now_iso()),
    )
    for account_id, amount in legs:
        if kind in COUNTED_MOVES and account_id.startswith("w:"):
            tx.queue("INSERT INTO wallet_moves (wallet_id, business_day, kind, amount) VALUES (?, ?, ?, ?) "
                     "ON CONFLICT (wallet_id, business_day, kind) DO UPDATE SET amount = wallet_moves.amount + "
                     "excluded.amount", (account_id[2:], day, kind, amount))
        if account_id in HOUSE_ACCOUNTS and tx.dialect == "postgresql":  # pending: no row lock (module docstring)
            tx.queue("INSERT INTO house_pending (account_id, amount) VALUES (?, ?)", (account_id, amount))
            tx.queue("INSERT INTO postings (entry_id, account_id, amount) VALUES (?, ?, ?)",
                     (entry_id, account_id, amount))
            continue
        changed = tx.execute(
            "UPDATE accounts SET balance = balance + ? WHERE account_id = ? "
            "AND (kind NOT IN ('wallet', 'reserve') OR balance + ? >= 0)",
            (amount, account_id, amount),
        )
        if changed != 1:
            raise LedgerInvariantBroken(f"account {account_id} is unknown or would go negative")
        tx.queue(
            "INSERT INTO postings (entry_id, account_id, amount) VALUES (?, ?, ?)", (entry_id, account_id, amount)
        )
    return entry_id


def add_spend(tx: Tx, wallet_id: str, amount: int, day: str) -> None:
    tx.queue(
        "INSERT INTO wallet_spend (wallet_id, business_day, amount) VALUES (?, ?, ?) "
        "ON CONFLICT (wallet_id, business_day) DO UPDATE SET amount = wallet_spend.amount + excluded.amount",
        (wallet_id, day, amount),
    )


def spent(tx: Tx, wallet_id: str, day: str) -> tuple[int, int]:
    """(spent on ``day``, spent in ``day``'s calendar year), in fen — one indexed range read."""
    row = tx.fetchone(
        "SELECT COALESCE(SUM(CASE WHEN business_day = ? THEN amount ELSE 0 END), 0) AS today, "
        "COALESCE(SUM(amount), 0) AS year FROM wallet_spend "
        "WHERE wallet_id = ? AND business_day >= ? AND business_day <= ?",
        (day, wallet_id, day[:4] + "-01-01", day[:4] + "-12-31"),
    )
    return (int(row["today"]), int(row["year"])) if row else (0, 0)


def moved_today(tx: Tx, wallet_id: str, kind: str, day: str) -> int:
    """What entries of ``kind`` (``cash_in``, ``cash_out``, ``device_load``) moved on or off
    ``wallet_id``'s wallet account on business ``day``, in fen (a positive sum either way): one row of
    ``wallet_moves``, which :func:`post` adds to (and :func:`check_invariants` compares with the postings)."""
    row = tx.fetchone("SELECT amount FROM wallet_moves WHERE wallet_id = ? AND business_day = ? AND kind = ?",
                      (wallet_id, day, kind))
    return abs(int(row["amount"])) if row else 0


def check_invariants(tx: Tx) -> list[str]:
    """Every entry balances; every balance (a bank account's: its row plus what is pending) equals the sum of
    its postings; no wallet or reserve is negative; every pending amount belongs to a bank account.

    Returns:
        Human-readable problems; empty when the ledger is sound.
    """
    problems = []
    for row in tx.fetchall(
        "SELECT entry_id, SUM(amount) AS total FROM postings GROUP BY entry_id HAVING SUM(amount) <> 0"
    ):
        problems.append(f"entry {row['entry_id']} does not balance (sum {row['total']})")
    rows = tx.fetchall(
        "SELECT a.account_id, a.balance + COALESCE(h.pending, 0) AS balance, COALESCE(SUM(p.amount), 0) AS posted "
        "FROM accounts a "
        "LEFT JOIN (SELECT account_id, SUM(amount) AS pending FROM house_pending GROUP BY account_id) h "
        "ON h.account_id = a.account_id LEFT JOIN postings p ON p.account_id = a.account_id "
        "GROUP BY a.account_id, a.balance, h.pending"
    )
    for row in rows:
        if int(row["balance"]) != int(row["posted"]):
            problems.append(f"account {row['account_id']} balance {row['balance']} != postings {row['posted']}")
    for row in tx.fetchall(
        "SELECT account_id, balance FROM accounts WHERE kind IN ('wallet', 'reserve') AND balance < 0"
    ):
        problems.append(f"account {row['account_id']} is negative ({row['balance']})")
    kinds = ", ".join(f"'{kind}'" for kind in sorted(COUNTED_MOVES))
    for row in tx.fetchall(
        "SELECT COALESCE(m.wallet_id, x.wallet_id) AS wallet_id, COALESCE(m.business_day, x.business_day) AS day, "
        "COALESCE(m.kind, x.kind) AS kind, m.amount AS counted, x.amount AS posted FROM wallet_moves m "
        "FULL OUTER JOIN (SELECT substr(p.account_id, 3) AS wallet_id, j.business_day, j.kind, SUM(p.amount) AS amount "
        "FROM postings p JOIN journal j ON j.entry_id = p.entry_id "
        f"WHERE j.kind IN ({kinds}) AND p.account_id LIKE 'w:%' "
        "GROUP BY substr(p.account_id, 3), j.business_day, j.kind) x "
        "ON x.wallet_id = m.wallet_id AND x.business_day = m.business_day AND x.kind = m.kind "
        "WHERE m.amount IS NULL OR x.amount IS NULL OR m.amount <> x.amount"
    ):
        problems.append(f"wallet {row['wallet_id']} {row['kind']} on {row['day']}: counted {row['counted']} "
                        f"!= postings {row['posted']}")
    for row in tx.fetchall("SELECT DISTINCT account_id FROM house_pending"):
        if row["account_id"] not in HOUSE_ACCOUNTS:
            problems.append(f"pending amounts for {row['account_id']}, which is not a bank account")
    total = tx.fetchone("SELECT (SELECT COALESCE(SUM(balance), 0) FROM accounts) + "
                        "(SELECT COALESCE(SUM(amount), 0) FROM house_pending) AS total")
    if total is not None and int(total["total"]) != 0:
        problems.append(f"balances do not sum to zero ({total['total']})")
    return problems


def epoch_millis(moment: datetime | None = None) -> int:
    return int((moment or datetime.now(UTC)).timestamp() * 1000)


def row_dict(row: Any) -> dict[str, Any]:
    return {key: row[key] for key in row.keys()}
