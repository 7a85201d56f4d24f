"""Two gateway processes on one PostgreSQL database: concurrent transfers on the same wallets
through both never overdraw or pass a limit, EVM signings for one address through both get every
nonce exactly once, and the shared audit chain verifies."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import ROOT, Token
from tests.pg import PostgresServer
from tests.procs import GatewayProcess, check_gap_free_nonces, post_json

pytestmark = [pytest.mark.softhsm, pytest.mark.postgres, pytest.mark.slow]

LABEL = "ecny-instances"


def test_two_instances_share_one_ledger(softhsm_token: Token, postgres_server: PostgresServer, tmp_path: Path) -> None:
    subprocess.run([str(ROOT / "softhsm" / "init-token.sh"), str(softhsm_token.directory), LABEL], check=True,
                   capture_output=True)
    dsn = postgres_server.create_database()
    pin = softhsm_token.directory / f"{LABEL}.user-pin"
    first = GatewayProcess(tmp_path / "a", softhsm_token.conf, LABEL, pin, dsn)
    second = GatewayProcess(tmp_path / "b", softhsm_token.conf, LABEL, pin, dsn)
    credentials = first.provision()
    backend = {"Authorization": f"Bearer {credentials['backend_api_key']}"}
    first.start()
    second.start()
    try:
        async def scenario() -> None:
            async with aiohttp.ClientSession() as session:
                async with session.post(first.url + "/v1/sessions", json={
                        "username": "teller1", "password": credentials["users"]["teller1"]}) as response:
                    teller = {"Authorization": f"Bearer {(await response.json())['token']}"}
                wallets = []
                for tier in (2, 4, 1):
                    async with session.post(first.url + "/v1/wallets", headers=teller, json={
                            "holder_name": "Shared", "phone": "13800000000", "tier": tier, "kind": "personal"}) as r:
                        wallets.append((await r.json())["wallet_id"])
                poor, limited, payee = wallets
                assert (await post_json(session, f"{second.url}/v1/wallets/{poor}/cash-in", teller,
                                    {"amount_fen": 20 * 1_000}))[0] == 200
                assert (await post_json(session, f"{first.url}/v1/wallets/{limited}/cash-in", teller,
                                    {"amount_fen": 1_000_000}))[0] == 200
                # 60 transfers of ¥10 from a wallet holding ¥200, alternating instances: exactly 20 pass.
                overdraw = await asyncio.gather(*(
                    post_json(session, f"{(first, second)[i % 2].url}/v1/transfers", backend,
                          {"from_wallet": poor, "to_wallet": payee, "amount_fen": 1_000}) for i in range(60)))
                assert sorted(s for s, _ in overdraw).count(201) == 20
                # 40 transfers of ¥1,000 from a tier-4 wallet (daily limit ¥5,000): exactly 5 pass.
                daily = await asyncio.gather(*(
                    post_json(session, f"{(first, second)[i % 2].url}/v1/transfers", backend,
                          {"from_wallet": limited, "to_wallet": payee, "amount_fen": 100_000}) for i in range(40)))
                assert [s for s, _ in daily].count(201) == 5
                refusals = {body["type"].rsplit("/", 1)[-1] for s, body in overdraw + daily if s != 201}
                assert refusals <= {"insufficient-funds", "limit-exceeded"}, refusals
                async with session.get(f"{second.url}/v1/wallets/{poor}", headers=teller) as r:
                    assert (await r.json())["balance_fen"] == 0
                async with session.get(f"{first.url}/v1/wallets/{payee}", headers=teller) as r:
                    assert (await r.json())["balance_fen"] == 20 * 1_000 + 5 * 100_000
                # 60 EVM signings for one address through both instances: nonces exactly 0..59.
                await check_gap_free_nonces(session, [first.url, second.url], backend)

        asyncio.run(scenario())
    finally:
        first.stop()
        second.stop()
    assert first.cli("ledger", "check").returncode == 0
    for instance in (first, second):  # each instance keeps a witness of its own
        audit = first.cli("audit", "verify", "--witness", str(instance.witness))
        assert audit.returncode == 0, audit.stdout + audit.stderr
