"""Run every benchmark and write BENCHMARKS.md (``make bench``). Not a test: CI runs none of this.

    .venv/bin/python bench/run.py [--duration 10] [--sign-duration 5] [--raw-duration 2]
                                  [--pin] [--profile] [--no-wrk] [--wait-quiet 10] [--output BENCHMARKS.md]

1. bench/transfers.py — POST /v1/transfers, 16 clients, spread (64 payers) and hot (1 payer), on
   SQLite and on PostgreSQL (a throw-away cluster from tests/pg.py);
2. bench/raw_sign.py — POST /v1/keys/{id}/sign at 16 and 64 connections (aiohttp client, and wrk),
   POST /v1/sign/batch with 100 digests, and the raw SoftHSM2 rate in 1 and 2 processes.

Text between the ``notes`` markers of an existing BENCHMARKS.md (analysis written by people) is kept,
and so are sections other scripts wrote (``bench/evm.py``, ``bench/reconcile.py``).
The full results also go to bench/last-run.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import raw_sign, transfers  # noqa: E402
from bench.common import NCPU, Postgres, exit_on_sigterm, machine, machine_busy_seconds, versions  # noqa: E402

NOTES_BEGIN = "<!-- notes:begin (kept by bench/run.py) -->"
NOTES_END = "<!-- notes:end -->"

UVLOOP_PIPE_BUG = (
    "Batch requests failing with “signer worker N exited/lost” under `serve` while the uvloop-disabled control "
    "passes is how the uvloop pipe bug fixed in a4887f6 showed itself: uvloop's `add_reader` put the pool's "
    "pipe fds in O_NONBLOCK mode and the blocking `Connection.recv` failed on partly arrived replies. Check "
    "`gateway/hsm/pool.py` for a return of it."
)


def ensure_wrk() -> bool:
    if shutil.which("wrk"):
        return True
    if not shutil.which("apt-get"):
        return False
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    print("wrk not found: installing the Debian package", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", "wrk"], env=env, capture_output=True)
    return shutil.which("wrk") is not None


def code_version() -> str:
    """The commit under test and whether gateway/ had uncommitted changes (read-only git commands)."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %s"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "gateway"],
                               capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return head + (f" + uncommitted changes in {len(dirty)} file(s) under gateway/" if dirty else "")


def foreign_load(seconds: float = 1.0) -> float:
    """CPU cores busy over ``seconds`` while nothing of ours runs (other users' work on this machine)."""
    before = machine_busy_seconds()
    time.sleep(seconds)
    return (machine_busy_seconds() - before) / seconds


def wait_quiet(limit: float, threshold: float = 0.25) -> tuple[float, float]:
    """Wait up to ``limit`` s for the machine's busy CPU to fall below ``threshold`` cores."""
    waited = 0.0
    load = foreign_load()
    while load > threshold and waited < limit:
        waited += 1.0
        load = foreign_load()
    return load, waited


# --- formatting -----------------------------------------------------------------------------


def f0(value: Any) -> str:
    return "–" if value is None else f"{value:,.0f}"


def f1(value: Any) -> str:
    return "–" if value is None else f"{value:,.1f}"


def f2(value: Any) -> str:
    return "–" if value is None else f"{value:,.2f}"


def statuses(result: dict[str, Any]) -> str:
    parts = [f"{code}×{count}" for code, count in result.get("statuses", {}).items()]
    parts += [f"{name}×{count}" for name, count in result.get("exceptions", {}).items()]
    return ", ".join(parts) or "none"


def errors_of(result: dict[str, Any]) -> int:
    bad = sum(count for code, count in result.get("statuses", {}).items() if not code.startswith("2"))
    return bad + sum(result.get("exceptions", {}).values())


def other_cores(result: dict[str, Any]) -> str:
    if "other_cpu_s" not in result or not result.get("wall_s"):
        return "–"
    return f2(result["other_cpu_s"] / result["wall_s"])


def server_cores(result: dict[str, Any]) -> str:
    value = result.get("server_cpu_utilisation")
    return "–" if value is None else f2(value * NCPU)


def rss(result: dict[str, Any]) -> str:
    memory = result.get("server_rss") or {}
    if not memory:
        return "–"
    return f"{memory['main_kib'] / 1024:.0f} / {memory['total_kib'] / 1024:.0f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


