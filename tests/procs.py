"""Real gateway processes for tests that kill, restart or run several of them.

`GatewayProcess` runs ``ecny-gateway serve`` as a subprocess in its own session (so that kill -9
takes the signer workers with it), on a free loopback port, against a given token and store. The
first one provisions keys and credentials with ``ecny-gateway dev-init`` — the same code path as
``make run``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from eth_account import Account

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class GatewayProcess:
    def __init__(self, var: Path, conf: Path, token_label: str, pin_file: Path, dsn: str, processes: int = 1) -> None:
        self.var = var
        self.conf = conf
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.witness = var / "audit-witness.jsonl"  # every process and instance of a test appends to its own
        var.mkdir(parents=True, exist_ok=True)
        (var / "gateway.toml").write_text(
            f'[server]\nhost = "127.0.0.1"\nport = {self.port}\nprocesses = {processes}\n\n'
            f'[hsm]\nprofile = "softhsm"\ntoken_label = "{token_label}"\npin_file = "{pin_file}"\n\n'
            f'[store]\ndsn = "{dsn}"\n\n[auth]\ncredential_cache_seconds = 0\n\n'
            f'[audit]\nwitness_file = "{self.witness}"\n',
            encoding="utf-8",
        )
        self.env = {**os.environ, "SOFTHSM2_CONF": str(conf)}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def provision(self) -> dict[str, Any]:
        """Keys, API clients and users via `ecny-gateway dev-init`; returns the credentials file."""
        done = subprocess.run([sys.executable, "-m", "gateway.cli", "dev-init", "--var", str(self.var)],
                              env=self.env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"dev-init exited with {done.returncode}: {done.stdout}{done.stderr}"
        credentials: dict[str, Any] = json.loads((self.var / "dev-credentials.json").read_text())
        return credentials

    def start(self, timeout: float = 30) -> None:
        log = (self.var / "gateway.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.var / "gateway.toml")],
            env=self.env, stdout=log, stderr=log, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"gateway exited with {self.process.returncode}; see {self.var / 'gateway.log'}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError("gateway did not become ready")

    def kill(self) -> None:
        """kill -9 the gateway and its signer workers (its whole process group)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self.process = None

    def stop(self) -> None:
        """A graceful stop (SIGTERM): pending audit entries are written and a checkpoint signed."""
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()
        self.process = None

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway.cli", *args, "--config", str(self.var / "gateway.toml")],
                              env=self.env, capture_output=True, text=True, timeout=120)


async def post_json(session: aiohttp.ClientSession, url: str, headers: dict[str, str], body: dict[str, Any]) -> Any:
    """POST with a fresh Idempotency-Key; returns (status, JSON body)."""
    async with session.post(url, json=body, headers={**headers, "Idempotency-Key": uuid.uuid4().hex}) as response:
        return response.status, await response.json()


async def check_gap_free_nonces(session: aiohttp.ClientSession, urls: list[str], headers: dict[str, str],
                                count: int = 60) -> None:
    """``count`` EIP-1559 signings for the ``evm-hot-wallet`` address at once, spread over ``urls``:
    every one signed, nonces exactly 0..count-1, and eth-account recovers the key's address from each."""
    async with session.get(urls[0] + "/v1/keys", headers=headers) as response:
        key = next(k for k in (await response.json())["keys"] if k["label"] == "evm-hot-wallet")
    signed = await asyncio.gather(*(
        post_json(session, f"{urls[i % len(urls)]}/v1/evm/transactions", headers, {
            "key_id": key["key_id"], "chain_id": 11155111, "type": "eip1559", "gas_limit": 21000,
            "max_fee_per_gas": "2000000000", "max_priority_fee_per_gas": "1000000000",
            "to": "0x1111111111111111111111111111111111111111", "value": str(i + 1)})
        for i in range(count)))
    assert {s for s, _ in signed} == {200}, [b for s, b in signed if s != 200][:3]
    assert sorted(body["nonce"] for _, body in signed) == list(range(count))
    assert {Account.recover_transaction(body["raw_transaction"]) for _, body in signed} == {key["address"]}
