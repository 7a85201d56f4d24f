"""An Ethereum node for the JSON-RPC signer's tests: eth-tester's py-evm chain behind a real JSON-RPC HTTP
server on 127.0.0.1, answering what the gateway asks an upstream node (``eth_chainId``,
``eth_getTransactionCount``, ``eth_sendRawTransaction``) and, for the tests, ``eth_getBalance``.

Every transaction sent to it executes on the EVM (auto-mined); an invalid one is refused with the EVM's
own reason. The chain starts from a genesis that funds the addresses a test names (:meth:`reset`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from eth_tester import EthereumTester, PyEVMBackend  # type: ignore[attr-defined]
from eth_tester.backends.pyevm.main import get_default_account_state
from eth_utils.address import to_canonical_address

from tests.conftest import EVM_TEST_CHAIN_ID


class EthTesterNode:
    """The chain and the calls it received (method names, in order)."""

    def __init__(self) -> None:
        self.chain = EthereumTester(PyEVMBackend())
        self.calls: list[str] = []
        self.chain_id = EVM_TEST_CHAIN_ID  # what eth_chainId answers (a test may make it another chain's node)
        self.server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/"))

    def reset(self, funded: dict[str, int]) -> None:
        """A new chain whose genesis gives each address its balance (wei)."""
        state = {to_canonical_address(address): get_default_account_state({"balance": balance})
                 for address, balance in funded.items()}
        self.chain = EthereumTester(PyEVMBackend(genesis_state=state))
        self.chain_id = EVM_TEST_CHAIN_ID
        self.calls.clear()

    def _result(self, method: str, params: list[Any]) -> Any:
        if method == "eth_chainId":
            return hex(self.chain_id)
        if method == "eth_getTransactionCount":
            return hex(self.chain.get_nonce(params[0], "pending"))
        if method == "eth_sendRawTransaction":
            return self.chain.send_raw_transaction(params[0])
        if method == "eth_getBalance":
            return hex(self.chain.get_balance(params[0]))
        raise LookupError(method)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        method, params = body["method"], body.get("params", [])
        self.calls.append(method)
        try:
            answer: dict[str, Any] = {"result": self._result(method, params)}
        except LookupError:
            answer = {"error": {"code": -32601, "message": f"method {method} not found"}}
        except Exception as exc:  # the EVM's refusal, as a node reports it
            answer = {"error": {"code": -32000, "message": str(exc)[:300]}}
        return web.json_response({"jsonrpc": "2.0", "id": body.get("id"), **answer})


@pytest_asyncio.fixture(scope="module")
async def eth_node() -> AsyncIterator[EthTesterNode]:
    node = EthTesterNode()
    app = web.Application()
    app.router.add_post("/", node.handle)
    node.server = TestServer(app, host="127.0.0.1")
    await node.server.start_server()
    yield node
    await node.server.close()
