"""Signed EVM transactions per second against the raw SoftHSM2 secp256k1 rate, in one run.

    .venv/bin/python bench/evm.py [--duration 10] [--raw-duration 4] [--concurrency 16,64]
                                  [--addresses 1,8] [--kind native|erc20] [--pin] [--json FILE]

One gateway (SQLite store, the softhsm profile's signer workers: 2), one token, made by
bench/common.py's ``start_gateway`` (``dev-init`` provisions the secp256k1 key ``evm-hot-wallet``):

1. raw: python-pkcs11 straight on the token in as many spawned processes as the gateway has signer
   workers, one kept session each, ``CKM_ECDSA`` on 32-byte digests with the ``evm-hot-wallet`` key
   (bench/raw_sign.py's worker) — run while the gateway is idle;
2. POST /v1/evm/transactions (EIP-1559, Sepolia from the shipped registry, a fresh Idempotency-Key
   each): a native transfer of 1 wei, or an ERC-20 transfer of 1 base unit of the registry's Sepolia
   USDC (``--kind erc20``), at each concurrency, from 1 address (every request contends for the
   address's nonce lock) and from 8 (keys made over the API, clients spread over them).

After the run the harness reads the store: for every address, the signed nonces must be exactly
0..n-1 with n = the 2xx responses (warm-up included) — no gap, no reuse.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    TOKEN_LABEL,
    Gateway,
    affinity_plan,
    machine,
    percentile,
    start_gateway,
    versions,
)
from bench.raw_sign import _raw_worker

KEY_LABEL = "evm-hot-wallet"
SEPOLIA = 11155111
SEPOLIA_USDC = "0x1c7D4B196Cb0C7B01d743Fbc6116a902379C7238"
RECIPIENT = "0x1111111111111111111111111111111111111111"
WORKERS = 2  # the softhsm profile's sessions.workers (the default of --workers); the raw phase uses the same number


# --- raw SoftHSM2 ----------------------------------------------------------------------------


def raw_rate(gateway: Gateway, processes: int, duration: float) -> dict[str, Any]:
    """secp256k1 signatures per second straight from SoftHSM2 in ``processes`` spawned processes."""
    context = multiprocessing.get_context("spawn")
    ready = [context.Event() for _ in range(processes)]
    go = context.Event()
    out = context.Queue()
    pin_file = str(gateway.base / "hsm" / f"{TOKEN_LABEL}.user-pin")
    workers = [context.Process(target=_raw_worker, args=(str(gateway.conf), pin_file, KEY_LABEL, duration,
                                                        ready[i], go, out), daemon=True) for i in range(processes)]
    for worker in workers:
        worker.start()
    for event in ready:
        if not event.wait(30):
            raise RuntimeError("raw HSM worker did not get ready")
    go.set()
    results = [out.get(timeout=duration + 30) for _ in workers]
    for worker in workers:
        worker.join(10)
    total = sum(count for count, _, _ in results)
    wall = max(elapsed for _, elapsed, _ in results)
    return {"processes": processes, "signatures": total, "wall_s": wall, "rate": total / wall}


# --- load ------------------------------------------------------------------------------------


def _body(kind: str, key_id: str) -> dict[str, Any]:
    common = {"key_id": key_id, "chain_id": SEPOLIA, "type": "eip1559", "gas_limit": 65_000,
              "max_fee_per_gas": "30000000000", "max_priority_fee_per_gas": "1000000000"}
    if kind == "erc20":
        return {**common, "erc20": {"token": SEPOLIA_USDC, "method": "transfer", "to": RECIPIENT, "amount": "1"}}
    return {**common, "gas_limit": 21_000, "to": RECIPIENT, "value": "1"}


async def _drive(url: str, headers: dict[str, str], kind: str, key_ids: list[str], concurrency: int,
                 warmup: float, duration: float) -> dict[str, Any]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    problems: dict[str, int] = {}
    warm_ok = 0
    loop = asyncio.get_running_loop()
    measure_from = loop.time() + warmup
    stop_at = measure_from + duration
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30),
                                     headers={**headers, "Content-Type": "application/json"}) as session:

        async def client(index: int) -> None:
            nonlocal warm_ok
            body = json.dumps(_body(kind, key_ids[index % len(key_ids)]))
            while (now := loop.time()) < stop_at:
                t0 = time.perf_counter()
                async with session.post(url + "/v1/evm/transactions", data=body,
                                        headers={"Idempotency-Key": os.urandom(16).hex()}) as response:
                    raw = await response.read()
                    status = response.status
                if now < measure_from:
                    warm_ok += 200 <= status < 300
                    continue
                latencies.append(time.perf_counter() - t0)
                statuses[status] = statuses.get(status, 0) + 1
                if status >= 300:
                    kind_of = str(json.loads(raw).get("type", "?")).rsplit("/", 1)[-1]
                    problems[f"{status} {kind_of}"] = problems.get(f"{status} {kind_of}", 0) + 1

        await asyncio.gather(*(client(i) for i in range(concurrency)))
    ok = sum(count for status, count in statuses.items() if 200 <= status < 300)
    return {"requests": len(latencies), "ok": ok, "ok_rate": ok / duration, "warmup_ok": warm_ok,
            "p50_ms": percentile(latencies, 0.5) * 1000, "p99_ms": percentile(latencies, 0.99) * 1000,
            "statuses": {str(k): v for k, v in sorted(statuses.items())}, "problems": problems}


def _load_process(arguments: tuple[Any, ...], cpus: set[int] | None, connection: Any) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        connection.send(("result", asyncio.run(_drive(*arguments))))
    except BaseException as exc:
        connection.send(("error", repr(exc)))
    finally:
        connection.close()


def run_load(gateway: Gateway, kind: str, key_ids: list[str], concurrency: int, duration: float,
             client_cpus: set[int] | None, warmup: float = 1.0) -> dict[str, Any]:
    """The load in a spawned process (no GIL shared with the measuring process); server CPU sampled."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    arguments = (gateway.url, gateway.backend(), kind, key_ids, concurrency, warmup, duration)
    process = context.Process(target=_load_process, args=(arguments, client_cpus, child), daemon=True)
    cpu_before = gateway.cpu_seconds()
    process.start()
    child.close()
    if not parent.poll(warmup + duration + 90):
        process.kill()
        raise RuntimeError("load process timed out")
    kind_of, value = parent.recv()
    process.join(10)
    if kind_of != "result":
        raise RuntimeError(f"load generator failed: {value}")
    value["server_cpu_ms_per_request"] = (1000 * (gateway.cpu_seconds() - cpu_before)
                                          / max(1, value["requests"] + value["warmup_ok"]))
    return dict(value)


