"""The threads that run a store's blocking transactions, and the hand-off between them and the event loop.

``loop.run_in_executor(ThreadPoolExecutor)`` costs two futures per call — a ``concurrent.futures.Future``
with its condition variable, wrapped in an asyncio future by callbacks that copy its state across — and
a PostgreSQL request makes two or three such calls. :class:`TransactionThreads` hands a job over on a
``queue.SimpleQueue`` (C, lock-free for the common case) and hands the outcome back with one
``call_soon_threadsafe``: 43–46 µs of CPU per hand-off against 80–90 µs (``bench/handoff.py``,
BENCHMARKS.md). ``tests/unit/test_transaction_threads.py`` runs the same jobs through both and compares
what the callers get.

What a caller sees is what ``run_in_executor`` gives: the function's result or its exception; a job
whose caller was cancelled before a thread took it is not run; one already running finishes (a
transaction is never cut short by a cancelled caller) and its outcome is dropped.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_STOP = None


class TransactionThreads:
    """``size`` threads taking jobs from one queue, each job's outcome handed back to its event loop."""

    def __init__(self, size: int, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[asyncio.AbstractEventLoop, asyncio.Future[Any],
                                            Callable[..., Any], tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}_{n}", daemon=True) for n in range(size)]
        self._stopped = False
        for thread in self._threads:
            thread.start()

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run ``fn(*args)`` on one of the threads; the future is done with its outcome.

        Raises:
            RuntimeError: the threads were shut down.
        """
        if self._stopped:
            raise RuntimeError("the transaction threads were shut down")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((loop, future, fn, args))
        return future

    def _work(self) -> None:
        while (job := self._jobs.get()) is not _STOP:
            loop, future, fn, args = job
            if future.cancelled():  # its caller gave up before it started: as run_in_executor, do not run it
                continue
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the caller, as an executor does
                _hand_back(loop, _fail, future, exc)
            else:
                _hand_back(loop, _succeed, future, result)

    def shutdown(self) -> None:
        """Let the threads finish the jobs queued so far, then stop and join them."""
        if self._stopped:
            return
        self._stopped = True
        for _ in self._threads:
            self._jobs.put(_STOP)
        for thread in self._threads:
            thread.join()


def _hand_back(loop: asyncio.AbstractEventLoop, settle: Callable[[asyncio.Future[Any], Any], None],
               future: asyncio.Future[Any], outcome: Any) -> None:
    try:
        loop.call_soon_threadsafe(settle, future, outcome)
    except RuntimeError:
        pass  # the loop is closed: nobody waits for the outcome any more


def _succeed(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
