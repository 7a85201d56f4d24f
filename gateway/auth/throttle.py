"""Failed-login throttling per username, kept in the store so every process and instance shares it.

Each attempt is counted *before* its password is checked, in one write transaction with the check
of the lock, so concurrent guesses cannot slip past the limit while their argon2 checks run. From
the ``max_attempts``-th attempt since the last success the username is locked: further attempts
are refused without their password being checked until the lockout ends, and the first attempt
after it ends locks it again for twice as long (up to a maximum). A success forgets the count.
Unknown usernames are counted like known ones, so the answers tell an attacker nothing.

The price is that anyone can lock a username out for a while by failing its logins on purpose;
the lockout is short at first and bounded, and the audit log counts every refused attempt, by
username, in one entry per window (gateway/audit/refusals.py, docs/threat-model.md).

:class:`PasswordCheckGate` bounds what a flood of logins can cost, whatever the usernames: at most
``slots`` argon2 checks (64 MiB and tens of milliseconds of a core each) run at once in a process,
at most ``waiting`` more logins wait for a slot, and every login beyond that is refused at once —
before the attempt is counted, so a flood writes nothing to the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from gateway import clock
from gateway.errors import LoginBusy, LoginThrottled
from gateway.ledger.store import Tx
from gateway.risk.signals import record_signal_in

MAX_DOUBLINGS = 20  # 2**20 × any sane base exceeds every sane maximum; keeps the arithmetic small


@dataclass(frozen=True)
class LoginThrottle:
    max_attempts: int = 5
    lockout_seconds: int = 30
    lockout_max_seconds: int = 900
    window_seconds: int = 3600

    def lockout(self, attempts: int) -> int:
        """Seconds a username is locked after its ``attempts``-th attempt (0 below the limit)."""
        if attempts < self.max_attempts:
            return 0
        doublings = min(attempts - self.max_attempts, MAX_DOUBLINGS)
        return min(self.lockout_max_seconds, self.lockout_seconds << doublings)

    def attempt_in(self, tx: Tx, username: str, now: datetime) -> None:
        """Count one login attempt for ``username`` (inside a write transaction).

        Raises:
            LoginThrottled: the username is locked; this attempt is not counted.
        """
        tx.lock(f"login:{username}")
        tx.execute("DELETE FROM login_throttle WHERE last_attempt_at < ?",
                   (clock.iso(now - timedelta(seconds=self.window_seconds)),))
        row = tx.fetchone("SELECT attempts, locked_until FROM login_throttle WHERE username = ?", (username,))
        now_text = clock.iso(now)
        if row is not None and row["locked_until"] is not None and row["locked_until"] > now_text:
            wait = math.ceil((datetime.fromisoformat(row["locked_until"]) - now).total_seconds())
            raise LoginThrottled(f"too many login attempts for this username; try again in {wait} s",
                                 retry_after=max(1, wait))
        attempts = 1 if row is None else int(row["attempts"]) + 1
        lockout = self.lockout(attempts)
        if lockout:
            record_signal_in(tx, "login.locked", f"user:{username}", attempts=attempts, lockout_seconds=lockout)
        locked_until = clock.iso(now + timedelta(seconds=lockout)) if lockout else None
        tx.execute(
            "INSERT INTO login_throttle (username, attempts, last_attempt_at, locked_until) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (username) DO UPDATE SET attempts = excluded.attempts, "
            "last_attempt_at = excluded.last_attempt_at, locked_until = excluded.locked_until",
            (username, attempts, now_text, locked_until),
        )

    @staticmethod
    def succeeded_in(tx: Tx, username: str) -> None:
        """Forget the attempts of a username that has just logged in."""
        tx.execute("DELETE FROM login_throttle WHERE username = ?", (username,))


class PasswordCheckGate:
    """At most ``slots`` logins past this gate at once (in this process), ``waiting`` more queued."""

    def __init__(self, slots: int, waiting: int) -> None:
        self.slots = slots
        self.waiting_max = waiting
        self._semaphore = asyncio.Semaphore(slots)
        self._waiting = 0
        self._holding = 0

    @property
    def busy(self) -> int:
        """Logins holding a slot or waiting for one."""
        return self._holding + self._waiting

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Hold a slot for the body (count the attempt, check the password).

        Raises:
            LoginBusy: every slot and every waiting place is taken; nothing has been done.
        """
        if self._semaphore.locked():
            if self._waiting >= self.waiting_max:
                raise LoginBusy("too many logins at once; try again shortly", retry_after=1)
            self._waiting += 1
            try:
                await self._semaphore.acquire()
            finally:
                self._waiting -= 1
        else:
            await self._semaphore.acquire()
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
            self._semaphore.release()
