"""Raw signing through the gateway, against the raw SoftHSM2 rate measured in the same run.

    .venv/bin/python bench/raw_sign.py [--duration 8] [--raw-duration 3] [--no-wrk] [--pin] [--json FILE]

Phases, all on one gateway (SQLite store, 2 signer workers: the softhsm profile's default) and one
token, key ``raw-p256`` (ECDSA P-256, usage raw):

1. POST /v1/keys/{id}/sign, one random 32-byte digest per request, Python aiohttp client in a
   spawned process, 16 and then 64 concurrent connections (connection pool = concurrency);
2. the same with ``wrk`` (Debian package) and a Lua script, 16 and 64 connections, if wrk is installed;
3. POST /v1/sign/batch with 100 digests per request, 16 concurrent connections;
4. python-pkcs11 directly on the same token, in 1 and in 2 spawned processes, each with one kept
   logged-in session and the key handle looked up once, ``Mechanism.ECDSA`` on a 32-byte digest.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    NCPU,
    TOKEN_LABEL,
    Gateway,
    LoadSpec,
    affinity_plan,
    exit_on_sigterm,
    machine_busy_seconds,
    run_load,
    start_gateway,
)

KEY_LABEL = "raw-p256"

WRK_SCRIPT = """
-- POST /v1/keys/{id}/sign with a fresh random 32-byte digest per request.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(api_key)s"
local path = "/v1/keys/%(key_id)s/sign"
local hexdigits = "0123456789abcdef"
math.randomseed(os.time())

request = function()
  local t = {}
  for i = 1, 64 do
    local n = math.random(1, 16)
    t[i] = hexdigits:sub(n, n)
  end
  return wrk.format(nil, path, nil, '{"digest":"' .. table.concat(t) .. '"}')
end

