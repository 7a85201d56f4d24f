"""Where PostgreSQL's own CPU goes in a transfer: every statement the server ran, per transfer.

    .venv/bin/python bench/pg_statements.py [--concurrency 1] [--duration 6] [--top 25] [--json FILE]

Starts tests/pg.py's throw-away cluster with ``pg_stat_statements`` loaded (``track = all``, so the
statements a server-side function runs are listed too, nested under it, and ``track_planning``), runs
``bench/transfers.py``'s spread load against a gateway on it, then prints the statements by total
execution time, each per transfer: the planning and execution time, the calls per transfer and the time
per call. Nested statements (marked ``·``) are counted inside the top-level statement that ran them
(``T``) as well, so the column does not add up to the total.

At one client (the default) the times are the statements' own, without waits for locks or for a CPU
taken by the gateway; at 16 they include both.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

import tests.pg  # noqa: E402
from common import Postgres, exit_on_sigterm  # noqa: E402
from transfers import run_store  # noqa: E402

STATEMENTS = """
SELECT toplevel, calls, total_plan_time, total_exec_time,
       left(regexp_replace(query, '\\s+', ' ', 'g'), 140) AS query
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
ORDER BY total_exec_time DESC
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=6)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    exit_on_sigterm()
    tests.pg.SERVER_OPTIONS += (" -c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all"
                                " -c pg_stat_statements.track_planning=on -c pg_stat_statements.max=5000")
    postgres = Postgres()
    databases: list[str] = []
    create = postgres.new_database

    def remembered() -> str:
        databases.append(create())
        return databases[-1]

    postgres.new_database = remembered  # type: ignore[method-assign]
    try:
        (result,) = run_store("postgresql", ["spread"], duration=args.duration, concurrency=args.concurrency,
                              payers=64, pin=False, postgres=postgres)
        transfers = int(result["requests"])
        with psycopg.connect(databases[0], autocommit=True) as connection:
            connection.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            rows = connection.execute(STATEMENTS).fetchall()
    finally:
        postgres.stop()
    statements: list[dict[str, Any]] = [
        {"toplevel": bool(top), "calls_per_transfer": calls / transfers, "plan_us": 1000 * plan / transfers,
         "exec_us": 1000 * total / transfers, "us_per_call": 1000 * total / calls, "query": query}
        for top, calls, plan, total, query in rows if calls]
    print(f"{result['ok_rate']:.0f} transfers/s at {args.concurrency} client(s), {transfers} transfers; "
          f"PostgreSQL's CPU {result.get('store_cpu_ms_per_request') or 0:.2f} ms per transfer "
          f"(its processes, from /proc); money ok={result['money_consistent']}, "
          f"ledger check rc={result.get('ledger_check_rc')}, audit verify rc={result.get('audit_verify_rc')}")
    print("| | plan µs/transfer | exec µs/transfer | calls/transfer | µs/call | statement |")
    print("|---|---|---|---|---|---|")
    for s in statements[: args.top]:
        query = s["query"].replace("|", "\\|")
        print(f"| {'T' if s['toplevel'] else '·'} | {s['plan_us']:.1f} | {s['exec_us']:.1f} | "
              f"{s['calls_per_transfer']:.2f} | {s['us_per_call']:.1f} | `{query}` |")
    if args.json:
        args.json.write_text(json.dumps({"result": result, "statements": statements}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
