"""POST /v1/transfers under load, on SQLite and on PostgreSQL.

    .venv/bin/python bench/transfers.py [--store sqlite|postgresql|both] [--mode spread|hot|both]
                                        [--duration 10] [--concurrency 16] [--payers 64] [--pin] [--json FILE]

spread: 64 tier-1 payer wallets (each cashed in with 10^12 fen) and 64 payees; client i of 16 pays
from payers i, i+16, i+32, i+48 in turn, so no two clients ever share a payer (no lock contention
between clients on one wallet). hot: all 16 clients pay from ONE payer wallet, each to its own payee:
every transfer then contends for the same wallet row.

Each transfer moves 1 fen with a fresh Idempotency-Key. After the run the harness checks the ledger
(``ecny-gateway ledger check``) and that the payees received exactly one fen per 2xx response.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    Gateway,
    LoadSpec,
    Postgres,
    WaitSampler,
    affinity_plan,
    exit_on_sigterm,
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


def ledger_check(gateway: Gateway) -> dict[str, Any]:
    checked = gateway.cli("ledger", "check")
    return {"ledger_check_rc": checked.returncode,
            "ledger_check": (checked.stdout + checked.stderr).strip().splitlines()[-1:] or [""]}


def run_store(store: str, modes: list[str], *, duration: float, concurrency: int, payers: int, pin: bool,
              postgres: Postgres | None = None, profile_dir: Path | None = None,
              processes: int = 1) -> list[dict[str, Any]]:
    server_cpus, client_cpus = affinity_plan(pin)
    own_pg = None
    dsn = None
    extra_cpu = None
    if store == "postgresql":
        if postgres is None:
            postgres = own_pg = Postgres()
        dsn = postgres.new_database()
        extra_cpu = postgres.backend_cpu_seconds
    gateway = start_gateway(store, dsn, cpus=server_cpus, processes=processes)
    results = []
    try:
        rss_idle = gateway.rss()
        for mode in modes:
            profile_to = (profile_dir / f"transfers-{store}-{mode}.pyspy.txt"
                          if profile_dir is not None and mode == modes[0] else None)
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
        gateway.cleanup()
        if own_pg is not None:
            own_pg.stop()
    return results


def summary_line(result: dict[str, Any]) -> str:
    errors = {k: v for k, v in result["statuses"].items() if not k.startswith("2")}
    return (f"transfers {result['store']:10} {result['mode']:6} ×{result['processes']} {result['ok_rate']:8.0f}/s ok  "
            f"p50 {result['p50_ms']:6.1f} ms  p99 {result['p99_ms']:6.1f} ms  errors {errors or 0} "
            f"exc {result['exceptions'] or 0}  server CPU {result['server_cpu_ms_per_request']:.2f} ms/req  "
            f"RSS {result['server_rss']['total_kib'] / 1024:.0f} MiB  money ok={result['money_consistent']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--mode", choices=["spread", "hot", "both"], default="both")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--payers", type=int, default=64)
    parser.add_argument("--pin", action="store_true", help="pin the client to the last CPU, the server to the rest")
    parser.add_argument("--processes", type=int, default=1, help="[server] processes of the gateway")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="py-spy the server during the first mode of each store; raw stacks go to DIR")
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
                                processes=args.processes):
            print(summary_line(result), flush=True)
            results.append(result)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
