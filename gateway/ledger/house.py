"""Folding the bank's accounts' pending amounts into their balances, on a schedule (PostgreSQL).

On PostgreSQL a posting to ``bank:issuance`` or ``bank:suspense`` is *pending* (``house_pending``) rather
than an update of the account's row, so that cash movements never wait for one another
(:mod:`gateway.ledger.journal`). :class:`HouseFolder` runs :func:`~gateway.ledger.journal.fold_house`
every ``[store] house_fold_seconds`` so that the pending rows stay few and a balance read stays one
indexed sum. Every process may run one: two folds at once never count an amount twice. Nothing is
lost if none runs — balances include what is pending — only the reads grow slower.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from gateway.ledger import journal
from gateway.ledger.store import Database


class HouseFolder:
    """Folds pending bank-account amounts every ``interval`` seconds, and once more at close."""

    def __init__(self, database: Database, interval: float) -> None:
        self._database = database
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self._log = structlog.get_logger("gateway.ledger")

    async def start(self) -> None:
        """Start folding, on PostgreSQL only (SQLite updates the rows at once: nothing is ever pending)."""
        if await self._database.read(lambda tx: tx.dialect == "postgresql"):
            self._task = asyncio.create_task(self._loop())

    async def fold(self) -> int:
        """Fold what has committed so far; returns how many pending amounts were folded."""
        return await self._database.write(journal.fold_house)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.fold()
            except Exception as exc:  # never let the folder die: the store may come back
                self._log.warning("folding the bank accounts' pending amounts failed", error=str(exc))

    async def close(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        try:
            await self.fold()
        except Exception as exc:  # the store may be gone already; the next start folds it
            self._log.warning("folding the bank accounts' pending amounts at shutdown failed", error=str(exc))