# --- checks and the whole run ----------------------------------------------------------------


def nonce_check(gateway: Gateway) -> dict[str, Any]:
    """Per address: signed transactions, and whether their nonces are exactly 0..n-1."""
    connection = sqlite3.connect(gateway.dsn.removeprefix("sqlite:///"))
    try:
        rows = connection.execute(
            "SELECT from_address, COUNT(*), COUNT(DISTINCT nonce), MIN(nonce), MAX(nonce) FROM evm_transactions "
            "WHERE status = 'signed' GROUP BY from_address").fetchall()
        unsigned = connection.execute("SELECT COUNT(*) FROM evm_transactions WHERE status <> 'signed'").fetchone()[0]
    finally:
        connection.close()
    addresses = {address: {"signed": count, "gap_free": distinct == count and low == 0 and high == count - 1}
                 for address, count, distinct, low, high in rows}
    return {"addresses": addresses, "not_signed": unsigned,
            "all_gap_free": all(entry["gap_free"] for entry in addresses.values())}


def _keys(gateway: Gateway, count: int) -> list[str]:
    key_ids = [gateway.keys[KEY_LABEL]]
    for index in range(1, count):
        status, document = gateway.request("POST", "/v1/keys", {"label": f"bench-evm-{index}",
                                                                "algorithm": "ecdsa-secp256k1", "usage": ["evm"]},
                                           gateway.admin())
        if status != 201:
            raise RuntimeError(f"POST /v1/keys: {status} {document}")
        key_ids.append(document["key_id"])
    return key_ids


