"""Crash safety: kill -9 the gateway (and its signer workers) in the middle of a load of transfers
and EVM signings sent with Idempotency-Keys, restart it, let the clients retry everything. Ten
times, at random moments. Afterwards every operation is in the ledger exactly once, every transfer
has a verifying envelope, the EVM nonces are exactly 0..n-1 (no gap, no duplicate) with every raw
transaction recovering to the key's address, and `ledger check` and `audit verify` pass."""

from __future__ import annotations

import asyncio
import random
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from eth_account import Account

from tests.conftest import ROOT, Token
from tests.procs import GatewayProcess

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]

LABEL = "ecny-crash"
SEPOLIA = 11155111
ROUNDS = 10


@dataclass
class Operation:
    path: str
    body: dict[str, Any]
    key: str = field(default_factory=lambda: uuid.uuid4().hex)
    response: dict[str, Any] | None = None
    status: int = 0


async def _send(session: aiohttp.ClientSession, url: str, headers: dict[str, str], op: Operation) -> bool:
    """One attempt. True once the operation has a final answer (acknowledged or refused by policy)."""
    try:
        async with session.post(url + op.path, json=op.body, headers={**headers, "Idempotency-Key": op.key}) as r:
            body = await r.json(content_type=None)
            if r.status in (200, 201):
                op.status, op.response = r.status, body
                return True
            assert r.status == 503, (r.status, body)  # the store or HSM coming back; anything else is a bug
            return False
    except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError):
        return False  # the gateway died under us: retry with the same key


async def _drive(url: str, headers: dict[str, str], ops: list[Operation], stop_after: float | None) -> None:
    """Send every operation (8 at a time), retrying the unanswered ones; return early after
    ``stop_after`` seconds (the gateway is about to be killed)."""
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        pending = [op for op in ops if op.response is None]
        queue: asyncio.Queue[Operation] = asyncio.Queue()
        for op in pending:
            queue.put_nowait(op)

        async def worker() -> None:
            while not queue.empty():
                op = queue.get_nowait()
                if not await _send(session, url, headers, op):
                    await asyncio.sleep(0.05)
                    queue.put_nowait(op)

        workers = asyncio.gather(*(worker() for _ in range(8)))
        if stop_after is None:
            await asyncio.wait_for(workers, timeout=120)
        else:
            try:
                await asyncio.wait_for(asyncio.shield(workers), timeout=stop_after)
            except TimeoutError:
                pass
            workers.cancel()
            try:
                await workers
            except (asyncio.CancelledError, Exception):  # the in-flight requests die with the gateway
                pass


async def _json(session: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str],
                body: Any = None) -> Any:
    async with session.request(method, url, json=body, headers=headers) as response:
        assert response.status < 300, (response.status, await response.text())
        return await response.json()


def test_kill_nine_under_load_loses_and_doubles_nothing(softhsm_token: Token, tmp_path: Path) -> None:
    subprocess.run([str(ROOT / "softhsm" / "init-token.sh"), str(softhsm_token.directory), LABEL], check=True,
                   capture_output=True)
    gateway = GatewayProcess(tmp_path / "var", softhsm_token.conf, LABEL,
                             softhsm_token.directory / f"{LABEL}.user-pin", f"sqlite:///{tmp_path / 'gw.db'}")
    credentials = gateway.provision()
    backend = {"Authorization": f"Bearer {credentials['backend_api_key']}"}
    gateway.start()
    rng = random.Random(20261122)

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            token = (await _json(session, "POST", gateway.url + "/v1/sessions", {},
                                 {"username": "teller1", "password": credentials["users"]["teller1"]}))["token"]
            teller = {"Authorization": f"Bearer {token}"}
            wallets = [
                (await _json(session, "POST", gateway.url + "/v1/wallets", teller,
                             {"holder_name": f"W{i}", "phone": "13800000000", "tier": 1, "kind": "personal"}))[
                    "wallet_id"]
                for i in range(8)
            ]
        cash_ins = [Operation(f"/v1/wallets/{w}/cash-in", {"amount_fen": 1_000_000}) for w in wallets]
        await _drive(gateway.url, teller, cash_ins, None)
        assert all(op.status == 200 for op in cash_ins)

        async with aiohttp.ClientSession() as session:
            keys = (await _json(session, "GET", gateway.url + "/v1/keys", backend))["keys"]
        evm_key = next(k for k in keys if k["label"] == "evm-hot-wallet")

        transfers: list[Operation] = []
        evm: list[Operation] = []
        for _round in range(ROUNDS):
            transfers += [
                Operation("/v1/transfers", {"from_wallet": source, "to_wallet": target,
                                            "amount_fen": rng.randint(1, 500)})
                for source, target in (rng.sample(wallets, 2) for _ in range(50))
            ]
            evm += [
                Operation("/v1/evm/transactions", {
                    "key_id": evm_key["key_id"], "chain_id": SEPOLIA, "type": "eip1559", "gas_limit": 21000,
                    "max_fee_per_gas": "2000000000", "max_priority_fee_per_gas": "1000000000",
                    "to": "0x1111111111111111111111111111111111111111", "value": str(rng.randint(1, 10**9))})
                for _ in range(15)
            ]
            everything = transfers + evm
            rng.shuffle(everything)
            await _drive(gateway.url, backend, everything, stop_after=rng.uniform(0.2, 1.2))
            gateway.kill()
            gateway.start()
        await _drive(gateway.url, backend, transfers + evm, None)

        assert all(op.status == 201 for op in transfers), {op.status for op in transfers}
        assert all(op.status == 200 for op in evm), {op.status for op in evm}
        nonces = sorted(op.response["nonce"] for op in evm if op.response)
        assert nonces == list(range(len(evm))), "EVM nonces must be exactly 0..n-1"
        for op in evm:
            assert op.response is not None
            assert Account.recover_transaction(op.response["raw_transaction"]) == evm_key["address"]
        expected = {w: 1_000_000 for w in wallets}
        for op in transfers:
            expected[op.body["from_wallet"]] -= op.body["amount_fen"]
            expected[op.body["to_wallet"]] += op.body["amount_fen"]
        async with aiohttp.ClientSession() as session:
            for wallet_id, balance in expected.items():
                document = await _json(session, "GET", f"{gateway.url}/v1/wallets/{wallet_id}", teller)
                assert document["balance_fen"] == balance, wallet_id
            ids = {op.response["transfer_id"] for op in transfers if op.response}
            assert len(ids) == len(transfers)  # one transfer per operation, never two
            for transfer_id in rng.sample(sorted(ids), 20):
                shown = await _json(session, "GET", f"{gateway.url}/v1/transfers/{transfer_id}", teller)
                assert shown["status"] == "posted" and shown["envelope"]

    asyncio.run(scenario())
    gateway.stop()
    ledger = gateway.cli("ledger", "check")
    assert ledger.returncode == 0, ledger.stdout + ledger.stderr
    audit = gateway.cli("audit", "verify", "--witness", str(gateway.witness))
    assert audit.returncode == 0, audit.stdout + audit.stderr
    journal = gateway.cli("migrate")  # the schema is intact and current after ten crashes
    assert journal.returncode == 0 and "up to date" in journal.stdout
