"""Crash safety of the risk outbox: kill -9 a real gateway between the commit of decisions and their
evaluation, restart it, and every finding is stored exactly once — nothing lost, nothing doubled.

1. The gateway runs with its monitor off (``ECNY_RISK__MONITOR=false``): twelve refused transfers commit
   their signals, none is evaluated; kill -9.
2. Restarted with the monitor on, it evaluates the twelve: a ``repeated_refusals`` event appears.
3. Thirteen more refusals, kill -9 right after the last answer (the monitor is evaluating or about to),
   restart, let it drain.

Afterwards: no signal left unevaluated, no event id twice, and every refusal cited by exactly one
``repeated_refusals`` event (but the last few, fewer than the rule's five, that no event covers yet).
"""

from __future__ import annotations

import asyncio
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import ROOT, Token
from tests.procs import GatewayProcess

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]

LABEL = "ecny-risk-crash"
MIN_COUNT = 5  # [risk.refusals] min_count, the default


async def _json(session: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str],
                body: Any = None) -> Any:
    async with session.request(method, url, json=body, headers=headers) as response:
        assert response.status < 300, (response.status, await response.text())
        return await response.json()


async def _refusals(url: str, backend: dict[str, str], payer: str, payee: str, count: int) -> None:
    """``count`` transfers the payer cannot pay: each is refused (422) and audited with its risk signal."""
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            async with session.post(url + "/v1/transfers", json={"from_wallet": payer, "to_wallet": payee,
                                                                 "amount_fen": 100},
                                    headers={**backend, "Idempotency-Key": uuid.uuid4().hex}) as response:
                assert response.status == 422, await response.text()


def _without_monitor(token: Token, tmp_path: Path, label: str) -> tuple[GatewayProcess, Path, dict[str, Any],
                                                                      dict[str, str]]:
    """A real gateway on a token of its own, started with its risk monitor off (``ECNY_RISK__MONITOR=false``):
    signals commit and wait. Returns it, its database, its credentials and the backend's headers."""
    subprocess.run([str(ROOT / "softhsm" / "init-token.sh"), str(token.directory), label], check=True,
                   capture_output=True, timeout=120)
    db = tmp_path / "gw.db"
    gateway = GatewayProcess(tmp_path / "var", token.conf, label, token.directory / f"{label}.user-pin",
                             f"sqlite:///{db}")
    credentials = gateway.provision()
    gateway.env["ECNY_RISK__MONITOR"] = "false"
    gateway.start()
    return gateway, db, credentials, {"Authorization": f"Bearer {credentials['backend_api_key']}"}


async def _parties(url: str, credentials: dict[str, Any]) -> tuple[str, str, dict[str, str]]:
    """Two wallets opened by teller1 (a payer with nothing to pay, a payee) and auditor1's headers."""
    async with aiohttp.ClientSession() as session:
        login = await _json(session, "POST", url + "/v1/sessions", {},
                            {"username": "teller1", "password": credentials["users"]["teller1"]})
        teller = {"Authorization": f"Bearer {login['token']}"}
        opened = [(await _json(session, "POST", url + "/v1/wallets", teller,
                               {"holder_name": f"W{i}", "phone": "13800000000", "tier": 2,
                                "kind": "personal"}))["wallet_id"] for i in range(2)]
        login = await _json(session, "POST", url + "/v1/sessions", {},
                            {"username": "auditor1", "password": credentials["users"]["auditor1"]})
        return opened[0], opened[1], {"Authorization": f"Bearer {login['token']}"}