def run(*, duration: float, raw_duration: float, concurrencies: list[int], address_counts: list[int], kind: str,
        pin: bool, processes: int = 1, workers: int = WORKERS) -> dict[str, Any]:
    server_cpus, client_cpus = affinity_plan(pin)
    gateway = start_gateway("sqlite", workers=workers, cpus=server_cpus, processes=processes)
    try:
        result: dict[str, Any] = {"kind": kind, "signer_workers": workers, "processes": processes, "machine": machine(),
                                  "versions": versions(), "server_cpus": sorted(server_cpus) if server_cpus else "all",
                                  "loadavg_start": os.getloadavg()[0]}
        result["raw"] = raw_rate(gateway, workers, raw_duration)
        print(f"raw SoftHSM2 secp256k1, {workers} processes: {result['raw']['rate']:8.0f} sig/s", flush=True)
        all_keys = _keys(gateway, max(address_counts))
        result["runs"] = []
        for addresses in address_counts:
            for concurrency in concurrencies:
                load = run_load(gateway, kind, all_keys[:addresses], concurrency, duration, client_cpus)
                load |= {"addresses": addresses, "concurrency": concurrency,
                         "fraction_of_raw": load["ok_rate"] / result["raw"]["rate"]}
                result["runs"].append(load)
                print(f"evm {kind:6} {addresses} address(es) c{concurrency:<3} {load['ok_rate']:8.0f} tx/s "
                      f"({100 * load['fraction_of_raw']:.0f} % of raw)  p50 {load['p50_ms']:.1f} ms  "
                      f"p99 {load['p99_ms']:.1f} ms  server CPU {load['server_cpu_ms_per_request']:.2f} ms/tx  "
                      f"statuses {load['statuses']}", flush=True)
        # Raw again after the gateway phases: the machine's load may have changed meanwhile.
        result["raw_after"] = raw_rate(gateway, workers, raw_duration)
        result["loadavg_end"] = os.getloadavg()[0]
        print(f"raw SoftHSM2 secp256k1 again: {result['raw_after']['rate']:8.0f} sig/s", flush=True)
        result["nonces"] = nonce_check(gateway)
        print(f"nonces gap-free for every address: {result['nonces']['all_gap_free']}  "
              f"(not signed: {result['nonces']['not_signed']})", flush=True)
        result["server_log_problems"] = len(gateway.log_problems())
    finally:
        gateway.cleanup()
    return result


def markdown(result: dict[str, Any], command: str) -> str:
    """The BENCHMARKS.md section for one run."""
    lines = [
        "## EVM transactions", "",
        f"`{command}` — {result['machine']['nproc']} CPUs ({result['machine']['cpu']}), Python "
        f"{result['versions']['python']}, {result['versions']['softhsm2']}; SQLite store; "
        f"{result.get('processes', 1)} HTTP process(es), {result['signer_workers']} signer worker processes in all; "
        f"EIP-1559 on Sepolia ({result['kind']}), "
        "a fresh Idempotency-Key per request.", "",
        f"Raw SoftHSM2 secp256k1 (python-pkcs11, `CKM_ECDSA`, {result['raw']['processes']} processes, same run): "
        f"**{result['raw']['rate']:.0f} sig/s** before the gateway phases, {result['raw_after']['rate']:.0f} after; "
        f"% of raw below is against the first. Load average {result['loadavg_start']:.1f} at the start, "
        f"{result['loadavg_end']:.1f} at the end (other work shares this 2-core machine).", "",
        "| addresses | clients | signed tx/s | % of raw | p50 ms | p99 ms | server CPU ms/tx | statuses |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for run_ in result["runs"]:
        lines.append(f"| {run_['addresses']} | {run_['concurrency']} | {run_['ok_rate']:.0f} | "
                     f"{100 * run_['fraction_of_raw']:.0f} % | {run_['p50_ms']:.1f} | {run_['p99_ms']:.1f} | "
                     f"{run_['server_cpu_ms_per_request']:.2f} | {run_['statuses']} |")
    nonces = result["nonces"]
    lines += ["", f"Nonces after the run: every address gap-free 0..n-1 = **{nonces['all_gap_free']}** "
              f"({sum(a['signed'] for a in nonces['addresses'].values())} signed transactions, "
              f"{nonces['not_signed']} not signed).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--raw-duration", type=float, default=4.0)
    parser.add_argument("--concurrency", default="16,64", help="comma-separated client counts")
    parser.add_argument("--addresses", default="1,8", help="comma-separated numbers of signing addresses")
    parser.add_argument("--kind", choices=["native", "erc20"], default="native")
    parser.add_argument("--pin", action="store_true", help="pin the client to the last CPU, the server to the rest")
    parser.add_argument("--processes", type=int, default=1, help="[server] processes of the gateway")
    parser.add_argument("--workers", type=int, default=WORKERS,
                        help="signer worker processes of the gateway, and processes of the raw phase")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path, help="append the BENCHMARKS.md section to this file")
    args = parser.parse_args(argv)
    result = run(duration=args.duration, raw_duration=args.raw_duration,
                 concurrencies=[int(c) for c in args.concurrency.split(",")],
                 address_counts=[int(a) for a in args.addresses.split(",")], kind=args.kind, pin=args.pin,
                 processes=args.processes, workers=args.workers)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    command = ".venv/bin/python bench/evm.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = markdown(result, command.strip())
    print("\n" + section)
    if args.markdown:
        with args.markdown.open("a", encoding="utf-8") as handle:
            handle.write("\n" + section)
    return 0 if result["nonces"]["all_gap_free"] else 1


if __name__ == "__main__":
    sys.exit(main())
