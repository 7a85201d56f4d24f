"""Where a single signature's machine time goes: the same endpoint with the HSM step and/or the audit
entry taken out, same wrk client, same run.

    .venv/bin/python bench/decompose.py [--duration 5] [--concurrency 1,16,64] [--processes 2]

A gateway that skips its audit entry must never exist, so the switch is not in the gateway: this
script copies ``gateway/`` to a temporary directory, patches the copy's single raw signature
(``gateway/operations/raw.py``, behind ``POST /v1/keys/{id}/sign``) to read ``BENCH_SKIP``
(``sign``: answer 64 zero bytes instead of calling the signer; ``audit``: do not record the entry), and
runs ``ecny-gateway serve`` with the copy first on ``PYTHONPATH``. Before each load it proves the copy
is the one running: a skipped signature comes back as zeros, a skipped audit entry leaves ``audit_log``
as long as it was.

Four variants, each with its own token and database: ``full`` (what ships), ``no-hsm``,
``no-audit``, ``neither`` (HTTP, authentication, parsing, key look-up, metrics, the answer).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import machine, start_gateway, versions  # noqa: E402
from openbao import GATEWAY_LUA, run_wrk  # noqa: E402

SIGN_CALL = "signature = await self.signer.sign(record.key_id, record.algorithm.value, item)"
AUDIT_CALL = "_, recorded = await self.audit.record_with(entry, answer_in, signed_by=(record.key_id, Usage.RAW))"
SKIPPED = {SIGN_CALL: ("sign", "signature = bytes(64)"), AUDIT_CALL: ("audit", "recorded = True")}
VARIANTS = {"full": "", "no-hsm": "sign", "no-audit": "audit", "neither": "sign,audit"}


def patched_copy(into: Path) -> Path:
    """``gateway/`` (its HSM profiles included) copied under ``into``, the single raw signature
    (gateway/operations/raw.py) patched; returns the directory to put on PYTHONPATH."""
    shutil.copytree(ROOT / "gateway", into / "gateway", ignore=shutil.ignore_patterns("__pycache__"))
    module = into / "gateway" / "operations" / "raw.py"
    lines = module.read_text(encoding="utf-8").splitlines(keepends=True)
    for call, (switch, instead) in SKIPPED.items():
        found = [i for i, line in enumerate(lines) if line.strip() == call]
        if len(found) != 1:
            raise SystemExit(f"gateway/operations/raw.py: expected the line {call!r} once; update decompose.py")
        indent = lines[found[0]][: len(lines[found[0]]) - len(lines[found[0]].lstrip())]
        lines[found[0]] = (f"{indent}if {switch!r} in __import__('os').environ.get('BENCH_SKIP', ''):\n"
                           f"{indent}    {instead}\n{indent}else:\n{indent}    {call}\n")
    module.write_text("".join(lines), encoding="utf-8")
    return into


def audit_rows(database: Path) -> int:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        (count,) = connection.execute("SELECT count(*) FROM audit_log").fetchone()
    return int(count)


def prove_variant(gateway: Any, key_id: str, skip: str) -> None:
    """One request: the answer and the audit table show that the patched copy is running."""
    before = audit_rows(gateway.base / "gateway.db")
    status, answer = gateway.request("POST", f"/v1/keys/{key_id}/sign", {"digest": "ab" * 32},
                                     headers=gateway.backend())
    after = audit_rows(gateway.base / "gateway.db")
    zero = answer.get("signature") == "00" * 64 if status == 200 else False
    if status != 200 or zero != ("sign" in skip) or (after == before) != ("audit" in skip):
        raise SystemExit(f"variant {skip or 'full'!r} not in effect: status {status}, zero signature {zero}, "
                         f"audit rows {before} -> {after}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--processes", type=int, default=2, help="[server] processes of the gateway")
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    source = Path(tempfile.mkdtemp(prefix="ecny-decompose-"))
    rows: list[dict[str, Any]] = []
    saved = os.environ.get("PYTHONPATH")
    try:
        os.environ["PYTHONPATH"] = str(patched_copy(source))
        # With [server] processes > 1 the children run `python -m gateway.cli`, which puts the
        # working directory first on sys.path: run them from the copy too.
        os.chdir(source)
        for name, skip in VARIANTS.items():
            os.environ["BENCH_SKIP"] = skip
            gateway = start_gateway("sqlite", processes=args.processes)
            try:
                key_id = gateway.keys["raw-p256"]
                prove_variant(gateway, key_id, skip)
                lua = GATEWAY_LUA % {"api_key": gateway.credentials["backend_api_key"], "key_id": key_id}
                run_wrk(gateway.url, lua, 16, 2)  # warm-up, not counted
                for connections in concurrencies:
                    cpu0, wall0 = gateway.cpu_seconds(), time.monotonic()
                    row = run_wrk(gateway.url, lua, connections, args.duration)
                    cpu, wall = gateway.cpu_seconds() - cpu0, time.monotonic() - wall0
                    row.update(variant=name, cores=cpu / wall, cpu_ms=1000 * cpu / (row["rate"] * wall))
                    rows.append(row)
                    print(f"{name:9} c{connections:<3} {row['rate']:7.0f} req/s  p99 {row['p99_ms']:.1f} ms  "
                          f"server {row['cores']:.2f} cores, {row['cpu_ms']:.3f} ms/request  "
                          f"non-2xx {row['non_2xx']}", flush=True)
            finally:
                gateway.cleanup()
    finally:
        os.chdir(ROOT)
        os.environ.pop("BENCH_SKIP", None)
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
        shutil.rmtree(source, ignore_errors=True)
    print(markdown(rows, args, concurrencies))
    return 0


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, concurrencies: list[int]) -> str:
    info, ver = machine(), versions()
    lines = [
        f"`.venv/bin/python bench/decompose.py --duration {args.duration:g} --concurrency {args.concurrency} "
        f"--processes {args.processes}` on {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} (UTC); "
        f"{info['nproc']} CPUs, Python {ver.get('python', '?')}, aiohttp {ver.get('aiohttp', '?')}.",
        "",
        "| variant | " + " | ".join(f"c{c} req/s (server ms/request)" for c in concurrencies) + " |",
        "|---|" + "---|" * len(concurrencies),
    ]
    for name in VARIANTS:
        cells = [next(f"{r['rate']:,.0f} ({r['cpu_ms']:.3f})" for r in rows
                      if r["variant"] == name and r["connections"] == c) for c in concurrencies]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