# --- the report -----------------------------------------------------------------------------


def report(data: dict[str, Any], notes: str) -> str:
    out: list[str] = []
    add = out.append
    m, v = data["machine"], data["versions"]
    add("# Benchmarks")
    add("")
    add(f"Generated by `bench/run.py` on {data['started']} (UTC) in {data['runtime_s']:.0f} s. "
        "Not a test: CI runs none of this (docs/spec.md §12). Figures from one run on a shared machine; "
        "read them with the *foreign CPU* column, which says how much of the machine other people's "
        "jobs took during each measurement.")
    add("")
    add("## Machine and versions")
    add("")
    add(f"- {m['nproc']} CPUs: {m['cpu']}; RAM {m['ram']}; Linux {m['kernel']}")
    add(f"- load average at start: {data['loadavg_start']}; foreign CPU just before the run: "
        f"{data['foreign_before']:.2f} cores (waited {data['waited_s']:.0f} s for a quieter machine)")
    add(f"- Python {v['python']}, aiohttp {v['aiohttp']}, uvloop {v['uvloop']}, python-pkcs11 {v['python-pkcs11']}, "
        f"psycopg {v['psycopg']}")
    add(f"- {v['softhsm2'] and 'SoftHSM2 ' + v['softhsm2']}, {v['postgresql']}, {v['wrk']}")
    add("")
    add(f"- code under test: {data.get('code', 'unknown')}")
    add("")
    add("## Commands")
    add("")
    add("```")
    add(data["command"])
    add("# server, one per store / loop (token from softhsm/init-token.sh, set-up by `ecny-gateway dev-init`):")
    add("SOFTHSM2_CONF=$TMP/hsm/softhsm2.conf .venv/bin/ecny-gateway serve --config $TMP/gateway.toml")
    for entry in data["sign"].get("wrk", [])[:1]:
        add(entry["command"].replace(str(ROOT) + "/", "") + "   # and -c64")
    add("```")
    add("")
    add("How it is measured: the gateway runs as its own process (`serve`, 2 signer worker processes from the "
        "softhsm profile, log level warning) on 127.0.0.1; the load comes from a *spawned* Python process "
        "(aiohttp, uvloop, a connection pool as large as the concurrency) or from wrk. Each phase has a 1 s "
        "warm-up that is not counted. *Server CPU* is utime+stime of the server process and its children (the "
        "signer workers) from /proc, over the measured window; *cores* = CPU seconds per wall second. RSS is "
        "VmRSS of the main process / main + workers, in MiB, at the end of the phase. "
        + ("CPU affinity: client pinned to the last CPU, server (and workers) to the others."
           if data["pin"] else
           "CPU affinity: none (on 2 cores, pinning the client to one CPU leaves the server and both signer "
           "workers one CPU, which caps the signer pool at the 1-process HSM rate; `--pin` does that)."))
    add("")

    # transfers
    add("## Transfers: POST /v1/transfers, 16 clients")
    add("")
    add(f"{data['transfer_duration']:.0f} s per row, 1 fen per transfer, fresh Idempotency-Key each. *spread*: 64 "
        "tier-1 payer wallets (client i uses payers i, i+16, i+32, i+48), *hot*: all 16 clients pay from ONE "
        "wallet. After each store: `ecny-gateway ledger check`, and the payees' balances must have grown by "
        "exactly one fen per 2xx."
        + (" The spread rows ran with py-spy attached (`--profile`, non-blocking sampling)."
           if any(r.get("profile") for r in data["transfers"]) else ""))
    add("")
    rows = []
    for r in data["transfers"]:
        rows.append([r["store"], r["mode"], f0(r["ok_rate"]), f1(r["p50_ms"]), f1(r["p99_ms"]), f1(r["max_ms"]),
                     statuses(r), f2(r["server_cpu_ms_per_request"]), server_cores(r),
                     f2(r.get("store_cpu_ms_per_request")), other_cores(r), rss(r),
                     "ok" if r["money_consistent"] else f"**{r['payees_received_fen']} ≠ {r['expected_fen']}**",
                     "sound" if r["ledger_check_rc"] == 0 else "**" + " ".join(r["ledger_check"]) + "**"])
    out += table(["store", "mode", "transfers/s", "p50 ms", "p99 ms", "max ms", "responses", "server CPU ms/req",
                  "server cores", "PostgreSQL CPU ms/req", "foreign CPU cores", "RSS MiB", "money", "ledger"], rows)
    add("")
    waits = [r for r in data["transfers"] if r.get("pg_waits")]
    if waits:
        add("PostgreSQL backends of the gateway's database, sampled every 50 ms (mean number per sample, by "
            "wait event; `Client:ClientRead` inside a transaction = the backend waits for the gateway to send "
            "the next statement, `Lock:advisory` = waits for a `pg_advisory_xact_lock`):")
        add("")
        for r in waits:
            w = r["pg_waits"]
            parts = ", ".join(f"{k} {val}" for k, val in w["mean_backends_by_wait"].items())
            line = f"- {r['mode']}: {w['mean_non_idle_backends']} non-idle backends — {parts}"
            counted = r["requests"] + r.get("warmup_requests", 0)
            c = w.get("counters") or {}
            if c and counted:
                # The sampler's counters span the warm-up too (pg_stat_database is updated at commit, lazily).
                line += (f"; per transfer ≈ {c['commits'] / counted:.1f} commits, "
                         f"{c['rows_inserted'] / counted:.1f} rows inserted, {c['rows_updated'] / counted:.1f} updated")
            add(line)
        add("")
    profiled = [r for r in data["transfers"] if r.get("profile")]
    if profiled:
        add("py-spy (`record --threads --nonblocking -r 200`, attached to the server's main process during the "
            "spread runs): share of the measured window each thread was sampled running, and the top frames by "
            "own time (share of all samples).")
        add("")
        for r in profiled:
            p = r["profile"]
            threads = ", ".join(f"{name} {share:.0%}" for name, _count, share in p["threads"])
            add(f"- {r['store']} {r['mode']}: threads busy — {threads}")
            for name, _count, share in p["self"][:6]:
                add(f"  - {share:.0%} {name}")
        add("")
    add("### What bounds it")
    add("")
    add(NOTES_BEGIN)
    add(notes.strip() or "_(no notes yet)_")
    add(NOTES_END)
    add("")

    # signing
    sign = data["sign"]
    add("## Raw signing: POST /v1/keys/{id}/sign and POST /v1/sign/batch (key raw-p256, ECDSA P-256)")
    add("")
    add(f"{data['sign_duration']:.0f} s per gateway row, {data['raw_duration']:.0f} s per raw row, same token "
        "and key in the same run. Raw SoftHSM2 = python-pkcs11 in spawned processes, one kept logged-in "
        "session each, key handle looked up once, `Mechanism.ECDSA` on random 32-byte digests.")
    add("")
    rows = []
    for r in sign["raw"] + sign.get("raw_after", []):
        rows.append([f"raw SoftHSM2, {r['processes']} process{'es' if r['processes'] > 1 else ''} ({r['when']})",
                     "–", "–", f0(r["rate"]), "–", "–", "–", f"{1000 * r['cpu_s'] / r['signatures']:.3f}",
                     other_cores(r), "–"])
    for r in sign["single"]:
        rows.append(["gateway sign, aiohttp client", str(r["concurrency"]), f0(r["ok_rate"]), f0(r["ok_rate"]),
                     f1(r["p50_ms"]), f1(r["p99_ms"]), statuses(r), f"{r['server_cpu_ms_per_request']:.3f}",
                     other_cores(r), rss(r)])
    for r in sign.get("wrk", []):
        codes = ", ".join(f"{k}×{val}" for k, val in sorted(r["statuses"].items())) or "?"
        if r.get("socket_errors"):
            codes += f"; socket errors {r['socket_errors']}"
        rows.append([f"gateway sign, wrk -t{r['threads']}", str(r["connections"]), f0(r["rate"]), f0(r["rate"]),
                     f1(r.get("p50_ms")), f1(r.get("p99_ms")), codes,
                     "–" if r["server_cpu_ms_per_request"] is None else f"{r['server_cpu_ms_per_request']:.3f}",
                     other_cores(r), rss(r)])
    for key, label in (("batch", "gateway batch ×100 (`serve`, uvloop)"),
                       ("batch_asyncio", "gateway batch ×100 (uvloop disabled)")):
        r = sign.get(key)
        if not r:
            continue
        rows.append([label, "16", f0(r["ok_rate"]), f0(r["signatures_per_s"]), f1(r["p50_ms"]), f1(r["p99_ms"]),
                     statuses(r), f"{r['server_cpu_ms_per_signature']:.3f} per sig", other_cores(r), rss(r)])
    out += table(["path", "connections", "requests/s", "signatures/s", "p50 ms", "p99 ms", "responses",
                  "CPU ms/sig (server, or raw process)", "foreign CPU cores", "RSS MiB"], rows)
    add("")
    add("### Ratios (same run)")
    add("")
    rounds = sign["raw"] + sign.get("raw_after", [])
    raw1 = max(r["rate"] for r in rounds if r["processes"] == 1)
    raw2 = max(r["rate"] for r in rounds if r["processes"] == 2)
    add(f"Against the better of the two raw measurements (1 process {raw1:,.0f}/s, 2 processes {raw2:,.0f}/s):")
    add("")
    add(f"- raw SoftHSM2: 2 processes / 1 process = {raw2 / raw1:.2f}")
    batch_ok = sign.get("batch") and errors_of(sign["batch"]) == 0
    for key, label in (("batch", "batch (`serve`, uvloop)"), ("batch_asyncio", "batch (uvloop disabled)")):
        r = sign.get(key)
        if r:
            note = "" if errors_of(r) == 0 else f" — {errors_of(r)} failed requests, see below"
            add(f"- gateway {label}, 2 signer workers / raw 2 processes = {r['signatures_per_s'] / raw2:.2f}{note}")
    for r in sign["single"]:
        add(f"- gateway single sign c{r['concurrency']} (aiohttp) / raw 2 processes = {r['ok_rate'] / raw2:.3f}; "
            f"/ raw 1 process = {r['ok_rate'] / raw1:.3f}")
    for r in sign.get("wrk", []):
        add(f"- gateway single sign c{r['connections']} (wrk) / raw 2 processes = {r['rate'] / raw2:.3f}; "
            f"/ raw 1 process = {r['rate'] / raw1:.3f}")
    if not batch_ok:
        add("- the batch row had failed requests (see below): its ratio understates what batch signing gives"
            + ("; the uvloop-disabled control is the meaningful one" if sign.get("batch_asyncio") else ""))
    add("")

    # problems
    add("## Errors, 5xx and oddities seen in this run")
    add("")
    problems = []
    for r in data["transfers"]:
        for kind, entry in r.get("problems", {}).items():
            problems.append(f"- transfers {r['store']} {r['mode']}: {entry['count']} × {kind} — "
                            + "; ".join(f"“{d}”" for d in entry["details"]))
        for name, count in r.get("exceptions", {}).items():
            problems.append(f"- transfers {r['store']} {r['mode']}: {count} client exceptions {name}")
    for r in sign["single"] + [x for x in (sign.get("batch"), sign.get("batch_asyncio")) if x]:
        label = f"sign c{r['concurrency']}" if "batch_size" not in r else f"batch ({r.get('loop')})"
        for kind, entry in r.get("problems", {}).items():
            problems.append(f"- {label}: {entry['count']} × {kind} — " + "; ".join(f"“{d}”" for d in entry["details"]))
        for name, count in r.get("exceptions", {}).items():
            problems.append(f"- {label}: {count} client exceptions {name}")
    for r in sign.get("wrk", []):
        bad = {k: val for k, val in r["statuses"].items() if not k.startswith("2")}
        if bad or r.get("socket_errors") or r.get("error"):
            problems.append(f"- wrk c{r['connections']}: statuses {bad}, socket errors {r.get('socket_errors')}, "
                            f"{r.get('error', '')}")
    per_store = {r["store"]: r for r in data["transfers"]}  # the log count is per server, i.e. per store
    for store, r in per_store.items():
        if r["server_log_problems"]:
            problems.append(f"- server log (transfers, {store}): {r['server_log_problems']} warning/error lines, "
                            f"e.g. `{r['server_log_examples'][0][:300]}`")
    if sign.get("server_log_problems"):
        problems.append(f"- server log (signing, uvloop): {sign['server_log_problems']} warning/error lines, e.g. "
                        f"`{sign['server_log_examples'][0][:300]}`")
    add("\n".join(problems) if problems else "None: every request answered 2xx and the server logged no warnings.")
    details = " ".join(" ".join(entry["details"]) for r in [sign.get("batch") or {}]
                       for entry in r.get("problems", {}).values())
    if "exited" in details or "lost" in details:
        add("")
        add(UVLOOP_PIPE_BUG)
    add("")
    add("Raw results: `bench/last-run.json`.")
    add("")
    return "\n".join(out)


