"""Anonymous refusals, counted and written as one audit entry per window and cause.

A request refused before anyone is known — 401 without a credential or with an unknown, ended or
expired one, a wrong login, a throttled, rate-limited or turned-away login — used to write one
audit entry each, so anyone could make the gateway write to its store and grow the chain at line
rate. They are now counted in memory, per cause, and every ``audit.refusal_window_seconds`` each
cause seen becomes one entry (action ``refusals.anonymous``, ``reasons = [cause]``) whose result
holds the count, the first and last time, the endpoints and (for logins) the usernames tried, at
most :data:`MAX_USERNAMES` of them by name and the rest as a number.

Refusals of a *known* principal (403, policy refusals) are still written one by one: a principal
is rate-limited and answerable for them.

Nothing counted is lost on an orderly stop: the application's cleanup flushes the tally before the
audit log closes (gateway/app.py), and an entry that cannot be written goes back into the tally for
the next window. A process that is killed (SIGKILL, a crash) loses at most one window of counts.
Each HTTP process keeps its own tally, so with ``[server] processes = N`` a window may have up to N
entries per cause.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import structlog

from gateway import clock
from gateway.audit.chain import AuditEntry, AuditLog

ACTION = "refusals.anonymous"
MAX_USERNAMES = 20  # a flood of random usernames must not make one entry large


@dataclass
class _Count:
    count: int = 0
    first_at: str = ""
    last_at: str = ""
    actions: dict[str, int] = field(default_factory=dict)
    usernames: dict[str, int] = field(default_factory=dict)
    other_usernames: int = 0

    def add(self, action: str, username: str | None, times: int = 1, at: str = "") -> None:
        at = at or clock.now_iso()
        self.count += times
        self.first_at = min(self.first_at or at, at)
        self.last_at = max(self.last_at, at)
        self.actions[action] = self.actions.get(action, 0) + times
        if username is None:
            return
        if username in self.usernames or len(self.usernames) < MAX_USERNAMES:
            self.usernames[username] = self.usernames.get(username, 0) + times
        else:
            self.other_usernames += times

    def merge(self, other: _Count) -> None:
        """Add ``other``'s counts (an entry that could not be written goes back for the next window)."""
        self.count += other.count
        self.first_at = min(self.first_at or other.first_at, other.first_at)
        self.last_at = max(self.last_at, other.last_at)
        for action, times in other.actions.items():
            self.actions[action] = self.actions.get(action, 0) + times
        for username, times in other.usernames.items():
            if username in self.usernames or len(self.usernames) < MAX_USERNAMES:
                self.usernames[username] = self.usernames.get(username, 0) + times
            else:
                self.other_usernames += times
        self.other_usernames += other.other_usernames


class RefusalTally:
    """The anonymous refusals of one HTTP process since the last flush, by cause."""

    def __init__(self, audit: AuditLog, window_seconds: float) -> None:
        self._audit = audit
        self._window = window_seconds
        self._counts: dict[str, _Count] = {}
        self._ticker: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()
        self._log = structlog.get_logger("gateway.audit")

    def count(self, cause: str, action: str, username: str | None = None) -> None:
        """Count one refusal (no I/O: this is what a flood costs). ``cause`` is the problem code,
        ``action`` the endpoint's audited action or name, ``username`` the one a login named."""
        self._counts.setdefault(cause, _Count()).add(action, username)

    @property
    def pending(self) -> int:
        """Refusals counted and not written yet."""
        return sum(count.count for count in self._counts.values())

    def start(self) -> None:
        """Write the counts every window from now on."""
        self._ticker = asyncio.create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self._window)
            try:  # shielded: a stop during a flush lets it finish (close() then waits for it)
                await asyncio.shield(self.flush())
            except Exception as exc:  # never let the ticker die: the counts stay for the next window
                self._log.warning("anonymous refusals not written", error=str(exc))

    async def flush(self) -> int:
        """Write one entry per cause counted since the last flush. Returns the number of entries
        written; a cause whose entry fails stays counted for the next flush."""
        async with self._flush_lock:
            counts, self._counts = self._counts, {}
            unwritten = dict(counts)
            written = 0
            try:
                for cause, count in sorted(counts.items()):
                    entry = AuditEntry(
                        actor="anonymous", role="", action=ACTION, decision="refused", reasons=[cause],
                        result={"count": count.count, "first_at": count.first_at, "last_at": count.last_at,
                                "window_seconds": self._window, "actions": count.actions,
                                "usernames": count.usernames, "other_usernames": count.other_usernames},
                    )
                    try:
                        await self._audit.record(entry)
                    except Exception as exc:
                        self._log.warning("anonymous refusals not written", cause=cause, count=count.count,
                                          error=str(exc))
                        continue
                    del unwritten[cause]
                    written += 1
            finally:  # failed, or cancelled half-way: what was not written is counted again
                for cause, count in unwritten.items():
                    self._counts.setdefault(cause, _Count()).merge(count)
            return written

    async def close(self) -> None:
        """Stop the ticker and write what is counted (called before the audit log closes)."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        await self.flush()
