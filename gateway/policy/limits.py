"""Wallet tier limits (docs/spec.md §7) as pure functions: figures in, a Decision out.

No I/O here: the ledger reads the figures inside its transaction, calls :func:`check_payment` /
:func:`check_receipt`, and writes only if the decision allows it — all under one lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TierLimits:
    """Limits of one tier in fen; None means no limit."""

    balance_cap: int | None
    single: int | None
    daily: int | None
    annual: int | None


#: docs/spec.md §7 defaults (fen). Tier 1 has no limits.
DEFAULT_TIERS: dict[int, TierLimits] = {
    4: TierLimits(balance_cap=1_000_000, single=200_000, daily=500_000, annual=5_000_000),
    3: TierLimits(balance_cap=2_000_000, single=500_000, daily=1_000_000, annual=10_000_000),
    2: TierLimits(balance_cap=50_000_000, single=5_000_000, daily=10_000_000, annual=None),
    1: TierLimits(balance_cap=None, single=None, daily=None, annual=None),
}


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reasons: tuple[str, ...] = field(default_factory=tuple)


def check_payment(limits: TierLimits, amount: int, balance: int, spent_today: int, spent_this_year: int) -> Decision:
    """May a wallet with these figures pay ``amount``? Reasons are stable machine-readable strings."""
    reasons = []
    if amount > balance:
        reasons.append("insufficient-funds")
    if limits.single is not None and amount > limits.single:
        reasons.append("single-limit-exceeded")
    if limits.daily is not None and spent_today + amount > limits.daily:
        reasons.append("daily-limit-exceeded")
    if limits.annual is not None and spent_this_year + amount > limits.annual:
        reasons.append("annual-limit-exceeded")
    return Decision(not reasons, tuple(reasons))


def check_receipt(limits: TierLimits, amount: int, balance: int) -> Decision:
    """May a wallet with this balance receive ``amount``?"""
    if limits.balance_cap is not None and balance + amount > limits.balance_cap:
        return Decision(False, ("balance-cap-exceeded",))
    return Decision(True)


def check_status(status: str, role: str) -> Decision:
    """Frozen or closed wallets neither send nor receive. ``role`` is 'payer' or 'payee'."""
    if status == "active":
        return Decision(True)
    return Decision(False, (f"{role}-wallet-{status}",))
