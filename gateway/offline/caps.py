"""The payee's tier balance cap on offline credits.

An online transfer is refused when it would take its payee's wallet above its tier's balance cap
(:func:`gateway.policy.limits.check_receipt`). An offline payment cannot be refused — the payee's
device has taken it already — so reconciliation *holds* one that would take its payee's wallet above
the cap (discrepancy ``payee-balance-cap``) instead of posting it: never silently over the cap, never
lost. A supervisor then posts it once the wallet has room (after a cash-out or a tier upgrade),
honours it under the same check, or rejects it (the value goes back to the payer).

Every crediting path — a matched payment in :mod:`gateway.offline.rules`, a supervisor's ``post`` or
``honour`` in :mod:`gateway.offline.devices` — counts the credits it has made so far in the same
transaction with :class:`PayeeCredits`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from gateway.ledger.store import Tx
from gateway.offline.bulk import select_in
from gateway.policy.limits import DEFAULT_TIERS, TierLimits, check_receipt

WalletLimits = Callable[[int], TierLimits]
"""The limits of a wallet tier (``Settings.wallets.limits``)."""


def default_limits(tier: int) -> TierLimits:
    """docs/spec.md §7's defaults (an unknown tier: no limit), for callers without gateway settings (the harness)."""
    return DEFAULT_TIERS.get(tier, TierLimits(None, None, None, None))


def wallet_limits(settings: Any) -> WalletLimits:
    """The gateway settings' tier limits (``[wallets.tiers]``), or the defaults when there are none."""
    wallets = getattr(settings, "wallets", None)
    limits = getattr(wallets, "limits", None)
    return limits if callable(limits) else default_limits


class PayeeCredits:
    """Room under the balance cap of payee wallets, inside one transaction (the wallets must be locked).

    Reads each wallet's tier and balance once (:meth:`read`, or on first use), then counts the credits
    granted by :meth:`take`.
    """

    def __init__(self, tx: Tx, limits: WalletLimits) -> None:
        self.tx = tx
        self.limits = limits
        self.balances: dict[str, int] = {}
        self.caps: dict[str, int | None] = {}

    def read(self, wallet_ids: Iterable[str]) -> None:
        """Read the tier and balance of these wallets (those read already keep their running balance)."""
        wanted = sorted({wallet_id for wallet_id in wallet_ids if wallet_id not in self.balances})
        tiers: dict[int, int | None] = {}
        for row in select_in(self.tx, "SELECT w.wallet_id, w.tier, a.balance FROM wallets w JOIN accounts a "
                                      "ON a.account_id = 'w:' || w.wallet_id WHERE w.wallet_id IN ({in})", wanted):
            tier = int(row["tier"])
            if tier not in tiers:
                tiers[tier] = self.limits(tier).balance_cap
            self.balances[row["wallet_id"]] = int(row["balance"])
            self.caps[row["wallet_id"]] = tiers[tier]

    def cap(self, wallet_id: str) -> int | None:
        """The wallet's balance cap (None: none)."""
        if wallet_id not in self.caps:
            self.read([wallet_id])
        return self.caps[wallet_id]

    def balance(self, wallet_id: str) -> int:
        """The wallet's balance with the credits taken so far."""
        if wallet_id not in self.balances:
            self.read([wallet_id])
        return self.balances[wallet_id]

    def take(self, wallet_id: str, amount: int) -> bool:
        """Count a credit of ``amount`` to the wallet if it stays within its tier's cap; False (nothing
        counted) if it would go above it."""
        cap, balance = self.cap(wallet_id), self.balance(wallet_id)
        if not check_receipt(TierLimits(cap, None, None, None), amount, balance).allowed:
            return False
        self.balances[wallet_id] = balance + amount
        return True
