"""Offline reconciliation: 100,000 offline payments (signature checks + postings) from generated
device logs, on SQLite. Not a test: CI runs none of this (docs/spec.md §12).

    .venv/bin/python bench/reconcile.py [--sizes 10000,50000,100000] [--per-device 100] [--batch 100]
                                        [--modes each,endorsed] [--workers 1] [--read-ahead 2]
                                        [--json FILE] [--append BENCHMARKS.md]

Generation (not timed): N/per-device simulated hard wallets in a ring, device i paying device i+1
``per-device`` times (1–5,000 fen), each payee receiving; every device's signed log export then holds
its payments and its receipts. Reconciliation (timed), through the gateway's own code with the
HSM replaced by a software issuer key (:mod:`tests.offline_harness`): exports in batches of
``batch`` devices — read and parsed, signatures checked (outside the transaction; ``each``: every
payment's own signature once, in a pool of ``workers`` spawned processes, the next batch's while
this one is reconciled; ``endorsed``: one signature per export, see docs/device-protocol.md, and the
next ``read-ahead`` batches read in the same worker processes), then one write transaction per batch
applies every rule, matches payer and payee records and posts the payments (one journal entry per
sync, payer's wallet and payee's wallet: reserve → payee wallet).
Afterwards: every payment posted exactly once and naming its journal entry, every entry crediting
exactly its payments, no discrepancy, ledger invariants sound.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import NCPU, machine, machine_busy_seconds  # noqa: E402
from gateway.ledger.journal import check_invariants  # noqa: E402
from gateway.offline.invariants import check_offline_entries  # noqa: E402
from gateway.offline.settings import OfflineSettings  # noqa: E402
from gateway.offline.verify import InlineVerifier, PoolVerifier, Verifier  # noqa: E402
from tests.offline_harness import OfflineHarness  # noqa: E402


def generate(harness: OfflineHarness, payments: int, per_device: int, seed: int) -> tuple[list[tuple[str, bytes]], int]:
    """Devices in a ring paying their neighbour; returns their exports and the total paid."""
    rng = random.Random(seed)
    count = max(2, payments // per_device)
    wallets = [harness.wallet(cash=10**9) for _ in range(count)]
    devices = [harness.device(wallet) for wallet in wallets]
    for device in devices:
        harness.load(device, 5_000_000)
    total = 0
    for index, device in enumerate(devices):
        payee = devices[(index + 1) % count]
        for _ in range(per_device):
            amount = rng.randint(1, 5_000)
            made = device.pay(payee.state.device_id, amount)
            payee.receive(made["payment"], made["certificate"], check=False)  # payees' checks are not timed
            total += amount
    exports = []
    for device in devices:
        device.export_log(0)
        exports.append((device.state.device_id, device.export()))
    return exports, total


def run(payments: int, per_device: int, batch: int, mode: str, verifier: Verifier, seed: int,
        read_ahead: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ecny-reconcile-") as directory:
        settings = OfflineSettings(signature_checks=mode)  # type: ignore[arg-type]
        harness = OfflineHarness(str(Path(directory) / "offline.db"), settings, verifier)
        started = time.perf_counter()
        exports, total = generate(harness, payments, per_device, seed)
        generated = time.perf_counter() - started
        busy_before = machine_busy_seconds()
        cpu_before = time.process_time()
        started = time.perf_counter()
        reports, timings = harness.reconcile_batches(exports, batch, read_ahead)
        wall = time.perf_counter() - started
        posted = sum(r["payments"]["posted"] + r["receipts"]["posted"] for r in reports)
        held = sum(r["payments"]["held"] + r["receipts"]["held"] for r in reports)
        own_cpu = time.process_time() - cpu_before
        busy = machine_busy_seconds() - busy_before
        problems = harness.read(check_invariants) + harness.read(check_offline_entries)
        checks = harness.read(lambda tx: tx.fetchone(
            "SELECT (SELECT COUNT(*) FROM offline_payments WHERE status = 'posted') AS posted, "
            "(SELECT COUNT(*) FROM offline_payments WHERE status = 'posted' AND entry_id IS NOT NULL) AS named, "
            "(SELECT COUNT(*) FROM journal WHERE kind = 'offline') AS entries, "
            "(SELECT COALESCE(SUM(amount), 0) FROM offline_payments WHERE status = 'posted') AS amount, "
            "(SELECT COUNT(*) FROM discrepancies) AS discrepancies"))
        harness.close()
        assert checks is not None
        actual = len(exports) * per_device
        ok = (not problems and int(checks["posted"]) == actual == int(checks["named"]) == posted
              and int(checks["amount"]) == total and int(checks["discrepancies"]) == 0 and held == 0)
        return {
            "payments": actual, "devices": len(exports), "per_device": per_device, "batch": batch, "mode": mode,
            "verifier": type(verifier).__name__, "read_ahead": read_ahead, "journal_entries": int(checks["entries"]),
            "generate_s": round(generated, 2), "wall_s": round(wall, 3),
            "read_s": round(timings["read_s"], 3), "verify_wait_s": round(timings["verify_wait_s"], 3),
            "reconcile_s": round(timings["reconcile_s"], 3),
            "payments_per_s": round(actual / wall), "us_per_payment": round(wall / actual * 1e6, 1),
            "main_cpu_s": round(own_cpu, 2), "machine_busy_cores": round(busy / wall, 2) if wall else None,
            "posted_exactly_once": ok, "ledger": "sound" if not problems else "; ".join(problems[:3]),
        }


def markdown(results: list[dict[str, Any]], command: str) -> str:
    info = machine()
    lines = [
        "",
        "## Offline reconciliation",
        "",
        f"Generated by `bench/reconcile.py` on {datetime.now(UTC):%Y-%m-%d %H:%M} (UTC). {info['nproc']} CPUs: "
        f"{info['cpu']}; Python {sys.version.split()[0]}; SQLite {__import__('sqlite3').sqlite_version}.",
        "",
        "```",
        command,
        "```",
        "",
        "Device logs are generated first (not timed): devices in a ring, each paying its neighbour "
        f"{results[0]['per_device']} times; each export holds the device's payments and its receipts. Timed: "
        "reading the exports, checking signatures (outside the transaction), and one write transaction per batch "
        "that applies every rule of docs/spec.md §8, matches payer and payee records and posts every payment "
        "(payer's reserve → payee's wallet, one journal entry per sync, payer's wallet and payee's wallet; each "
        "payment's row names its entry). *each*: every payment's own signature is verified once (a pool of spawned "
        "processes); *endorsed*: one signature per export covers the payer's own payments (docs/device-protocol.md). "
        "*read in*: where the exports are parsed — here (the reconciling process) or ahead, in the worker "
        "processes. *read s*: the reconciling process's time reading (or waiting for the workers' reading) and "
        "planning the checks. *busy cores*: the whole machine's CPU during the run, other people's jobs included. "
        "Checked after every run: every payment posted exactly once and naming its journal entry, every entry "
        "crediting exactly its payments, no discrepancy, ledger sound.",
        "",
        "| payments | devices | batch | signatures | read in | payments/s | µs/payment | read s "
        "| waiting for signatures s | rules+postings s | total s | journal entries | main CPU s | busy cores "
        "| exactly once |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['payments']:,} | {r['devices']} | {r['batch']} | {r['mode']} "
                     f"| {'workers' if r['read_ahead'] else 'here'} | {r['payments_per_s']:,} "
                     f"| {r['us_per_payment']} | {r['read_s']} | {r['verify_wait_s']} | {r['reconcile_s']} "
                     f"| {r['wall_s']} | {r['journal_entries']:,} "
                     f"| {r['main_cpu_s']} | {r['machine_busy_cores']} "
                     f"| {'yes' if r['posted_exactly_once'] else 'NO'} |")
    return "\n".join(lines) + "\n"


SECTION = "\n## Offline reconciliation\n"
NOTES = "\n### What bounds it (offline reconciliation)\n"


def write_section(path: Path, section: str) -> None:
    """Put ``section`` (from :func:`markdown`) into ``path``: in place of the generated part of an existing
    "Offline reconciliation" section (up to its handwritten "What bounds it" notes, or to the next section),
    leaving the rest of the file as it is; appended if there is none."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    start = text.find(SECTION)
    if start < 0:
        path.write_text(text + section, encoding="utf-8")
        return
    rest = start + len(SECTION)
    ends = [position for position in (text.find(NOTES, rest), text.find("\n## ", rest)) if position >= 0]
    end = min(ends) if ends else len(text)
    path.write_text(text[:start] + section.rstrip("\n") + "\n" + text[end:], encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--sizes", default="10000,50000,100000")
    parser.add_argument("--per-device", type=int, default=100)
    parser.add_argument("--batch", type=int, default=100, help="exports reconciled per transaction")
    parser.add_argument("--modes", default="each,endorsed")
    parser.add_argument("--workers", type=int, default=max(1, NCPU - 1),
                        help="worker processes (they run beside the reconciling process): signature checks in mode "
                             "each, reading ahead in mode endorsed")
    parser.add_argument("--read-ahead", type=int, default=2,
                        help="mode endorsed: batches read ahead in the workers (0: read in the reconciling process). "
                             "Mode each always reads here: its workers are busy verifying")
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--append", type=Path,
                        help="write the 'Offline reconciliation' section into this file (BENCHMARKS.md): replaces "
                             "the generated part of the existing section, keeps its 'What bounds it' notes and "
                             "everything else; appends the section if there is none")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    modes = args.modes.split(",")
    results = []
    wants_pool = "each" in modes or ("endorsed" in modes and args.read_ahead > 0)
    pool = PoolVerifier(args.workers) if wants_pool and args.workers > 0 else None
    try:
        if pool is not None:
            pool.warm_up()
        for mode in modes:
            read_ahead = args.read_ahead if mode == "endorsed" and pool is not None else 0
            for size in sizes:
                verifier: Verifier = pool if (pool is not None and (mode == "each" or read_ahead)) else InlineVerifier()
                result = run(size, args.per_device, args.batch, mode, verifier, args.seed, read_ahead)
                print(json.dumps(result), flush=True)
                results.append(result)
    finally:
        if pool is not None:
            pool.close()
    command = ".venv/bin/python bench/reconcile.py " + " ".join(sys.argv[1:])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.append:
        write_section(args.append, markdown(results, command))
    return 0 if all(r["posted_exactly_once"] for r in results) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
