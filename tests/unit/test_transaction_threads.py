"""TransactionThreads against the library it replaces: the same jobs through ``loop.run_in_executor`` on a
``ThreadPoolExecutor`` and through :class:`gateway.ledger.threads.TransactionThreads` give their callers
the same outcomes — results, exceptions (a GatewayError, a BaseException), parallelism, a cancelled
caller's job not run, a running job finished whatever its caller does."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from gateway.errors import StoreUnavailable
from gateway.ledger.threads import TransactionThreads

Runner = Callable[..., "asyncio.Future[Any]"]


class Interrupted(BaseException):
    """Not an Exception: handed over all the same, as an executor does."""


def runners(size: int) -> list[tuple[str, Runner, Callable[[], None]]]:
    executor = ThreadPoolExecutor(size)
    threads = TransactionThreads(size, "test")

    def via_executor(fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    return [("run_in_executor", via_executor, lambda: executor.shutdown(wait=True)),
            ("TransactionThreads", threads.run, threads.shutdown)]


def fail(exc: BaseException) -> None:
    raise exc


async def outcome(future: asyncio.Future[Any]) -> tuple[str, Any]:
    try:
        return "result", await future
    except BaseException as exc:  # what the caller gets, compared below
        return type(exc).__name__, str(exc)


async def test_callers_get_the_same_results_and_exceptions() -> None:
    seen = {}
    for name, run, stop in runners(4):
        seen[name] = [await outcome(run(lambda a, b: a + b, 2, 3)),
                      await outcome(run(fail, StoreUnavailable("PostgreSQL: gone"))),
                      await outcome(run(fail, Interrupted("stop"))),
                      await outcome(run(threading.current_thread))]
        stop()
    assert seen["TransactionThreads"][:3] == seen["run_in_executor"][:3] == [
        ("result", 5), ("StoreUnavailable", "PostgreSQL: gone"), ("Interrupted", "stop")]
    # Neither runs the job on the event loop's thread.
    assert all(ran[1] is not threading.main_thread() for ran in (seen["run_in_executor"][3],
                                                                    seen["TransactionThreads"][3]))


async def test_size_jobs_run_at_once_and_no_more() -> None:
    for name, run, stop in runners(3):
        assert await at_most_at_once(run, 7) == 3, name
        stop()


async def at_most_at_once(run: Runner, jobs: int) -> int:
    """How many of ``jobs`` blocking jobs were running at once, at most."""
    inside, most, lock, release = 0, 0, threading.Lock(), threading.Event()

    def blocking() -> None:
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        release.wait(5)
        with lock:
            inside -= 1

    futures = [run(blocking) for _ in range(jobs)]
    await asyncio.sleep(0.2)
    release.set()
    await asyncio.gather(*futures)
    return most


@pytest.mark.parametrize("which", ["run_in_executor", "TransactionThreads"])
async def test_a_cancelled_caller_s_job_is_not_started_and_a_running_one_finishes(which: str) -> None:
    both = runners(1)
    name, run, _ = next(r for r in both if r[0] == which)
    started, finished, release = [], [], threading.Event()

    def job(n: int) -> int:
        started.append(n)
        release.wait(5)
        finished.append(n)
        return n

    running = run(job, 1)
    await asyncio.sleep(0.1)  # the one thread is busy with job 1
    queued = run(job, 2)
    running.cancel()
    queued.cancel()
    await asyncio.sleep(0.05)  # (an executor learns of the cancellation on the loop's next turn)
    release.set()
    third = await run(job, 3)
    assert third == 3 and started == [1, 3] and finished == [1, 3], name
    assert running.cancelled() and queued.cancelled()
    for _, _, stop in both:
        stop()


async def test_shut_down_threads_take_no_more_jobs() -> None:
    threads = TransactionThreads(2, "shut-down")
    assert await threads.run(lambda: 7) == 7
    threads.shutdown()
    assert not any(t.name.startswith("shut-down_") for t in threading.enumerate())
    with pytest.raises(RuntimeError):
        threads.run(lambda: 8)