def _gauge_becomes(url: str, headers: dict[str, str], wanted: Any, seconds: float = 30) -> bool:
    """Whether ``ecny_risk_signals_pending`` on /metrics satisfies ``wanted`` within ``seconds`` (the gauge
    follows the store every poll)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        request = urllib.request.Request(url + "/metrics", headers=headers)
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read().decode()
        found = re.search(r"^ecny_risk_signals_pending ([0-9.e+]+)$", text, re.MULTILINE)
        if found is not None and wanted(float(found.group(1))):
            return True
        time.sleep(0.2)
    return False


def _pending(db: Path) -> int:
    with sqlite3.connect(db) as connection:
        return int(connection.execute("SELECT (SELECT COUNT(*) FROM risk_outbox) + "
                                      "(SELECT COUNT(*) FROM risk_signals WHERE evaluated = 0)").fetchone()[0])


def _drained(db: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while _pending(db):
        assert time.monotonic() < deadline, f"{_pending(db)} signals still unevaluated"
        time.sleep(0.1)


def test_kill_nine_between_commit_and_evaluation_loses_and_doubles_no_event(softhsm_token: Token,
                                                                            tmp_path: Path) -> None:
    gateway, db, credentials, backend = _without_monitor(softhsm_token, tmp_path, LABEL)
    payer, payee, auditor = asyncio.run(_parties(gateway.url, credentials))
    asyncio.run(_refusals(gateway.url, backend, payer, payee, 12))
    assert _pending(db) >= 12  # committed with their refusals, not evaluated
    gateway.kill()

    gateway.env.pop("ECNY_RISK__MONITOR")
    gateway.start()
    _drained(db)
    asyncio.run(_refusals(gateway.url, backend, payer, payee, 13))
    gateway.kill()  # right after the last answer: its signal committed, its evaluation under way or not begun
    gateway.start()
    _drained(db)

    async def events() -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            page = await _json(session, "GET", gateway.url + "/v1/risk/events?limit=1000", auditor)
            found: list[dict[str, Any]] = page["events"]
            return found

    stored = asyncio.run(events())
    gateway.stop()
    assert len({e["event_id"] for e in stored}) == len(stored)
    refusal_events = [e for e in stored if e["rule"] == "repeated_refusals" and e["subject"] == "client:dev-backend"]
    assert refusal_events, stored
    cited = [r["seq"] for e in refusal_events for r in e["evidence"]["refusals"]]
    assert len(cited) == len(set(cited)), "a refusal is cited by two events"
    with sqlite3.connect(db) as connection:
        signals = [int(row[0]) for row in connection.execute(
            "SELECT seq FROM risk_signals WHERE kind = 'request.refused' AND subject = 'client:dev-backend' "
            "ORDER BY seq")]
    assert len(signals) == 25
    uncited = [seq for seq in signals if seq not in set(cited)]
    assert uncited == signals[len(signals) - len(uncited):] and len(uncited) < MIN_COUNT, (cited, signals)


def test_the_evaluator_runs_in_a_process_of_its_own(softhsm_token: Token, tmp_path: Path) -> None:
    """`ecny-gateway risk monitor` beside an HTTP process with `[risk] monitor = false`: the HTTP process
    leaves its signals alone (the negative control), the evaluator process finds them by polling and
    stores the event, and it ends cleanly on SIGTERM."""
    gateway, db, credentials, backend = _without_monitor(softhsm_token, tmp_path, LABEL + "-apart")
    evaluator: subprocess.Popen[bytes] | None = None
    try:
        payer, payee, auditor = asyncio.run(_parties(gateway.url, credentials))
        asyncio.run(_refusals(gateway.url, backend, payer, payee, MIN_COUNT + 1))
        time.sleep(1.5)  # longer than [risk] poll_seconds: an in-process evaluator would have run
        assert _pending(db) >= MIN_COUNT + 1
        # Operators see the backlog: the HTTP process's monitor reads it into ecny_risk_signals_pending.
        assert _gauge_becomes(gateway.url, auditor, lambda value: value >= MIN_COUNT + 1)

        env = {**gateway.env, "ECNY_RISK__POLL_SECONDS": "0.2"}
        env.pop("ECNY_RISK__MONITOR")
        evaluator = subprocess.Popen([sys.executable, "-m", "gateway.cli", "risk", "monitor", "--config",
                                      str(gateway.var / "gateway.toml")], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _drained(db)
        assert _gauge_becomes(gateway.url, auditor, lambda value: value == 0)  # and its end

        async def refusal_events() -> list[dict[str, Any]]:
            async with aiohttp.ClientSession() as session:
                page = await _json(session, "GET", gateway.url + "/v1/risk/events?limit=1000", auditor)
                return [e for e in page["events"]
                        if e["rule"] == "repeated_refusals" and e["subject"] == "client:dev-backend"]

        found = asyncio.run(refusal_events())
        assert len(found) == 1 and len(found[0]["evidence"]["refusals"]) == MIN_COUNT + 1, found
        evaluator.send_signal(signal.SIGTERM)
        out, err = evaluator.communicate(timeout=30)
        assert evaluator.returncode == 0 and b"Traceback" not in err, err
        assert b"evaluating" in out
    finally:
        if evaluator is not None and evaluator.poll() is None:
            evaluator.kill()
            evaluator.wait()
        gateway.stop()
