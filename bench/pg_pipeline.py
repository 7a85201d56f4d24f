"""The client CPU of one PostgreSQL transaction: psycopg's pipeline (cursors) against ``PostgresTx`` (libpq).

The same transaction as a transfer's step 1, on one connection, in one thread, one after another:
``BEGIN`` and a guard queued, one statement read, three statements queued, ``COMMIT`` — two round
trips each way. What is measured is the CPU this process spends per transaction (the server's is not
counted), and the wall time per transaction, in one run::

    .venv/bin/python bench/pg_pipeline.py --transactions 5000

``psycopg pipeline`` is how ``PostgresTx`` sent its statements until session 9 (``connection.pipeline()``,
a cursor per statement); ``PostgresTx`` is how it does now (``psycopg.pq`` and psycopg's C
``Transformer``, statements prepared from their second use).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from psycopg.rows import dict_row

from gateway.ledger.postgres import PostgresTx, StoreConnection
from tests.pg import PostgresServer

SCHEMA = ("CREATE TABLE posted (id BIGSERIAL PRIMARY KEY, wallet TEXT NOT NULL, amount BIGINT NOT NULL)",
          "CREATE TABLE staged (id BIGSERIAL PRIMARY KEY, body TEXT NOT NULL, digest BYTEA NOT NULL)")
GUARD = "SELECT 1 WHERE ?::text IS NOT NULL"
POST = "INSERT INTO posted (wallet, amount) VALUES (?, ?) RETURNING id, wallet, amount"
STAGE = "INSERT INTO staged (body, digest) VALUES (?, ?)"
BODY = '{"action": "transfers.create", "amount_fen": 100, "from": "w_payer", "to": "w_payee"}'


def cursor_transaction(connection: psycopg.Connection[dict[str, Any]]) -> Any:
    def adapt(sql: str) -> str:
        return sql.replace("?", "%s")

    with connection.pipeline() as pipeline:
        connection.execute("BEGIN ISOLATION LEVEL READ COMMITTED READ WRITE", ())
        connection.execute(adapt(GUARD), ("key",))
        cursor = connection.cursor()
        cursor.execute(adapt(POST), ("w_payer", 100))
        pipeline.sync()
        row = cursor.fetchone()
        for _ in range(3):
            connection.execute(adapt(STAGE), (BODY, b"\x01" * 32))
        connection.execute("COMMIT", ())
    return row


def libpq_transaction(connection: StoreConnection) -> Any:
    tx = PostgresTx(connection, "BEGIN ISOLATION LEVEL READ COMMITTED READ WRITE")
    try:
        tx.queue(GUARD, ("key",))
        row = tx.fetchone(POST, ("w_payer", 100))
        for _ in range(3):
            tx.queue(STAGE, (BODY, b"\x01" * 32))
        tx.commit()
    finally:
        tx.leave_pipeline()
    return row


def measure(transaction: Callable[[Any], Any], connection: Any, count: int) -> dict[str, float]:
    for _ in range(min(200, count)):
        transaction(connection)
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    cpu_start, wall_start = usage.ru_utime + usage.ru_stime, time.perf_counter()
    for _ in range(count):
        transaction(connection)
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    cpu = usage.ru_utime + usage.ru_stime - cpu_start
    return {"cpu_ms_per_transaction": 1000 * cpu / count,
            "wall_ms_per_transaction": 1000 * (time.perf_counter() - wall_start) / count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transactions", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the medians are reported")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    server = PostgresServer().start()
    try:
        dsn = server.create_database()
        with psycopg.connect(dsn, autocommit=True) as setup:
            for statement in SCHEMA:
                setup.execute(statement)
        cursors = psycopg.connect(dsn, autocommit=True, row_factory=dict_row)
        libpq = StoreConnection.connect(dsn, autocommit=True, row_factory=dict_row)
        assert cursor_transaction(cursors).keys() == libpq_transaction(libpq).keys()
        runs: dict[str, list[dict[str, float]]] = {"psycopg pipeline": [], "PostgresTx": []}
        for _ in range(args.rounds):
            runs["psycopg pipeline"].append(measure(cursor_transaction, cursors, args.transactions))
            runs["PostgresTx"].append(measure(libpq_transaction, libpq, args.transactions))
        result: dict[str, Any] = {"transactions": args.transactions, "rounds": args.rounds,
                                  
                                  "psycopg": psycopg.__version__, "psycopg_impl": psycopg.pq.__impl__}
        for name, measured in runs.items():
            for figure in ("cpu_ms_per_transaction", "wall_ms_per_transaction"):
                values = sorted(run[figure] for run in measured)
                result.setdefault(name, {})[figure] = values[len(values) // 2]
            print(f"{name:18} CPU {result[name]['cpu_ms_per_transaction']:.3f} ms/transaction   "
                  f"wall {result[name]['wall_ms_per_transaction']:.3f} ms/transaction")
        ratio = result["psycopg pipeline"]["cpu_ms_per_transaction"] / result["PostgresTx"]["cpu_ms_per_transaction"]
        result["cpu_ratio"] = ratio
        print(f"client CPU per transaction: psycopg pipeline / PostgresTx = {ratio:.2f}x")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        cursors.close()
        libpq.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
