"""What waking another process costs on this machine: two processes ping-pong one byte over two pipes.

    python3 bench/wakeup.py

Each round trip is one write that wakes the other process and one read that sleeps until it answers.
Printed: the wall time per round trip and the first process's CPU per round trip, with both processes on
one CPU and on two. It tells whether the system calls that wake a PostgreSQL backend, a signer worker or
the HTTP client are dear in themselves on this virtual machine (they are not: BENCHMARKS.md, session 13).
"""

from __future__ import annotations

import os
import resource
import time

N = 20000


def run(cpu_a: int, cpu_b: int) -> tuple[float, float]:
    """(wall µs, parent CPU µs) per round trip, the parent on ``cpu_a`` and the child on ``cpu_b``."""
    to_child, from_parent = os.pipe()[::-1]
    to_parent_read, to_parent = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.sched_setaffinity(0, {cpu_b})
        for _ in range(N):
            os.read(from_parent, 1)
            os.write(to_parent, b"x")
        os._exit(0)
    os.sched_setaffinity(0, {cpu_a})
    started, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(N):
        os.write(to_child, b"x")
        os.read(to_parent_read, 1)
    after, ended = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    os.waitpid(pid, 0)
    cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) / N * 1e6
    return (ended - started) / N * 1e6, cpu


if __name__ == "__main__":
    for label, a, b in (("same CPU", 0, 0), ("cross CPU", 0, 1), ("same CPU", 1, 1), ("cross CPU", 1, 0)):
        wall, cpu = run(a, b)
        print(f"{label} ({a}, {b}): {wall:.1f} µs wall, {cpu:.1f} µs of the first process's CPU per round trip")
