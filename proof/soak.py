"""Soak: a bounded mixed load on loopback for N minutes; RSS must stay flat and no response may be
an error other than the deliberate ones. Run by `make proof` (not CI: it takes ten minutes).

    .venv/bin/python proof/soak.py --minutes 10 [--report docs/reliability.md]

The gateway runs as its own process (`ecny-gateway serve`, provisioned by `dev-init`) with a fresh
SoftHSM2 token; the load is raw signatures, batches and transfers from 8 concurrent clients, plus
a trickle of deliberately bad requests (400/404/422) that must be answered as such.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.procs import GatewayProcess  # noqa: E402


def rss_kib(pid: int) -> int:
    """VmRSS of a process and its children (the signer workers)."""
    total = 0
    pids = [pid]
    try:
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        pids += [int(p) for p in children]
    except OSError:
        pass
    for one in pids:
        try:
            for line in Path(f"/proc/{one}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


async def soak(gateway: GatewayProcess, credentials: dict[str, object], minutes: float) -> dict[str, object]:
    backend = {"Authorization": f"Bearer {credentials['backend_api_key']}"}
    users = credentials["users"]
    assert isinstance(users, dict)
    deadline = time.monotonic() + minutes * 60
    statuses: Counter[str] = Counter()
    unexpected: list[str] = []
    rss: list[tuple[float, int]] = []
    assert gateway.process is not None
    pid = gateway.process.pid
    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.url + "/v1/sessions",
                                json={"username": "teller1", "password": users["teller1"]}) as r:
            teller = {"Authorization": f"Bearer {(await r.json())['token']}"}
        async with session.post(gateway.url + "/v1/sessions",
                                json={"username": "supervisor1", "password": users["supervisor1"]}) as r:
            supervisor = {"Authorization": f"Bearer {(await r.json())['token']}"}

        async def approve(approval: dict[str, object]) -> None:
            """Dual control: the tier-1 upgrade and the large cash-in wait for a second person."""
            async with session.post(f"{gateway.url}/v1/approvals/{approval['approval_id']}/approve", headers=supervisor,
                                    json={"payload_hash": approval["payload_hash"], "note": "soak"}) as r:
                assert r.status == 200, await r.text()

        async with session.get(gateway.url + "/v1/keys", headers=backend) as r:
            raw = next(k for k in (await r.json())["keys"] if k["label"] == "raw-p256")["key_id"]
        wallets = []
        for i in range(16):
            async with session.post(gateway.url + "/v1/wallets", headers=teller, json={
                    "holder_name": f"Soak {i}", "phone": "13800000000", "tier": 1, "kind": "personal"}) as r:
                opened = await r.json()
                wallets.append(opened["wallet_id"])
            if opened.get("tier_approval"):
                await approve(opened["tier_approval"])
            async with session.post(f"{gateway.url}/v1/wallets/{wallets[-1]}/cash-in", headers={
                    **teller, "Idempotency-Key": uuid.uuid4().hex}, json={"amount_fen": 10**12}) as r:
                assert r.status in (200, 202), await r.text()
                if r.status == 202:
                    await approve(await r.json())

        async def client(index: int) -> None:
            rng = random.Random(index)
            n = 0
            while time.monotonic() < deadline:
                n += 1
                kind = rng.random()
                expected = {200, 201}
                if kind < 0.5:
                    method, url = "POST", f"{gateway.url}/v1/keys/{raw}/sign"
                    body: object = {"digest": hashlib.sha256(f"{index}-{n}".encode()).hexdigest()}
                elif kind < 0.6:
                    method, url = "POST", f"{gateway.url}/v1/sign/batch"
                    body = {"key_id": raw, "digests": [hashlib.sha256(f"{index}-{n}-{i}".encode()).hexdigest()
                                                       for i in range(50)]}
                elif kind < 0.97:
                    source, target = rng.sample(wallets, 2)
                    method, url = "POST", f"{gateway.url}/v1/transfers"
                    body = {"from_wallet": source, "to_wallet": target, "amount_fen": rng.randint(1, 1000)}
                else:  # deliberate refusals: bad digest (400), unknown key (404), tier-4-free overdraft (422)
                    choice = rng.choice([("sign-bad", 400), ("unknown", 404), ("overdraft", 422)])
                    expected = {choice[1]}
                    if choice[0] == "sign-bad":
                        method, url, body = "POST", f"{gateway.url}/v1/keys/{raw}/sign", {"digest": "zz"}
                    elif choice[0] == "unknown":
                        method, url, body = "GET", f"{gateway.url}/v1/keys/{'0' * 32}", None
                    else:
                        method, url = "POST", f"{gateway.url}/v1/transfers"
                        body = {"from_wallet": wallets[0], "to_wallet": wallets[1], "amount_fen": 10**15}
                headers = {**backend, "Idempotency-Key": uuid.uuid4().hex}
                try:
                    async with session.request(method, url, json=body, headers=headers) as response:
                        await response.read()
                        statuses[str(response.status)] += 1
                        if response.status not in expected:
                            unexpected.append(f"{method} {url.split('/v1/')[-1][:40]} → {response.status}")
                except aiohttp.ClientError as exc:
                    statuses["client-error"] += 1
                    unexpected.append(f"{method} {url}: {exc!r}")

        async def sampler() -> None:
            start = time.monotonic()
            while time.monotonic() < deadline:
                rss.append((time.monotonic() - start, rss_kib(pid)))
                await asyncio.sleep(10)

        await asyncio.gather(sampler(), *(client(i) for i in range(8)))
    warm = [k for t, k in rss if t >= 60] or [k for _, k in rss]
    growth = (warm[-1] - warm[0]) / warm[0] if warm else 0.0
    return {
        "minutes": minutes,
        "requests": sum(statuses.values()),
        "statuses": dict(statuses),
        "unexpected": unexpected[:20],
        "unexpected_count": len(unexpected),
        "rss_kib_after_1_min": warm[0] if warm else None,
        "rss_kib_end": warm[-1] if warm else None,
        "rss_growth": round(growth, 4),
        "rss_samples": rss,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--report", type=Path, help="write the result as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        token_dir = Path(tmp) / "hsm"
        conf = subprocess.run([str(ROOT / "softhsm" / "init-token.sh"), str(token_dir), "soak"], check=True,
                              capture_output=True, text=True).stdout.strip()
        gateway = GatewayProcess(Path(tmp) / "var", Path(conf), "soak", token_dir / "soak.user-pin",
                                 f"sqlite:///{tmp}/gw.db")
        # The soak drives everything with one backend key and funds its wallets with one large cash-in each:
        # it measures endurance, not the per-principal limit or dual control (tests/security/ prove those).
        gateway.env["ECNY_SERVER__RATE_LIMIT_PER_SECOND"] = "0"
        gateway.env["ECNY_APPROVALS__CASH_IN_THRESHOLD_FEN"] = str(2**63 - 1)
        credentials = gateway.provision()
        gateway.start()
        try:
            result = asyncio.run(soak(gateway, credentials, args.minutes))
        finally:
            gateway.stop()
        ledger = gateway.cli("ledger", "check")
        audit = gateway.cli("audit", "verify")
        result["ledger_check"] = ledger.stdout.strip().splitlines()[-1]
        result["audit_verify"] = audit.stdout.strip().splitlines()[-1]
        ok = (result["unexpected_count"] == 0 and float(str(result["rss_growth"])) < 0.10
              and ledger.returncode == 0 and audit.returncode == 0)
        result["ok"] = ok
    text = json.dumps(result, indent=2)
    print(text)
    if args.report:
        args.report.write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
