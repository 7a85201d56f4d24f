"""Single-signature latency at low concurrency, two (or more) source trees alternating in one run.

    .venv/bin/python bench/latency.py --trees /tmp/before,. [--rounds 3] [--duration 5]
                                      [--concurrency 1,4,16,64] [--processes 1] [--idempotency] [--json FILE]

Each tree is a checkout of the gateway (its ``gateway/`` package, e.g.
``git archive main | tar -x -C /tmp/before``). For every round and every tree in turn: a fresh gateway
(bench/common.py: own SoftHSM2 token, SQLite, ``ecny-gateway serve`` with that tree first on
``PYTHONPATH``), a 2 s warm-up, then ``wrk`` against ``POST /v1/keys/{id}/sign`` (the same Lua script
as bench/openbao.py; with ``--idempotency`` a fresh Idempotency-Key on every request) at each
concurrency. Alternating trees round by round spreads the load of other
users of a shared machine over both; the report gives the median of the rounds per tree and the
ratio to the first tree, which is what to compare across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import exit_on_sigterm, machine, start_gateway, versions  # noqa: E402
from openbao import GATEWAY_LUA, run_wrk  # noqa: E402

IDEMPOTENT_LUA = """
wrk.method = "POST"
local hexdigits = "0123456789abcdef"
local counter = 0
math.randomseed(os.time())
local prefix = tostring(math.random(1, 2000000000))
local function hex(n)
  local t = {}
  for i = 1, n do local k = math.random(1, 16); t[i] = hexdigits:sub(k, k) end
  return table.concat(t)
end
request = function()
  counter = counter + 1
  local headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer %(api_key)s",
                   ["Idempotency-Key"] = "bench-" .. prefix .. "-" .. counter .. "-" .. hex(8)}
  return wrk.format(nil, "/v1/keys/%(key_id)s/sign", headers, '{"digest":"' .. hex(64) .. '"}')
end
done = function(summary, latency, requests)
  io.write(string.format("PCT %%d %%d %%d\\n", latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def measure(tree: Path, concurrencies: list[int], duration: float, processes: int,
            idempotent: bool = False) -> list[dict[str, Any]]:
    """One gateway built from ``tree``: a wrk row per concurrency."""
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(tree)
    cwd = Path.cwd()
    os.chdir(tree)  # `[server] processes > 1` children run `python -m gateway.cli` from here
    try:
        gateway = start_gateway("sqlite", processes=processes)
    finally:
        os.chdir(cwd)
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    rows = []
    try:
        lua = (IDEMPOTENT_LUA if idempotent else GATEWAY_LUA) % {
            "api_key": gateway.credentials["backend_api_key"], "key_id": gateway.keys["raw-p256"]}
        run_wrk(gateway.url, lua, 4, 2)  # warm-up, not counted
        for connections in concurrencies:
            cpu0, wall0 = gateway.cpu_seconds(), time.monotonic()
            row = run_wrk(gateway.url, lua, connections, duration)
            cpu, wall = gateway.cpu_seconds() - cpu0, time.monotonic() - wall0
            row.update(tree=str(tree), cores=cpu / wall, cpu_ms=1000 * cpu / max(1.0, row["rate"] * wall))
            rows.append(row)
    finally:
        gateway.cleanup()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trees", required=True, help="comma-separated source trees; the first is the reference")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--processes", type=int, default=1, help="[server] processes of the gateway")
    parser.add_argument("--idempotency", action="store_true",
                        help="a fresh Idempotency-Key header on every request (each answer is recorded)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    exit_on_sigterm()
    trees = [Path(t).resolve() for t in args.trees.split(",")]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    rows: list[dict[str, Any]] = []
    for round_ in range(args.rounds):
        for tree in trees:
            for row in measure(tree, concurrencies, args.duration, args.processes, args.idempotency):
                row["round"] = round_
                rows.append(row)
                print(f"round {round_} {tree.name:14} c{row['connections']:<3} {row['rate']:7.0f} req/s  "
                      f"p50 {row['p50_ms']:.3f} ms  p99 {row['p99_ms']:.3f} ms  server {row['cpu_ms']:.3f} "
                      f"ms/request  non-2xx {row['non_2xx']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    print(markdown(rows, trees, concurrencies, args))
    return 0


def markdown(rows: list[dict[str, Any]], trees: list[Path], concurrencies: list[int],
             args: argparse.Namespace) -> str:
    info, ver = machine(), versions()
    lines = [
        f"`.venv/bin/python bench/latency.py --rounds {args.rounds} --duration {args.duration:g} "
        f"--concurrency {args.concurrency} --processes {args.processes}"
        f"{' --idempotency' if args.idempotency else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} (UTC); {info['nproc']} CPUs, Python "
        f"{ver.get('python', '?')}; median of {args.rounds} rounds, trees alternating; ratio to `{trees[0].name}`.",
        "",
        "| tree | connections | req/s | p50 ms | p99 ms | server ms/request | p50 ratio | req/s ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def median(tree: Path, connections: int, field: str) -> float:
        return statistics.median(r[field] for r in rows if r["tree"] == str(tree) and r["connections"] == connections)

    for connections in concurrencies:
        for tree in trees:
            p50, rate = median(tree, connections, "p50_ms"), median(tree, connections, "rate")
            lines.append(
                f"| {tree.name} | {connections} | {rate:,.0f} | {p50:.3f} | {median(tree, connections, 'p99_ms'):.3f} "
                f"| {median(tree, connections, 'cpu_ms'):.3f} | {p50 / median(trees[0], connections, 'p50_ms'):.2f} "
                f"| {rate / median(trees[0], connections, 'rate'):.2f} |")
    errors = sum(r["non_2xx"] for r in rows)
    lines += ["", f"Non-2xx responses: {errors}."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
