"""The CPU of handing a blocking job to a thread and its outcome back to the event loop.

    .venv/bin/python bench/handoff.py [--calls 40000] [--in-flight 16] [--threads 8] [--rounds 3]

The same trivial job (it releases the GIL once, as a store call waiting on its socket does) through
``loop.run_in_executor`` on a ``ThreadPoolExecutor`` and through ``gateway.ledger.threads.TransactionThreads``,
``--in-flight`` callers at once on uvloop, rounds alternating. Reported: this process's CPU and the wall
time per call. A PostgreSQL request makes two or three such calls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.ledger.threads import TransactionThreads


def job(n: int) -> int:
    time.sleep(0)  # gives the GIL up once
    return n


async def measure(runner: str, calls: int, in_flight: int, threads: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    if runner == "run_in_executor":
        executor = ThreadPoolExecutor(threads)

        def run(n: int) -> asyncio.Future[int]:
            return loop.run_in_executor(executor, job, n)

        stop = executor.shutdown
    else:
        pool = TransactionThreads(threads, "bench")

        def run(n: int) -> asyncio.Future[int]:
            return pool.run(job, n)

        stop = pool.shutdown

    async def caller(index: int) -> None:
        for _ in range(calls // in_flight):
            assert await run(index) == index

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(in_flight)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    stop()
    done = calls // in_flight * in_flight
    return {"cpu_us": cpu / done * 1e6, "wall_us": wall / done * 1e6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=40_000)
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: list[dict[str, Any]] = []
    for round_ in range(1, args.rounds + 1):
        for runner in ("run_in_executor", "TransactionThreads"):
            figures = uvloop.run(measure(runner, args.calls, args.in_flight, args.threads))
            results.append({"round": round_, "runner": runner, **figures})
            print(f"round {round_}  {runner:18}  CPU {figures['cpu_us']:6.1f} µs/call  "
                  f"wall {figures['wall_us']:6.1f} µs/call", flush=True)
    for runner in ("run_in_executor", "TransactionThreads"):
        mine = [r["cpu_us"] for r in results if r["runner"] == runner]
        print(f"{runner:18} CPU per call, mean of {len(mine)}: {sum(mine) / len(mine):.1f} µs")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
