"""Time as the gateway records it: UTC, ISO 8601 with microseconds and a ``Z``.

Strings of this one format sort in time order, so the store can compare them as text.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


def now() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def now_iso() -> str:
    return iso(now())


def after(seconds: float) -> str:
    """The ISO time ``seconds`` from now."""
    return iso(now() + timedelta(seconds=seconds))