statuses = {}
response = function(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

local threads = {}
setup = function(thread)
  table.insert(threads, thread)
end

done = function(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    local s = thread:get("statuses")
    for code, count in pairs(s) do
      total[code] = (total[code] or 0) + count
    end
  end
  local parts = {}
  for code, count in pairs(total) do
    table.insert(parts, '"' .. code .. '":' .. count)
  end
  io.write("STATUSES {" .. table.concat(parts, ",") .. "}\\n")
  io.write(string.format("PCT %%.0f %%.0f %%.0f %%.0f\\n", latency:percentile(50), latency:percentile(90),
                         latency:percentile(99), latency.max))
end
"""


# --- raw SoftHSM through python-pkcs11 -----------------------------------------------------


def _raw_worker(conf: str, pin_file: str, label: str, duration: float, ready: Any, go: Any, out: Any) -> None:
    os.environ["SOFTHSM2_CONF"] = conf
    import pkcs11
    from pkcs11 import Mechanism, ObjectClass

    lib = pkcs11.lib("/usr/lib/softhsm/libsofthsm2.so")
    token = lib.get_token(token_label=TOKEN_LABEL)
    pin = Path(pin_file).read_text().strip()
    with token.open(user_pin=pin) as session:
        key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)
        digests = [os.urandom(32) for _ in range(1024)]
        key.sign(digests[0], mechanism=Mechanism.ECDSA)  # warm
        ready.set()
        go.wait()
        count = 0
        start = time.perf_counter()
        deadline = start + duration
        cpu0 = time.process_time()
        while True:
            for digest in digests[:64]:
                key.sign(digest, mechanism=Mechanism.ECDSA)
            count += 64
            if time.perf_counter() >= deadline:
                break
            digests.append(digests.pop(0))
        out.put((count, time.perf_counter() - start, time.process_time() - cpu0))


def raw_hsm_rate(gateway: Gateway, processes: int, duration: float) -> dict[str, Any]:
    """Signatures per second straight from SoftHSM2 in ``processes`` spawned processes."""
    context = multiprocessing.get_context("spawn")
    ready = [context.Event() for _ in range(processes)]
    go = context.Event()
    out = context.Queue()
    pin_file = str(gateway.base / "hsm" / f"{TOKEN_LABEL}.user-pin")
    workers = [context.Process(target=_raw_worker, args=(str(gateway.conf), pin_file, KEY_LABEL, duration,
                                                        ready[i], go, out), daemon=True)
               for i in range(processes)]
    for worker in workers:
        worker.start()
    for event in ready:
        if not event.wait(30):
            raise RuntimeError("raw HSM worker did not get ready")
    busy_before = machine_busy_seconds()
    go.set()
    results = [out.get(timeout=duration + 30) for _ in workers]
    busy = machine_busy_seconds() - busy_before
    for worker in workers:
        worker.join(10)
    total = sum(count for count, _, _ in results)
    wall = max(elapsed for _, elapsed, _ in results)
    cpu = sum(cpu for _, _, cpu in results)
    return {"processes": processes, "signatures": total, "wall_s": wall, "rate": total / wall, "cpu_s": cpu,
            "other_cpu_s": max(0.0, busy - cpu)}


# --- wrk ------------------------------------------------------------------------------------


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        return float("nan")
    value, unit = float(match.group(1)), match.group(2)
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def run_wrk(gateway: Gateway, key_id: str, connections: int, duration: float, threads: int = 2) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="ecny-wrk-"))
    try:
        script = workdir / "sign.lua"
        script.write_text(WRK_SCRIPT % {"api_key": gateway.credentials["backend_api_key"], "key_id": key_id})
        script.chmod(0o600)
        command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{int(duration)}s", "--latency",
                   "-s", str(script), gateway.url]
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy_before = machine_busy_seconds()
        cpu_before = gateway.cpu_seconds()
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60)
        wall = time.perf_counter() - started
        cpu = gateway.cpu_seconds() - cpu_before
        busy = machine_busy_seconds() - busy_before
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    output = result.stdout
    parsed: dict[str, Any] = {"connections": connections, "threads": threads, "raw_output": output.strip(),
                              "command": " ".join(command[:-3]) + " -s sign.lua " + gateway.url}
    match = re.search(r"Requests/sec:\s+([\d.]+)", output)
    parsed["rate"] = float(match.group(1)) if match else float("nan")
    match = re.search(r"(\d+) requests in ([\d.]+)(\w+)", output)
    parsed["requests"] = int(match.group(1)) if match else 0
    match = re.search(r"STATUSES (\{.*\})", output)
    parsed["statuses"] = json.loads(match.group(1)) if match else {}
    match = re.search(r"PCT ([\d.]+) ([\d.]+) ([\d.]+) ([\d.]+)", output)
    if match:  # wrk reports microseconds
        parsed["p50_ms"], parsed["p90_ms"], parsed["p99_ms"], parsed["max_ms"] = (
            float(match.group(i)) / 1000 for i in range(1, 5))
    match = re.search(r"Socket errors: (.*)", output)
    parsed["socket_errors"] = match.group(1).strip() if match else ""
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    parsed["non_2xx"] = int(match.group(1)) if match else 0
    parsed["server_cpu_s"] = cpu
    parsed["server_cpu_ms_per_request"] = 1000 * cpu / parsed["requests"] if parsed["requests"] else None
    parsed["server_cpu_utilisation"] = cpu / wall / NCPU
    parsed["client_cpu_s"] = (children_after.ru_utime + children_after.ru_stime
                              - children_before.ru_utime - children_before.ru_stime)
    parsed["wall_s"] = wall
    parsed["other_cpu_s"] = max(0.0, busy - cpu - parsed["client_cpu_s"])
    parsed["machine_busy_fraction"] = busy / wall / NCPU
    parsed["server_rss"] = gateway.rss()
    if result.returncode != 0:
        parsed["error"] = result.stderr.strip()
    return parsed


# --- the whole benchmark -------------------------------------------------------------------


def _raw_round(gateway: Gateway, duration: float, when: str) -> list[dict[str, Any]]:
    rounds = []
    for n in (1, 2):
        entry = raw_hsm_rate(gateway, n, duration)
        entry["when"] = when
        rounds.append(entry)
        print(f"raw SoftHSM2  {n} process(es) ({when})  {entry['rate']:8.0f} sig/s  "
              f"foreign CPU {entry['other_cpu_s'] / entry['wall_s']:.2f} cores", flush=True)
    return rounds


def _batch(gateway: Gateway, duration: float, client_cpus: set[int] | None) -> dict[str, Any]:
    spec = LoadSpec(url=gateway.url, kind="batch", concurrency=16, duration=duration, batch_size=100,
                    headers=gateway.backend(), key_id=gateway.keys[KEY_LABEL], cpus=client_cpus)
    batch = run_load(spec, gateway)
    batch["concurrency"] = 16
    batch["batch_size"] = 100
    batch["loop"] = gateway.loop
    batch["signatures_per_s"] = batch["ok_rate"] * 100
    batch["server_cpu_ms_per_signature"] = (batch["server_cpu_ms_per_request"] or 0) / 100
    print(f"batch x100 {gateway.loop:7} c16 {batch['ok_rate']:6.0f} req/s = {batch['signatures_per_s']:6.0f} sig/s  "
          f"p50 {batch['p50_ms']:.1f} ms  p99 {batch['p99_ms']:.1f} ms  statuses {batch['statuses']}", flush=True)
    return batch


def run(*, duration: float, raw_duration: float, use_wrk: bool, pin: bool, asyncio_batch: bool = False
        ) -> dict[str, Any]:
    server_cpus, client_cpus = affinity_plan(pin)
    gateway = start_gateway("sqlite", cpus=server_cpus)
    results: dict[str, Any] = {"server_cpus": sorted(server_cpus) if server_cpus else "all",
                               "client_cpus": sorted(client_cpus) if client_cpus else "all",
                               "server_command": gateway.command}
    try:
        key_id = gateway.keys[KEY_LABEL]
        results["server_rss_idle"] = gateway.rss()
        results["raw"] = _raw_round(gateway, raw_duration, "before")
        results["single"] = []
        for concurrency in (16, 64):
            spec = LoadSpec(url=gateway.url, kind="sign", concurrency=concurrency, duration=duration,
                            headers=gateway.backend(), key_id=key_id, cpus=client_cpus)
            result = run_load(spec, gateway)
            result["concurrency"] = concurrency
            results["single"].append(result)
            print(f"sign (aiohttp) c{concurrency:<3} {result['ok_rate']:8.0f}/s  p50 {result['p50_ms']:.1f} ms  "
                  f"p99 {result['p99_ms']:.1f} ms  statuses {result['statuses']}  exc {result['exceptions']}",
                  flush=True)
        results["wrk"] = []
        if use_wrk and shutil.which("wrk"):
            for concurrency in (16, 64):
                result = run_wrk(gateway, key_id, concurrency, duration)
                results["wrk"].append(result)
                print(f"sign (wrk)     c{concurrency:<3} {result['rate']:8.0f}/s  p50 {result.get('p50_ms', 0):.1f} ms"
                      f"  p99 {result.get('p99_ms', 0):.1f} ms  statuses {result['statuses']}  "
                      f"socket errors {result['socket_errors'] or 0}", flush=True)
        results["batch"] = _batch(gateway, duration, client_cpus)
        # Raw rate again at the end: on a shared machine one measurement can fall into someone's build.
        results["raw_after"] = _raw_round(gateway, raw_duration, "after")
        problems = gateway.log_problems()
        results["server_log_problems"] = len(problems)
        results["server_log_examples"] = problems[:5]
        results["workers"] = gateway.rss()["processes"]
    finally:
        gateway.cleanup()
    if asyncio_batch:
        # The same batch load on a server whose event loop is plain asyncio (uvloop made unimportable),
        # a control for loop-specific failures: under uvloop the signer pool's pipes once became
        # non-blocking and batch signing answered 503 (fixed in a4887f6).
        gateway = start_gateway("sqlite", cpus=server_cpus, loop="asyncio")
        try:
            results["batch_asyncio"] = _batch(gateway, duration, client_cpus)
            results["batch_asyncio"]["server_command"] = gateway.command
            problems = gateway.log_problems()
            results["batch_asyncio"]["server_log_problems"] = len(problems)
        finally:
            gateway.cleanup()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per gateway phase")
    parser.add_argument("--raw-duration", type=float, default=3.0, help="seconds per raw SoftHSM2 phase")
    parser.add_argument("--no-wrk", action="store_true")
    parser.add_argument("--asyncio-batch", action="store_true",
                        help="repeat the batch row on a server with uvloop disabled (a control)")
    parser.add_argument("--pin", action="store_true", help="pin the client to the last CPU, the server to the rest")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    exit_on_sigterm()
    results = run(duration=args.duration, raw_duration=args.raw_duration, use_wrk=not args.no_wrk, pin=args.pin,
                  asyncio_batch=args.asyncio_batch)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
