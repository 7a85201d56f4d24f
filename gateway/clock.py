"""Time as the gateway records it: UTC, ISO 8601 with microseconds and a ``Z``.

Strings of this one format sort in time order, so the store can compare them as text.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


def now() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    # isoformat() is C code and several times faster than strftime; with timespec="microseconds"
    # it always writes the fraction, and a UTC moment always ends in "+00:00".
    return moment.astimezone(UTC).isoformat(timespec="microseconds")[:-6] + "Z"


def now_iso() -> str:
    return iso(now())


def after(seconds: float) -> str:
    """The ISO time ``seconds`` from now."""
    return iso(now() + timedelta(seconds=seconds))
