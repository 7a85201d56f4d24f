"""A real terminal: tmux runs the gateway (`ecny-gateway serve`, SoftHSM token from
softhsm/init-token.sh, set up by `ecny-gateway dev-init`) and `ecny-teller`; keys are typed with
`send-keys` and the screen is read with `capture-pane`, as a teller would see it at 80×24."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.softhsm, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (make system does)")]


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True).stdout


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_ready(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"the gateway at {url} did not become ready")


class Terminal:
    def __init__(self, session: str) -> None:
        self.session = session

    def keys(self, *keys: str) -> None:
        for key in keys:
            tmux("send-keys", "-t", self.session, key)
            time.sleep(0.15)

    def type(self, text: str) -> None:
        tmux("send-keys", "-t", self.session, "-l", "--", text)  # "--": a password may start with "-"
        time.sleep(0.2)

    def screen(self) -> str:
        return tmux("capture-pane", "-p", "-t", self.session)

    def wait(self, text: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            shown = self.screen()
            if text in shown:
                return shown
            time.sleep(0.2)
        raise AssertionError(f"{text!r} never appeared; the screen shows:\n{self.screen()}")


@pytest.fixture
def served_gateway(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """`ecny-gateway serve` in a tmux session, on a free port, with its own SoftHSM token and store."""
    conf = subprocess.run([str(ROOT / "softhsm" / "init-token.sh"), str(tmp_path / "hsm"), "ecny-dev"],
                          check=True, capture_output=True, text=True).stdout.strip()
    env = {**os.environ, "SOFTHSM2_CONF": conf}
    subprocess.run([str(BIN / "ecny-gateway"), "dev-init", "--var", str(tmp_path)], check=True, env=env,
                   capture_output=True, text=True, timeout=120)
    credentials = json.loads((tmp_path / "dev-credentials.json").read_text())["users"]
    port = free_port()
    session = f"tui-gw-{uuid.uuid4().hex[:8]}"
    command = (f"SOFTHSM2_CONF={conf} ECNY_SERVER__PORT={port} {BIN / 'ecny-gateway'} serve "
               f"--config {tmp_path / 'gateway.toml'} 2> {tmp_path / 'gateway.log'}")
    tmux("new-session", "-d", "-s", session, "-x", "120", "-y", "30", command)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        yield url, credentials
    finally:
        subprocess.run(["tmux", "send-keys", "-t", session, "C-c"], capture_output=True)
        time.sleep(1.0)
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


@pytest.fixture
def teller_terminal(served_gateway: tuple[str, dict[str, str]]) -> Iterator[tuple[Terminal, dict[str, str]]]:
    url, credentials = served_gateway
    session = f"tui-teller-{uuid.uuid4().hex[:8]}"
    tmux("new-session", "-d", "-s", session, "-x", "80", "-y", "24",
         f"{BIN / 'ecny-teller'} --gateway {url}")
    try:
        yield Terminal(session), credentials
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def test_log_in_open_a_wallet_and_cash_in(teller_terminal: tuple[Terminal, dict[str, str]]) -> None:
    terminal, credentials = teller_terminal
    terminal.wait("Log in")
    terminal.type("teller1")
    terminal.keys("Enter")
    terminal.type(credentials["teller1"])
    terminal.keys("Enter")
    terminal.wait("● ready")  # the dashboard, with the HSM's health
    terminal.keys("w")
    terminal.wait("New wallet")
    terminal.keys("n")
    terminal.wait("Open a new wallet")
    terminal.type("Tmux Customer")
    terminal.keys("Enter")
    terminal.type("13800138000")
    terminal.keys("Enter", "Enter", "Enter", "Enter")  # no identity number, tier 4, personal
    terminal.wait("Open this wallet?")
    terminal.keys("y")
    shown = terminal.wait("Available ¥0.00")
    assert "Tmux Customer" in shown
    terminal.keys("i")
    terminal.wait("Amount in yuan")
    terminal.type("88.80")
    terminal.keys("Enter")
    terminal.wait("Cash in ¥88.80?")
    terminal.keys("y")
    terminal.wait("Available ¥88.80")
    shown = terminal.wait("cash_in")  # the posting is listed under the new balance (it may render a moment later)
    assert "Available ¥88.80" in shown
    lines = shown.splitlines()
    assert len(lines) <= 24 and all(len(line) <= 80 for line in lines)


def _api(url: str, method: str, path: str, body: object, headers: dict[str, str]) -> dict[str, object]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **headers})
    with urllib.request.urlopen(request, timeout=10) as answer:
        document: dict[str, object] = json.loads(answer.read())
        return document


@pytest.mark.serial
def test_register_load_and_sync_a_simulated_hard_wallet(
    served_gateway: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    """`ecny-gateway device-sim --pty` in one tmux session, `ecny-teller` in another: type the pty's
    path, register the device on a wallet, load ¥100 and sync — as a teller would at 80×24."""
    url, credentials = served_gateway
    token = _api(url, "POST", "/v1/sessions", {"username": "teller1", "password": credentials["teller1"]}, {})
    teller = {"Authorization": f"Bearer {token['token']}"}
    wallet_id = str(_api(url, "POST", "/v1/wallets", {"holder_name": "Device Owner", "phone": "13800000000",
                                                      "tier": 2, "kind": "personal"}, teller)["wallet_id"])
    _api(url, "POST", f"/v1/wallets/{wallet_id}/cash-in", {"amount_fen": 50_000},
         {**teller, "Idempotency-Key": uuid.uuid4().hex})

    simulator = f"tui-sim-{uuid.uuid4().hex[:8]}"
    tmux("new-session", "-d", "-s", simulator, "-x", "200", "-y", "10",
         f"{BIN / 'ecny-gateway'} device-sim --pty --device-id sim-tmux-1")
    teller_session = f"tui-teller-{uuid.uuid4().hex[:8]}"
    try:
        device = Terminal(simulator)
        first_line = device.wait("device-sim sim-tmux-1 on ").splitlines()[0]
        pty_path = first_line.rsplit(" on ", 1)[1].strip()
        tmux("new-session", "-d", "-s", teller_session, "-x", "80", "-y", "24",
             f"{BIN / 'ecny-teller'} --gateway {url}")
        terminal = Terminal(teller_session)
        terminal.wait("Log in")
        terminal.type("teller1")
        terminal.keys("Enter")
        tmux("send-keys", "-t", teller_session, "-l", "--", credentials["teller1"])
        terminal.keys("Enter")
        terminal.wait("Dashboard")
        terminal.keys("h")
        terminal.wait("Not connected")
        terminal.keys("Tab")  # to the path field under the list of ports
        terminal.type(pty_path)
        terminal.keys("Enter")
        terminal.wait("not registered")
        terminal.keys("BTab", "g")  # back to the ports list, then register
        terminal.wait("Wallet")
        terminal.type(" ".join(wallet_id[i:i + 4] for i in range(0, 16, 4)))
        terminal.keys("Enter", "Enter")
        terminal.wait("Register this hard wallet?")
        terminal.keys("y")
        terminal.wait("Cert     yes")
        terminal.keys("l")
        terminal.wait("Amount")
        terminal.type("100")
        terminal.keys("Enter")
        terminal.wait("Load ¥100.00?")
        terminal.keys("y")
        terminal.wait("Offline  ¥100.00")
        terminal.keys("s")
        shown = terminal.wait("Synced")
        assert "100%" in shown
        lines = shown.splitlines()
        assert len(lines) <= 24 and all(len(line) <= 80 for line in lines)
        wallet = _api(url, "GET", f"/v1/wallets/{wallet_id}", None, teller)
        assert (wallet["balance_fen"], wallet["offline_reserve_fen"]) == (40_000, 10_000)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", teller_session], capture_output=True)
        subprocess.run(["tmux", "kill-session", "-t", simulator], capture_output=True)
