"""The anonymous refusal tally (gateway/audit/refusals.py) as pure logic, with a stand-in for the
audit log that can fail: no counted refusal is lost when an entry cannot be written or when the
gateway stops in the middle of a flush, and a flood of usernames keeps an entry small. The real
audit log and store are exercised in tests/security/test_sessions_and_floods.py."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from gateway.audit.chain import AuditEntry, AuditLog
from gateway.audit.refusals import MAX_USERNAMES, RefusalTally
from gateway.errors import StoreUnavailable


class FlakyAuditLog:
    """Records entries; the first ``failures`` calls raise StoreUnavailable; each call may be slowed."""

    def __init__(self, failures: int = 0, delay: float = 0.0) -> None:
        self.entries: list[AuditEntry] = []
        self.failures = failures
        self.delay = delay

    async def record(self, entry: AuditEntry) -> int:
        await asyncio.sleep(self.delay)
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("the store is down")
        self.entries.append(entry)
        return len(self.entries)


def tally(log: FlakyAuditLog, window: float = 60.0) -> RefusalTally:
    return RefusalTally(cast(AuditLog, log), window)


def counts(log: FlakyAuditLog) -> dict[str, int]:
    totals: dict[str, int] = {}
    for entry in log.entries:
        totals[entry.reasons[0]] = totals.get(entry.reasons[0], 0) + int(entry.result["count"])
    return totals


async def test_counts_survive_a_store_outage() -> None:
    """Refusals counted while the store is down vanish instead of being written later."""
    log = FlakyAuditLog(failures=1)
    refusals = tally(log)
    for _ in range(3):
        refusals.count("unauthenticated", "GET /v1/keys")
    refusals.count("bad-credentials", "sessions.create", "alice")
    assert await refusals.flush() == 1  # "bad-credentials" (written first) failed; "unauthenticated" went
    assert refusals.pending == 1 and counts(log) == {"unauthenticated": 3}
    refusals.count("unauthenticated", "GET /v1/keys")
    assert await refusals.flush() == 2
    assert counts(log) == {"unauthenticated": 4, "bad-credentials": 1}
    assert refusals.pending == 0


async def test_stopping_during_a_flush_loses_nothing() -> None:
    """Refusals counted in the last window vanish when the gateway stops during a periodic flush."""
    log = FlakyAuditLog(delay=0.05)
    refusals = tally(log, window=0.01)
    refusals.start()
    for i in range(50):
        refusals.count("unauthenticated", "GET /v1/keys")
        refusals.count("login-busy", "sessions.create", f"user-{i}")
        await asyncio.sleep(0.002)
    await refusals.close()  # the ticker is most likely inside a flush now
    assert counts(log) == {"unauthenticated": 50, "login-busy": 50}


async def test_a_flood_of_usernames_keeps_an_entry_small() -> None:
    """A flood of random usernames makes one audit entry as large as the flood."""
    log = FlakyAuditLog()
    refusals = tally(log)
    for i in range(1_000):
        refusals.count("bad-credentials", "sessions.create", f"guess-{i}")
    await refusals.flush()
    (entry,) = log.entries
    result: dict[str, Any] = entry.result
    assert result["count"] == 1_000 and result["actions"] == {"sessions.create": 1_000}
    assert len(result["usernames"]) == MAX_USERNAMES
    assert sum(result["usernames"].values()) + result["other_usernames"] == 1_000
    assert (entry.actor, entry.action, entry.decision) == ("anonymous", "refusals.anonymous", "refused")
