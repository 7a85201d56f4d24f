"""What a durable SQLite commit costs on this disk: the floor under a signature's audit entry.

    .venv/bin/python bench/sqlite_commit.py [--commits 2000] [--dir var]

One connection set up as the gateway's store sets up its own (WAL, ``busy_timeout``), one transaction
after another, each shaped like a raw signature's audit write: ``BEGIN IMMEDIATE``, the chain head read,
one ~400-byte row inserted, ``COMMIT``; a 0.5 ms pause between them, as at one client. Measured with
``synchronous = FULL`` (what the gateway runs: the WAL is fsynced at every commit, so an answered
signature's entry survives a power cut) and ``NORMAL`` (fsync at checkpoints only), and a bare
``fdatasync`` of a file with nothing to write. The difference between FULL and NORMAL is what
durability costs each answer at one client.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path


def commits(path: Path, synchronous: str, count: int) -> list[float]:
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute(f"PRAGMA synchronous = {synchronous}")
    connection.execute("CREATE TABLE IF NOT EXISTS entries (seq INTEGER PRIMARY KEY, body TEXT, digest BLOB)")
    times = []
    for _ in range(count):
        started = time.perf_counter()
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("SELECT MAX(seq) FROM entries").fetchone()
        connection.execute("INSERT INTO entries (body, digest) VALUES (?, ?)", ("x" * 400, os.urandom(32)))
        connection.execute("COMMIT")
        times.append(time.perf_counter() - started)
        time.sleep(0.0005)
    connection.close()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--commits", type=int, default=2000)
    parser.add_argument("--dir", type=Path, default=Path("var"), help="a directory on the disk to measure")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        path = Path(folder) / "commit.db"
        print("| commit | p50 ms | p90 ms |")
        print("|---|---|---|")
        for synchronous in ("FULL", "NORMAL"):
            times = sorted(commits(path, synchronous, args.commits))
            print(f"| synchronous = {synchronous} | {1000 * statistics.median(times):.3f} | "
                  f"{1000 * times[int(0.9 * len(times))]:.3f} |")
        descriptor = os.open(path, os.O_RDWR)
        try:
            syncs = []
            for _ in range(args.commits):
                started = time.perf_counter()
                os.fdatasync(descriptor)
                syncs.append(time.perf_counter() - started)
        finally:
            os.close(descriptor)
        syncs.sort()
        print(f"| bare fdatasync, nothing to write | {1000 * statistics.median(syncs):.3f} | "
              f"{1000 * syncs[int(0.9 * len(syncs))]:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
