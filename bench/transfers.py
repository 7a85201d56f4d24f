"""POST /v1/transfers under load, on SQLite and on PostgreSQL.

    .venv/bin/python bench/transfers.py [--store sqlite|postgresql|both] [--mode spread|hot|both]
                                        [--duration 10] [--concurrency 16] [--payers 64] [--pin] [--json FILE]

spread: 64 tier-1 payer wallets (each cashed in with 10^12 fen) and 64 payees; client i of 16 pays
from payers i, i+16, i+32, i+48 in turn, so no two clients ever share a payer (no lock contention
between clients on one wallet). hot: all 16 clients pay from ONE payer wallet, each to its own payee:
every transfer then contends for the same wallet row.

Each transfer moves 1 fen with a fresh Idempotency-Key. After the run the harness checks the ledger
(``ecny-gateway ledger check``) and that the payees received exactly one fen per 2xx response.

``--client wrk``: the load comes from wrk (C, ``-t2``, a Lua script; each thread cycles through its
half of the payer/payee pairs, Idempotency-Key = thread and counter) instead of a spawned Python
aiohttp client, whose own CPU (about a third of a core per 500 transfers/s) the server no longer
has to share the machine's two cores with. No warm-up; the money check allows for the requests wrk
leaves in flight at its deadline (the payees may hold up to ``--concurrency`` fen more than the 2xx
it counted, never less).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    GATEWAY,
    Gateway,
    LoadSpec,
    Postgres,
    WaitSampler,
    affinity_plan,
    cpu_seconds,
    exit_on_sigterm,
    machine_busy_seconds,
    open_wallets,
    run_load,
    start_gateway,
)


def _payee_total(gateway: Gateway, payees: list[str]) -> int:
    total = 0
    for wallet_id in payees:
        status, document = gateway.request("GET", f"/v1/wallets/{wallet_id}", headers=gateway.teller())
        if status != 200:
            raise RuntimeError(f"GET wallet: {status} {document}")
        total += int(document["balance_fen"])
    return total


def run_mode(gateway: Gateway, mode: str, *, duration: float, concurrency: int, payers: int,
             client_cpus: set[int] | None, extra_cpu: Any = None, profile_to: Path | None = None
             ) -> dict[str, Any]:
    payer_count = 1 if mode == "hot" else payers
    payer_ids = open_wallets(gateway, payer_count, tier=1, cash_in_fen=10**12)
    payee_ids = open_wallets(gateway, max(concurrency, payers if mode != "hot" else concurrency), tier=1, funded=0)
    if mode == "hot":
        pairs = [[(payer_ids[0], payee_ids[i])] for i in range(concurrency)]
    else:
        pairs = [[(payer_ids[j], payee_ids[j]) for j in range(i, payers, concurrency)] for i in range(concurrency)]
        if any(not p for p in pairs):
            raise SystemExit("--payers must be at least --concurrency in spread mode")
    before = _payee_total(gateway, payee_ids)
    spec = LoadSpec(url=gateway.url, kind="transfers", concurrency=concurrency, duration=duration,
                    headers=gateway.backend(), pairs=pairs, amount_fen=1, cpus=client_cpus)
    spy = None
    if profile_to is not None:
        from bench import profile

        # py-spy attaches in well under the 1 s warm-up; it samples the measured window.
        spy = profile.start(gateway.pid, spec.warmup + duration - 0.5, profile_to)
    sampler = WaitSampler(gateway.dsn) if gateway.store == "postgresql" else None
    if sampler is not None:
        with sampler:
            result = run_load(spec, gateway, extra_cpu=extra_cpu)
        result["pg_waits"] = sampler.summary()
    else:
        result = run_load(spec, gateway, extra_cpu=extra_cpu)
    if spy is not None:
        spy.wait(timeout=60)
        if profile_to is not None and profile_to.exists():
            from bench import profile

            result["profile"] = profile.summarize(profile_to, spec.warmup + duration - 0.5)
            result["profile"].pop("inclusive")
    result["mode"] = mode
    result["store"] = gateway.store
    result["payers"] = payer_count
    # Consistency: every 2xx moved exactly one fen (warm-up included), nothing else did.
    received = _payee_total(gateway, payee_ids) - before
    expected = result["ok"] + result["warmup_ok"]
    result["payees_received_fen"] = received
    result["expected_fen"] = expected
    result["money_consistent"] = received == expected
    return result


WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(api_key)s"
local pairs = {%(pairs)s}
local threads = 0
local counter = 0
local mine = {}
local tag = ""
setup = function(thread)
  threads = threads + 1
  thread:set("index", threads)
end
init = function(args)
  local n = 0
  for i, pair in ipairs(pairs) do
    if (i - 1) %% 2 == index - 1 then n = n + 1; mine[n] = pair end
  end
  tag = string.format("%%s-%%d-", "%(run)s", index)
end
request = function()
  counter = counter + 1
  local pair = mine[(counter - 1) %% #mine + 1]
  wrk.headers["Idempotency-Key"] = tag .. counter
  return wrk.format(nil, "/v1/transfers", nil,
    '{"from_wallet":"' .. pair[1] .. '","to_wallet":"' .. pair[2] .. '","amount_fen":1}')
end
done = function(summary, latency, requests)
  io.write(string.format("PCT %%d %%d %%d\\n", latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def run_mode_wrk(gateway: Gateway, mode: str, *, duration: float, concurrency: int, payers: int) -> dict[str, Any]:
    """One mode with wrk as the client (see the module docstring)."""
    payer_count = 1 if mode == "hot" else payers
    payer_ids = open_wallets(gateway, payer_count, tier=1, cash_in_fen=10**12)
    payee_count = concurrency if mode == "hot" else payers
    payee_ids = open_wallets(gateway, payee_count, tier=1, funded=0)
    pairs = [(payer_ids[0 if mode == "hot" else i], payee_ids[i]) for i in range(payee_count)]
    before = _payee_total(gateway, payee_ids)
    workdir = Path(tempfile.mkdtemp(prefix="ecny-wrk-"))
    try:
        script = workdir / "transfers.lua"
        script.write_text(WRK_LUA % {
            "api_key": gateway.credentials["backend_api_key"], "run": f"{mode}{time.time_ns()}",
            "pairs": ", ".join(f'{{"{a}", "{b}"}}' for a, b in pairs)})
        cpu_start, busy_start, wall_start = gateway.cpu_seconds(), machine_busy_seconds(), time.monotonic()
        out = subprocess.run(["wrk", "-t2", f"-c{concurrency}", f"-d{int(duration)}s", "-s", str(script), gateway.url],
                             capture_output=True, text=True, timeout=duration + 60).stdout
        wall = time.monotonic() - wall_start
        server_cpu = gateway.cpu_seconds() - cpu_start
        busy = machine_busy_seconds() - busy_start
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = int(non2xx.group(1)) if non2xx else 0
    pct = re.search(r"PCT (\d+) (\d+) (\d+)", out)
    seconds = float(re.search(r"requests in ([\d.]+)s", out).group(1))  # type: ignore[union-attr]
    ok = total - errors
    received = _payee_total(gateway, payee_ids) - before
    return {
        "client": "wrk", "mode": mode, "store": gateway.store, "payers": payer_count, "concurrency": concurrency,
        "requests": total, "ok": ok, "ok_rate": ok / seconds,
        "statuses": {"2xx": ok, **({"non-2xx": errors} if errors else {})},
        "exceptions": 0, "p50_ms": int(pct.group(1)) / 1000 if pct else float("nan"),
        "p99_ms": int(pct.group(2)) / 1000 if pct else float("nan"),
        "max_ms": int(pct.group(3)) / 1000 if pct else float("nan"),
        "wall_s": wall, "server_cpu_s": server_cpu, "server_cpu_ms_per_request": 1000 * server_cpu / max(total, 1),
        "machine_busy_fraction": busy / wall / (os.cpu_count() or 1), "server_rss": gateway.rss(),
        # wrk stops counting at the deadline with up to `concurrency` requests in flight; those may
        # still post. So every counted 2xx must have moved one fen, and at most `concurrency` more.
        "payees_received_fen": received, "expected_fen": ok, "uncounted_in_flight_fen": received - ok,
        "money_consistent": ok <= received <= ok + concurrency,
    }


def ledger_check(gateway: Gateway) -> dict[str, Any]:
    checked = gateway.cli("ledger", "check")
    audit = gateway.cli("audit", "verify")
    return {"ledger_check_rc": checked.returncode,
            "ledger_check": (checked.stdout + checked.stderr).strip().splitlines()[-1:] or [""],
            "audit_verify_rc": audit.returncode, "audit_verify": audit.stdout.strip().splitlines()[-1:] or [""],
            "audit_pending": [line for line in audit.stderr.splitlines() if "pending" in line]}


def run_store(store: str, modes: list[str], *, duration: float, concurrency: int, payers: int, pin: bool,
              postgres: Postgres | None = None, profile_dir: Path | None = None,
              processes: int = 1, client: str = "python", extra_toml: str = "",
              risk_evaluator: str = "process") -> list[dict[str, Any]]:
    server_cpus, client_cpus = affinity_plan(pin)
    own_pg = None
    dsn = None
    extra_cpu = None
    if store == "postgresql":
        if postgres is None:
            postgres = own_pg = Postgres()
        dsn = postgres.new_database()
        extra_cpu = postgres.backend_cpu_seconds
    if risk_evaluator == "inline":
        extra_toml += '\n[risk]\nevaluator = "inline"\n'
    elif risk_evaluator == "command":
        extra_toml += "\n[risk]\nmonitor = false\n"
    gateway = start_gateway(store, dsn, cpus=server_cpus, processes=processes, extra_toml=extra_toml)
    evaluator = None
    if risk_evaluator == "command":  # `ecny-gateway risk monitor`: its CPU counts as the server's
        evaluator = subprocess.Popen([str(GATEWAY), "risk", "monitor", "--config", str(gateway.base / "gateway.toml")],
                                     env=gateway.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        database_cpu = extra_cpu
        extra_cpu = lambda: cpu_seconds(evaluator.pid) + (database_cpu() if database_cpu else 0.0)  # noqa: E731
    results = []
    try:
        rss_idle = gateway.rss()
        for mode in modes:
            profile_to = (profile_dir / f"transfers-{store}-{mode}.pyspy.txt"
                          if profile_dir is not None and mode == modes[0] else None)
            if client == "wrk":
                result = run_mode_wrk(gateway, mode, duration=duration, concurrency=concurrency, payers=payers)
            else:
                result = run_mode(gateway, mode, duration=duration, concurrency=concurrency, payers=payers,
                                  client_cpus=client_cpus, extra_cpu=extra_cpu, profile_to=profile_to)
            result["server_rss_idle"] = rss_idle
            result["processes"] = processes
            result["server_cpus"] = sorted(server_cpus) if server_cpus else "all"
            result["client_cpus"] = sorted(client_cpus) if client_cpus else "all"
            results.append(result)
        check = ledger_check(gateway)
        problems = gateway.log_problems()
        for result in results:
            result.update(check)
            result["server_log_problems"] = len(problems)
            result["server_log_examples"] = problems[:5]
    finally:
        if evaluator is not None:
            evaluator.terminate()
            evaluator.wait(timeout=30)
        gateway.cleanup()
        if own_pg is not None:
            own_pg.stop()
    return results


def summary_line(result: dict[str, Any]) -> str:
    errors = {k: v for k, v in result["statuses"].items() if not k.startswith("2")}
    return (f"transfers {result['store']:10} {result['mode']:6} ×{result['processes']} {result['ok_rate']:8.0f}/s ok  "
            f"p50 {result['p50_ms']:6.1f} ms  p99 {result['p99_ms']:6.1f} ms  errors {errors or 0} "
            f"exc {result['exceptions'] or 0}  server CPU {result['server_cpu_ms_per_request']:.2f} ms/req  "
            f"RSS {result['server_rss']['total_kib'] / 1024:.0f} MiB  money ok={result['money_consistent']}  "
            f"ledger rc={result.get('ledger_check_rc')} audit verify rc={result.get('audit_verify_rc')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--mode", choices=["spread", "hot", "both"], default="both")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--payers", type=int, default=64)
    parser.add_argument("--pin", action="store_true", help="pin the client to the last CPU, the server to the rest")
    parser.add_argument("--processes", type=int, default=1, help="[server] processes of the gateway")
    parser.add_argument("--client", choices=["python", "wrk"], default="python", help="the load generator")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="py-spy the server during the first mode of each store; raw stacks go to DIR")
    parser.add_argument("--toml", default="", metavar="TEXT",
                        help='appended to the gateway\'s configuration, e.g. $\'[risk]\\nmonitor = false\\n\'')
    parser.add_argument("--risk-evaluator", choices=["process", "inline", "command"], default="process",
                        help="the risk rules in the evaluator process the server spawns (the default), in the HTTP "
                             "process, or in `ecny-gateway risk monitor` beside a server with [risk] monitor = false")
    args = parser.parse_args(argv)
    exit_on_sigterm()
    stores = ["sqlite", "postgresql"] if args.store == "both" else [args.store]
    modes = ["spread", "hot"] if args.mode == "both" else [args.mode]
    results = []
    for store in stores:
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
        for result in run_store(store, modes, duration=args.duration, concurrency=args.concurrency,
                                payers=args.payers, pin=args.pin, profile_dir=args.profile,
                                processes=args.processes, client=args.client, extra_toml=args.toml,
                                risk_evaluator=args.risk_evaluator):
            print(summary_line(result), flush=True)
            results.append(result)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
