"""Shared by the JSON-RPC signer's tests: a gateway whose default chain is the eth-tester chain and whose
upstream node is :class:`tests.evm_node.EthTesterNode`, keys of usage ``evm`` and ``message``, and a
plain JSON-RPC call over the test client."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from gateway.auth.roles import Role
from gateway.config import EvmSettings
from tests.conftest import EVM_TEST_CHAIN_ID, Gateway, Token, evm_test_chain, make_settings, start_gateway
from tests.evm_node import EthTesterNode
from tests.pg import PostgresServer

GWEI = 10**9
RECIPIENT = "0x1111111111111111111111111111111111111111"
_IDS = itertools.count(1)


@pytest_asyncio.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def rpc_gateway(request: pytest.FixtureRequest, softhsm_token: Token, eth_node: EthTesterNode,
                      tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    """A gateway per store with the eth-tester chain registered, as the JSON-RPC default chain, and
    ``eth_node`` as its upstream node."""
    if request.param == "sqlite":
        dsn = f"sqlite:///{tmp_path_factory.mktemp('rpc') / 'gateway.db'}"
    else:
        server: PostgresServer = request.getfixturevalue("postgres_server")
        dsn = server.create_database()
    chains = [*EvmSettings().chains, evm_test_chain()]
    started = await start_gateway(make_settings(
        softhsm_token, dsn, evm={"chains": chains},
        evm_rpc={"default_chain_id": EVM_TEST_CHAIN_ID, "upstream_url": eth_node.url}))
    yield started
    await started.client.close()


async def new_key(gateway: Gateway, label: str, usage: str) -> dict[str, Any]:
    """A fresh secp256k1 key with one usage (``evm`` or ``message``), made through the API."""
    response = await gateway.client.post(
        "/v1/keys", json={"label": label, "algorithm": "ecdsa-secp256k1", "usage": [usage]},
        headers=gateway.auth(Role.ADMIN))
    assert response.status == 201, await response.text()
    document: dict[str, Any] = await response.json()
    return document


async def rpc(gateway: Gateway, method: str, params: list[Any], role: Role = Role.BACKEND,
              headers: dict[str, str] | None = None, call_id: Any = None) -> dict[str, Any]:
    """One JSON-RPC call; the response object (HTTP 200 is asserted: JSON-RPC errors are not HTTP errors)."""
    call_id = next(_IDS) if call_id is None else call_id
    response = await gateway.client.post("/v1/evm/rpc", json={"jsonrpc": "2.0", "id": call_id, "method": method,
                                                              "params": params},
                                         headers={**gateway.auth(role), **(headers or {})})
    assert response.status == 200, await response.text()
    assert response.content_type == "application/json"
    answer: dict[str, Any] = await response.json()
    assert answer["jsonrpc"] == "2.0" and answer["id"] == call_id
    return answer


def error_of(answer: dict[str, Any], code: int, problem: str) -> dict[str, Any]:
    """The answer is a JSON-RPC error with this code, whose data names this problem type."""
    assert "result" not in answer, answer
    error: dict[str, Any] = answer["error"]
    assert error["code"] == code, error
    assert error["data"]["code"] == problem, error
    assert error["data"]["type"] == f"https://ecny-gateway.dev/problems/{problem}"
    assert isinstance(error["message"], str) and error["message"]
    return error


def eip1559(sender: str, to: str = RECIPIENT, value: int = 10**15, gas: int = 21_000, **extra: Any) -> dict[str, Any]:
    """A JSON-RPC EIP-1559 transaction object (hex quantities) on the default chain."""
    return {"from": sender, "to": to, "value": hex(value), "gas": hex(gas), "maxFeePerGas": hex(20 * GWEI),
            "maxPriorityFeePerGas": hex(2 * GWEI), "type": "0x2", **extra}


def legacy(sender: str, to: str = RECIPIENT, value: int = 10**15, gas: int = 21_000, **extra: Any) -> dict[str, Any]:
    return {"from": sender, "to": to, "value": hex(value), "gas": hex(gas), "gasPrice": hex(20 * GWEI), **extra}
