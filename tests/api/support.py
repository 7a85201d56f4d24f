"""Helpers shared by the API tests: problem documents, the audit log as an auditor reads it,
extra API clients, and a gateway served over real TCP (and TLS)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from aiohttp import ClientResponse, web

from gateway.app import make_app, ssl_context
from gateway.auth.credentials import add_client
from gateway.auth.roles import Role
from gateway.config import Settings
from gateway.errors import PROBLEM_BASE
from gateway.runtime import RUNTIME, Runtime
from tests.conftest import Gateway, provision

PROBLEM_FIELDS = ("type", "title", "status", "detail", "request_id")


def runtime(gateway: Gateway) -> Runtime:
    return gateway.client.server.app[RUNTIME]


async def assert_problem(response: ClientResponse, status: int, code: str | None = None) -> dict[str, Any]:
    """The response is an RFC 9457 problem document with this status (and type, when given)."""
    text = await response.text()
    assert response.status == status, text
    assert response.content_type == "application/problem+json", (response.content_type, text)
    body = await response.json(content_type=None)
    assert isinstance(body, dict), text
    for name in PROBLEM_FIELDS:
        assert name in body, f"problem document without {name!r}: {text}"
    assert body["status"] == status
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    assert body["type"].startswith(PROBLEM_BASE), body["type"]
    assert body["request_id"] == response.headers["X-Request-Id"]
    if code is not None:
        assert body["type"] == PROBLEM_BASE + code, text
    return body


async def audit_entries(gateway: Gateway, after_seq: int = 0) -> list[dict[str, Any]]:
    """Every audit entry after ``after_seq``, read page by page through GET /v1/audit as an auditor."""
    entries: list[dict[str, Any]] = []
    after = after_seq
    while True:
        response = await gateway.client.get(
            "/v1/audit", params={"after_seq": str(after), "limit": "1000"}, headers=gateway.auth(Role.AUDITOR)
        )
        assert response.status == 200, await response.text()
        page = await response.json()
        entries += page["entries"]
        if page["next_after_seq"] is None:
            return entries
        after = page["next_after_seq"]


async def audit_head(gateway: Gateway) -> int:
    """The sequence number of the last audit entry."""
    entries = await audit_entries(gateway)
    return entries[-1]["seq"] if entries else 0


def signed(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The entries that record a signature made (single or batch)."""
    return [e for e in entries if e["action"] in ("keys.sign", "keys.sign_batch") and e["decision"] == "allowed"]


async def new_client(gateway: Gateway, role: Role, stem: str = "client") -> tuple[str, dict[str, str]]:
    """A fresh API client with ``role``: its name and its Authorization header."""
    name = f"{stem}-{secrets.token_hex(4)}"
    key = await runtime(gateway).database.write(lambda tx: add_client(tx, name, role))
    return name, {"Authorization": f"Bearer {key}"}


@dataclass
class ServedGateway:
    """A gateway served by a real aiohttp site (TLS when the settings say so), not a TestServer."""

    runner: web.AppRunner
    url: str
    settings: Settings
    api_keys: dict[str, str]  # role → API key, as `tests.conftest.provision` made them

    async def close(self) -> None:
        await self.runner.cleanup()


async def serve_gateway(settings: Settings) -> ServedGateway:
    """Provision clients and users in the settings' store and serve the app on 127.0.0.1, a free port,
    with ``gateway.app.ssl_context(settings)`` (aiohttp's TestServer takes no SSL context)."""
    api_keys = await provision(settings.store.dsn)
    runner = web.AppRunner(make_app(settings))
    await runner.setup()
    context = ssl_context(settings)
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    port = runner.addresses[0][1]
    scheme = "https" if context is not None else "http"
    return ServedGateway(runner, f"{scheme}://127.0.0.1:{port}", settings, api_keys)


async def approve_as_second_person(gateway: Gateway, pending: ClientResponse,
                                   approver: str = "supervisor2") -> dict[str, Any]:
    """An operation above its approval threshold answered 202 with its pending approval: a second
    supervisor (``approver``, a user other than the requester) approves it. Returns the decided
    approval; the operation has been carried out once it is ``executed``."""
    from tests.conftest import login

    assert pending.status == 202, await pending.text()
    approval = await pending.json()
    assert approval["status"] == "pending" and approval["approval_id"], approval
    response = await gateway.client.post(f"/v1/approvals/{approval['approval_id']}/approve",
                                         json={"payload_hash": approval["payload_hash"], "note": "second person"},
                                         headers=await login(gateway, approver))
    assert response.status == 200, await response.text()
    decided: dict[str, Any] = await response.json()
    assert decided["status"] == "executed", decided
    return decided


async def approve_opened_tier(gateway: Gateway, opened: dict[str, Any]) -> dict[str, Any]:
    """A wallet asked for at tier 1 is opened at tier 2 with its upgrade pending (``tier_approval``):
    a supervisor (supervisor1's session; the wallets of these tests are opened by others) approves it,
    so the wallet is tier 1 as the test needs. Returns the wallet's document as opened."""
    approval = opened.get("tier_approval")
    if approval is None:
        return opened
    assert opened["tier"] == 2 and approval["kind"] == "wallet_tier", opened
    response = await gateway.client.post(f"/v1/approvals/{approval['approval_id']}/approve",
                                         json={"payload_hash": approval["payload_hash"], "note": "second person"},
                                         headers=gateway.auth(Role.SUPERVISOR))
    assert response.status == 200, await response.text()
    assert (await response.json())["result"] == {"wallet_id": opened["wallet_id"], "tier": 1}
    return opened
