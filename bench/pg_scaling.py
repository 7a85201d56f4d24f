"""Transfers/s against client count on PostgreSQL, with the database a simulated network hop away.

    .venv/bin/python bench/pg_scaling.py [--delays 0,0.5,2.5] [--instances 1,2,4]
                                         [--clients 1,2,4,8,16,32,64,128] [--duration 3] [--json FILE] [--png FILE]

For each one-way delay (ms; 0 = straight to the server) and each instance count, one gateway with
``[server] processes = N`` (N HTTP processes, each a whole gateway with its own PostgreSQL pool, audit
chainer candidate and event loop; they share the port and the HSM signer workers) is started on a
fresh database, reached through bench/delay_proxy.py (a subprocess) when the delay is not 0. 128
tier-1 payers pay 128 payees, spread: client i of C pays from payers i, i+C, ... so no two clients
share a wallet. Each point runs ``--duration`` seconds after a short warm-up. ``--kind cash``: the
clients cash in one fen to the payees instead (as the teller), client i to payees i, i+C, ...: every
cash movement posts against the bank's issuance account, so this shows whether cash serialises on it.

After each gateway's points: ``ledger check`` and ``audit verify`` (exit codes recorded), and the money
check (every 2xx moved exactly one fen). The proxy's CPU is reported: it shares the two cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    VENV_BIN,
    Gateway,
    LoadSpec,
    Postgres,
    WaitSampler,
    cpu_seconds,
    exit_on_sigterm,
    open_wallets,
    run_load,
    start_gateway,
)
from bench.transfers import _payee_total

ROOT = Path(__file__).resolve().parents[1]
PAYERS = 128


def start_proxy(port: int, delay_ms: float) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen([str(VENV_BIN / "python"), str(ROOT / "bench" / "delay_proxy.py"),
                                "--target", f"127.0.0.1:{port}", "--delay-ms", str(delay_ms)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("listening on"):
        process.kill()
        raise RuntimeError(f"delay proxy did not start: {line!r}")
    return process, int(line.rsplit(":", 1)[1])


def checks(gateway: Gateway) -> dict[str, Any]:
    ledger = gateway.cli("ledger", "check")
    audit = gateway.cli("audit", "verify")
    return {"ledger_check_rc": ledger.returncode, "audit_verify_rc": audit.returncode,
            "audit_verify": (audit.stdout.strip().splitlines() or [""])[-1],
            "audit_warnings": [line for line in audit.stderr.splitlines() if "pending" in line]}


def run_config(postgres: Postgres, delay_ms: float, instances: int, clients: list[int], duration: float,
               kind: str = "transfers") -> list[dict[str, Any]]:
    dsn = direct_dsn = postgres.new_database()
    proxy = None
    if delay_ms > 0:
        proxy, port = start_proxy(postgres.server.port, delay_ms)
        dsn = dsn.replace(f":{postgres.server.port}/", f":{port}/")
    gateway = start_gateway("postgresql", dsn, processes=instances)
    results = []
    try:
        payees = open_wallets(gateway, PAYERS, tier=1, funded=0)
        payers = payees if kind == "cash" else open_wallets(gateway, PAYERS, tier=1, cash_in_fen=10**12)
        for count in clients:
            pairs = [[(payers[j], payees[j]) for j in range(i, PAYERS, count)] for i in range(count)]
            before = _payee_total(gateway, payees)
            spec = LoadSpec(url=gateway.url, kind=kind, concurrency=count, duration=duration, warmup=0.5,
                            headers=gateway.teller() if kind == "cash" else gateway.backend(), pairs=pairs,
                            amount_fen=1)
            proxy_cpu = cpu_seconds(proxy.pid) if proxy else 0.0
            with WaitSampler(direct_dsn) as sampler:  # what the backends wait for (not through the proxy)
                result = run_load(spec, gateway, extra_cpu=postgres.backend_cpu_seconds)
            result["pg_waits"] = sampler.summary()
            received = _payee_total(gateway, payees) - before
            result.update({"kind": kind, "delay_ms_each_way": delay_ms, "instances": instances, "clients": count,
                           "money_consistent": received == result["ok"] + result["warmup_ok"],
                           "proxy_cpu_s": (cpu_seconds(proxy.pid) - proxy_cpu) if proxy else 0.0})
            print(f"delay {delay_ms:3} ms ×{instances} clients {count:3}: {result['ok_rate']:7.0f}/s  "
                  f"p50 {result['p50_ms']:6.1f} ms  errors {result['statuses']}  "
                  f"server CPU {result['server_cpu_ms_per_request'] or 0:.2f} ms/req  "
                  f"waits {result['pg_waits'].get('mean_backends_by_wait', {})}  "
                  f"money ok={result['money_consistent']}", flush=True)
            results.append(result)
        verdict = checks(gateway)
        print(f"  ledger check rc={verdict['ledger_check_rc']}  audit verify rc={verdict['audit_verify_rc']}: "
              f"{verdict['audit_verify']}", flush=True)
        for result in results:
            result.update(verdict)
    finally:
        gateway.cleanup()
        if proxy is not None:
            proxy.kill()
            proxy.wait()
    return results


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 5.5))
    for tree in sorted({r.get("tree", "") for r in results}):  # "main": the code before, dashed
        for delay in sorted({r["delay_ms_each_way"] for r in results}):
            for instances in sorted({r["instances"] for r in results}):
                points = sorted((r["clients"], r["ok_rate"]) for r in results if r.get("tree", "") == tree
                                and r["delay_ms_each_way"] == delay and r["instances"] == instances)
                if points:
                    label = f"RTT {2 * delay:g} ms, {instances} instance{'s' if instances > 1 else ''}"
                    axes.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                              linestyle="--" if tree else "-", label=f"{tree}: {label}" if tree else label)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("clients (concurrent requests)")
    axes.set_ylabel("transfers/s (2xx)")
    axes.set_title("POST /v1/transfers on PostgreSQL (spread, 2 shared cores)")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--delays", default="0,0.5,2.5", help="one-way delays in ms, comma-separated")
    parser.add_argument("--instances", default="1,2,4")
    parser.add_argument("--clients", default="1,2,4,8,16,32,64,128")
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--kind", choices=["transfers", "cash"], default="transfers",
                        help="what the clients do: transfers between their wallets, or cash-ins to them")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--png", type=Path)
    parser.add_argument("--replot", type=Path, help="only draw --png from this JSON")
    args = parser.parse_args(argv)
    if args.replot:
        plot(json.loads(args.replot.read_text()), args.png)
        return 0
    exit_on_sigterm()
    clients = [int(c) for c in args.clients.split(",")]
    results: list[dict[str, Any]] = []
    postgres = Postgres()
    started = time.monotonic()
    try:
        for delay in [float(d) for d in args.delays.split(",")]:
            for instances in [int(i) for i in args.instances.split(",")]:
                results.extend(run_config(postgres, delay, instances, clients, args.duration, args.kind))
                if args.json:
                    args.json.write_text(json.dumps(results, indent=2))
    finally:
        postgres.stop()
    print(f"done in {time.monotonic() - started:.0f} s", flush=True)
    if args.png:
        plot(results, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
