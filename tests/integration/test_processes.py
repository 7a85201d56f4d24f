"""``[server] processes = 2``: one port, two HTTP processes on one SQLite file (gateway.supervisor).

Proven here against a real token and the real ``serve`` command: both processes take connections;
transfers racing through both against one balance never overdraw; EVM nonces for one address are
exactly 0..59; ``/metrics`` counts the requests of both processes; a child killed with SIGKILL is
replaced and service goes on; SIGTERM stops everything cleanly; the ledger and the audit chain
(written by three processes in turn) check out afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import ROOT, Token
from tests.procs import GatewayProcess, check_gap_free_nonces, post_json

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]

LABEL = "ecny-processes"


def _children(pid: int) -> list[int]:
    """The HTTP processes of a supervisor: its children started with ``--child``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"--child" in cmdline:
            found.append(int(entry))
    return sorted(found)


def _listening(pid: int, port: int) -> bool:
    """Whether process ``pid`` has a socket listening on ``port`` (its own, in the SO_REUSEPORT group)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A = LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def _metrics_dir(pid: int) -> Path:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    value = next(item for item in environ if item.startswith(b"PROMETHEUS_MULTIPROC_DIR="))
    return Path(value.split(b"=", 1)[1].decode())


def _wait_for(predicate: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _risk_events_once_drained(db: Path) -> dict[str, float]:
    def drained() -> dict[str, float] | None:
        with sqlite3.connect(db) as connection:
            pending = connection.execute("SELECT (SELECT COUNT(*) FROM risk_outbox) + "
                                         "(SELECT COUNT(*) FROM risk_signals WHERE evaluated = 0)").fetchone()[0]
            rows = connection.execute("SELECT rule, COUNT(*) FROM risk_events GROUP BY rule").fetchall()
        return None if pending else {rule: float(n) for rule, n in rows}

    found: dict[str, float] = _wait_for(drained)
    return found


def _risk_counts(url: str, headers: dict[str, str]) -> dict[str, float]:
    request = urllib.request.Request(f"{url}/metrics", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    counts: dict[str, float] = {}
    for rule, value in re.findall(r'ecny_risk_events_total\{rule="([a-z_]+)",severity="[a-z]+"\} ([0-9.e+]+)', text):
        counts[rule] = counts.get(rule, 0.0) + float(value)
    return counts


def test_two_http_processes_on_one_sqlite_file(softhsm_token: Token, tmp_path: Path) -> None:
    subprocess.run([str(ROOT / "softhsm" / "init-token.sh"), str(softhsm_token.directory), LABEL], check=True,
                   capture_output=True)
    pin = softhsm_token.directory / f"{LABEL}.user-pin"
    gateway = GatewayProcess(tmp_path / "g", softhsm_token.conf, LABEL, pin, f"sqlite:///{tmp_path / 'g.db'}",
                             processes=2)
    credentials = gateway.provision()
    backend = {"Authorization": f"Bearer {credentials['backend_api_key']}"}
    gateway.start()
    assert gateway.process is not None
    supervisor = gateway.process.pid
    children = _wait_for(lambda: (found := _children(supervisor)) and len(found) == 2 and found)
    # /readyz answered from the first child up; the second may still be starting its signer workers.
    _wait_for(lambda: all(_listening(pid, gateway.port) for pid in children))
    metrics_dir = _metrics_dir(children[0])
    try:
        async def scenario() -> dict[str, Any]:
            # Many connections, so that the kernel's SO_REUSEPORT hash spreads them over both processes.
            connector = aiohttp.TCPConnector(limit=100, force_close=True)
            async with aiohttp.ClientSession(connector=connector) as session:
                async with session.post(gateway.url + "/v1/sessions", json={
                        "username": "teller1", "password": credentials["users"]["teller1"]}) as response:
                    teller = {"Authorization": f"Bearer {(await response.json())['token']}"}
                wallets = []
                for _ in range(2):
                    async with session.post(gateway.url + "/v1/wallets", headers=teller, json={
                            "holder_name": "Shared", "phone": "13800000000", "tier": 2, "kind": "personal"}) as r:
                        wallets.append((await r.json())["wallet_id"])
                poor, payee = wallets
                assert (await post_json(session, f"{gateway.url}/v1/wallets/{poor}/cash-in", teller,
                                    {"amount_fen": 20 * 1_000}))[0] == 200
                # 60 transfers of ¥10 from a wallet holding ¥200 through both processes: exactly 20 pass.
                overdraw = await asyncio.gather(*(
                    post_json(session, f"{gateway.url}/v1/transfers", backend,
                          {"from_wallet": poor, "to_wallet": payee, "amount_fen": 1_000}) for _ in range(60)))
                statuses = sorted(s for s, _ in overdraw)
                assert statuses.count(201) == 20, statuses
                assert {body["type"].rsplit("/", 1)[-1] for s, body in overdraw if s != 201} == {"insufficient-funds"}
                async with session.get(f"{gateway.url}/v1/wallets/{poor}", headers=teller) as r:
                    assert (await r.json())["balance_fen"] == 0
                # 60 EVM signings for one address at once: nonces exactly 0..59.
                await check_gap_free_nonces(session, [gateway.url], backend)
                async with session.get(gateway.url + "/metrics", headers=backend) as r:
                    return {"metrics": await r.text()}

        metrics = asyncio.run(scenario())["metrics"]
        # Both processes answered requests: each keeps its counters in its own file in the shared directory.
        for pid in children:
            assert (metrics_dir / f"counter_{pid}.db").exists(), sorted(p.name for p in metrics_dir.iterdir())
        # ... and /metrics adds them up, whichever process answers the scrape.
        transfers = {
            status: float(value)
            for status, value in re.findall(
                r'ecny_http_requests_total\{endpoint="POST /v1/transfers",status="(\d+)"\} ([0-9.e+]+)', metrics)
        }
        assert transfers == {"201": 20.0, "422": 40.0}, transfers
        # The 40 refusals are risk signals, evaluated in the evaluator process of the first child: once the
        # outbox is drained, /metrics counts each stored event once (the evaluator writes no counts of its own
        # into the shared directory; its HTTP process counts what it reports).
        stored = _risk_events_once_drained(tmp_path / "g.db")
        assert stored.get("repeated_refusals"), stored
        counted = _wait_for(lambda: (found := _risk_counts(gateway.url, backend)) == stored and found)
        assert counted == stored

        # A child killed with SIGKILL is replaced, and the port answers as before.
        os.kill(children[0], signal.SIGKILL)
        replaced = _wait_for(lambda: (found := _children(supervisor)) and len(found) == 2
                             and children[0] not in found and found)
        assert children[1] in replaced
        _wait_for(lambda: _ready(gateway.url))
        for _ in range(20):  # new connections each time, hashed over both processes
            request = urllib.request.Request(f"{gateway.url}/v1/keys", headers=backend)
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 200
    finally:
        assert gateway.process is not None
        gateway.process.send_signal(signal.SIGTERM)
        code = gateway.process.wait(timeout=60)
        gateway.process = None
    assert code == 0
    assert not _children(supervisor)
    assert not metrics_dir.exists()  # the supervisor removes its metrics directory
    check = gateway.cli("ledger", "check")
    assert check.returncode == 0, check.stdout + check.stderr
    audit = gateway.cli("audit", "verify", "--witness", str(gateway.witness))
    assert audit.returncode == 0, audit.stdout + audit.stderr


def _signals_pending(db: Path) -> int:
    """Signals committed and not evaluated yet (in the outbox, or read from it and not evaluated)."""
    with sqlite3.connect(db) as connection:
        pending: int = connection.execute("SELECT (SELECT COUNT(*) FROM risk_outbox) + "
                                          "(SELECT COUNT(*) FROM risk_signals WHERE evaluated = 0)").fetchone()[0]
    return pending


def _signals_committed(db: Path) -> int:
    with sqlite3.connect(db) as connection:
        count: int = connection.execute("SELECT (SELECT COUNT(*) FROM risk_outbox) + "
                                        "(SELECT COUNT(*) FROM risk_signals)").fetchone()[0]
    return count


def test_every_http_process_nudges_the_risk_evaluator(softhsm_token: Token, tmp_path: Path) -> None:
    """Signals committed by an HTTP process other than the first reached the risk evaluator only at its poll:
    the evaluator was nudged by the process that spawned it alone. With that first process stalled (SIGSTOP)
    and a 60 s poll, a cash-in answered by the second process is evaluated within seconds: its nudge goes
    straight to the evaluator's socket."""
    subprocess.run([str(ROOT / "softhsm" / "init-token.sh"), str(softhsm_token.directory), LABEL], check=True,
                   capture_output=True)
    pin = softhsm_token.directory / f"{LABEL}.user-pin"
    db = tmp_path / "g.db"
    gateway = GatewayProcess(tmp_path / "g", softhsm_token.conf, LABEL, pin, f"sqlite:///{db}", processes=2)
    gateway.env["ECNY_RISK__POLL_SECONDS"] = "60"
    credentials = gateway.provision()
    gateway.start()
    assert gateway.process is not None
    supervisor = gateway.process.pid
    children = _wait_for(lambda: (found := _children(supervisor)) and len(found) == 2 and found)
    _wait_for(lambda: all(_listening(pid, gateway.port) for pid in children))
    stopped = False
    try:
        session = _post(gateway.url + "/v1/sessions", {}, {"username": "teller1",
                                                         "password": credentials["users"]["teller1"]})
        teller = {"Authorization": f"Bearer {session['token']}"}
        wallet_id = _post(gateway.url + "/v1/wallets", teller, {"holder_name": "Nudged", "phone": "13800000000",
                                                                "tier": 2, "kind": "personal"})["wallet_id"]
        _wait_for(lambda: _signals_pending(db) == 0, timeout=20)  # what the first process committed and nudged
        # Quiet: a nudge the first process sent during that evaluation runs one more (after settle_seconds,
        # 0.2 s); after it the evaluator waits for a nudge or its 60 s poll.
        time.sleep(2)
        committed = _signals_committed(db)
        os.kill(children[0], signal.SIGSTOP)
        stopped = True
        # New connections until one reaches the second process (the first keeps them unanswered); one
        # Idempotency-Key, so the attempts the first process reads once it runs again change nothing.
        headers = {**teller, "Idempotency-Key": "nudge-1"}
        _wait_for(lambda: _post(gateway.url + f"/v1/wallets/{wallet_id}/cash-in", headers, {"amount_fen": 100},
                                timeout=1.5, quiet=True), timeout=30)
        assert _signals_committed(db) == committed + 1  # the cash-in's signal, committed by the second process
        _wait_for(lambda: _signals_pending(db) == 0, timeout=10)  # far below the 60 s poll
    finally:
        if stopped:
            os.kill(children[0], signal.SIGCONT)
        gateway.stop()
    check = gateway.cli("ledger", "check")
    assert check.returncode == 0, check.stdout + check.stderr


def _post(url: str, headers: dict[str, str], body: dict[str, Any], timeout: float = 10,
          quiet: bool = False) -> Any:
    """POST JSON; with ``quiet``, None instead of an error when no answer comes in ``timeout``."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={**headers, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except OSError:
        if quiet:
            return None
        raise