def read_notes(path: Path) -> str:
    if not path.exists():
        return ""
    text = path.read_text(encoding="utf-8")
    if NOTES_BEGIN in text and NOTES_END in text:
        return text.split(NOTES_BEGIN, 1)[1].split(NOTES_END, 1)[0]
    return ""


#: Top-level sections this script writes; any other "## " section of the file (written by
#: bench/evm.py, bench/reconcile.py or by hand) is kept, after ours.
OWN_SECTIONS = ("## Machine and versions", "## Commands", "## Transfers:", "## Raw signing:", "## Errors, 5xx")


def read_foreign_sections(path: Path) -> str:
    if not path.exists():
        return ""
    kept: list[str] = []
    keep = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            keep = not line.startswith(OWN_SECTIONS)
        if keep:
            kept.append(line)
    return "\n".join(kept)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per transfers row")
    parser.add_argument("--sign-duration", type=float, default=5.0, help="seconds per gateway signing row")
    parser.add_argument("--raw-duration", type=float, default=2.0, help="seconds per raw SoftHSM2 row")
    parser.add_argument("--pin", action="store_true", help="pin the client to the last CPU, the server to the rest")
    parser.add_argument("--profile", action="store_true", help="py-spy the server during the spread transfer runs")
    parser.add_argument("--no-wrk", action="store_true")
    parser.add_argument("--asyncio-batch", action="store_true",
                        help="repeat the batch row on a server with uvloop disabled (a control)")
    parser.add_argument("--wait-quiet", type=float, default=10.0,
                        help="wait up to this many seconds for other jobs to leave the CPUs before starting")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    exit_on_sigterm()

    started = time.monotonic()
    use_wrk = not args.no_wrk and ensure_wrk()
    foreign, waited = wait_quiet(args.wait_quiet)
    data: dict[str, Any] = {
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
        "command": ".venv/bin/python bench/run.py" + ("" if argv is None and len(sys.argv) == 1
                                                        else " " + " ".join(sys.argv[1:] if argv is None else argv)),
        "code": code_version(),
        "machine": machine(),
        "versions": versions(),
        "loadavg_start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "foreign_before": foreign,
        "waited_s": waited,
        "pin": args.pin,
        "transfer_duration": args.duration,
        "sign_duration": args.sign_duration,
        "raw_duration": args.raw_duration,
        "transfers": [],
    }
    profile_dir = None
    if args.profile:  # raw stacks go to a temporary directory; the summary goes to the report
        profile_dir = Path(tempfile.mkdtemp(prefix="ecny-bench-pyspy-"))
    for store in ("sqlite", "postgresql"):
        postgres = Postgres() if store == "postgresql" else None
        try:
            for result in transfers.run_store(store, ["spread", "hot"], duration=args.duration, concurrency=16,
                                              payers=64, pin=args.pin, postgres=postgres, profile_dir=profile_dir):
                print(transfers.summary_line(result), flush=True)
                data["transfers"].append(result)
        finally:
            if postgres is not None:
                postgres.stop()
    data["sign"] = raw_sign.run(duration=args.sign_duration, raw_duration=args.raw_duration, use_wrk=use_wrk,
                                pin=args.pin, asyncio_batch=args.asyncio_batch)
    if profile_dir is not None:
        shutil.rmtree(profile_dir, ignore_errors=True)
    data["runtime_s"] = time.monotonic() - started
    (ROOT / "bench" / "last-run.json").write_text(json.dumps(data, indent=2, default=str))
    notes = read_notes(args.output)
    text = report(data, notes)
    foreign = read_foreign_sections(args.output)
    if foreign:
        text = text.rstrip("\n") + "\n\n" + foreign + "\n"
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output} ({data['runtime_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
