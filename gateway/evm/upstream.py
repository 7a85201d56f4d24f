"""The configured Ethereum node (``evm_rpc.upstream_url``), as the JSON-RPC signer uses it.

Three calls only: ``eth_chainId`` (the node must serve the chain the transaction was signed for),
``eth_getTransactionCount(address, "pending")`` (a read-only check of the local nonce allocator) and
``eth_sendRawTransaction`` (a transaction the gateway signed). The node never sees a key, a credential
or an unsigned request; whatever it answers is parsed as untrusted input, and any failure is
:class:`~gateway.errors.EvmUpstreamFailed`.
"""

from __future__ import annotations

import itertools
from typing import Any

import aiohttp
import orjson

from gateway.errors import EvmUpstreamFailed

MAX_ANSWER_BYTES = 1 << 20
"""Largest answer read from the node: the three calls answer a few dozen bytes."""


def hex_quantity(value: Any, what: str) -> int:
    """A node's 0x-hex quantity as an integer. Raises EvmUpstreamFailed for anything else."""
    if not isinstance(value, str) or not value.startswith("0x") or not 2 < len(value) <= 66:
        raise EvmUpstreamFailed(f"the upstream node answered {what} with {str(value)[:40]!r}, not a hex quantity")
    try:
        return int(value[2:], 16)
    except ValueError:
        raise EvmUpstreamFailed(f"the upstream node answered {what} with a malformed quantity") from None


async def _read_at_most(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """The body, or its first ``limit`` bytes (``read(n)`` returns what is buffered, maybe less)."""
    body = bytearray()
    while len(body) < limit:
        chunk = await stream.read(limit - len(body))
        if not chunk:
            break
        body += chunk
    return bytes(body)


class UpstreamNode:
    """A JSON-RPC client of one Ethereum node; the HTTP session opens on first use and closes with the
    application (:meth:`close`)."""

    def __init__(self, url: str, timeout_seconds: float) -> None:
        self.url = url
        self.timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None
        self._ids = itertools.count(1)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def call(self, method: str, params: list[Any]) -> Any:
        """One call's ``result``.

        Raises:
            EvmUpstreamFailed: no answer in time, not JSON-RPC, or a JSON-RPC error (in ``upstream_error``).
        """
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        request_id = next(self._ids)
        body = orjson.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        try:
            async with self._session.post(self.url, data=body, headers={"Content-Type": "application/json"}) as reply:
                raw = await _read_at_most(reply.content, MAX_ANSWER_BYTES + 1)
                status = reply.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise EvmUpstreamFailed(f"{method}: the upstream node did not answer ({type(exc).__name__})") from None
        if len(raw) > MAX_ANSWER_BYTES:
            raise EvmUpstreamFailed(f"{method}: the upstream node's answer is larger than {MAX_ANSWER_BYTES} bytes")
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise EvmUpstreamFailed(f"{method}: the upstream node answered HTTP {status} without JSON") from None
        if not isinstance(answer, dict) or answer.get("id") != request_id:
            raise EvmUpstreamFailed(f"{method}: the upstream node's answer is not the JSON-RPC response to the call")
        error = answer.get("error")
        if error is not None:
            detail = error if isinstance(error, dict) else {"message": str(error)}
            upstream_error = {"code": detail.get("code"), "message": str(detail.get("message", ""))[:500]}
            raise EvmUpstreamFailed(f"{method}: the upstream node refused: {upstream_error['message']}",
                                    upstream_error=upstream_error)
        if "result" not in answer:
            raise EvmUpstreamFailed(f"{method}: the upstream node's answer has neither result nor error")
        return answer["result"]

    async def chain_id(self) -> int:
        return hex_quantity(await self.call("eth_chainId", []), "eth_chainId")

    async def transaction_count(self, address: str) -> int:
        """Transactions of ``address`` the node knows, mined or waiting in its pool (``pending``)."""
        return hex_quantity(await self.call("eth_getTransactionCount", [address, "pending"]),
                            "eth_getTransactionCount")

    async def send_raw_transaction(self, raw_transaction: str) -> str:
        """Broadcast a signed transaction; the node's transaction hash."""
        result = await self.call("eth_sendRawTransaction", [raw_transaction])
        if not isinstance(result, str):
            raise EvmUpstreamFailed("eth_sendRawTransaction: the upstream node answered no transaction hash")
        return result
