"""Hostile text in every place a request carries it, on both stores.

The attacks: a query count that passes ``str.isdigit()`` but not ``int()`` (a superscript, 5,000 digits),
and a NUL character (U+0000) in a path segment, a query value or a body string. PostgreSQL cannot store a
NUL: before the boundary refused it, an unauthenticated login with one in its username answered 503
``store-unavailable`` (with ``Retry-After``, and an error in the log as if the database were down) on
PostgreSQL and 401 on SQLite. Every request below must get a 4xx problem document, the same type on both
stores, and a NUL must be refused as ``validation-failed``. Each attack stands beside its positive control.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

import cbor2
import pytest

from gateway.app import all_endpoints
from gateway.auth.roles import Permission, Role, allows
from gateway.errors import TextNotStorable
from gateway.ledger.engines import open_database
from tests.api.support import assert_problem
from tests.conftest import Gateway

pytestmark = pytest.mark.softhsm

ROLES = (Role.ADMIN, Role.AUDITOR, Role.SUPERVISOR, Role.TELLER, Role.BACKEND, Role.PEER)
HOSTILE = ("²", "١٢", "9" * 5000, "-1", "1.5", "0x1F", " 7", "x" * 5000, "\x00", "a\x00b")
"""Values for every query parameter: "١٢" (Arabic-Indic digits) passes isdigit() and int() alike."""
UNCONFIGURED = "alliance-not-configured"
"""The one documented 5xx here: this gateway is no alliance member (the peer feed's parameters are tried
against one that is in tests/security/test_attestations.py)."""


async def _status(answer: Any) -> tuple[int, str]:
    """The status, and the problem type's code when it is a problem document."""
    if answer.content_type != "application/problem+json":
        return answer.status, ""
    return answer.status, str((await answer.json(content_type=None))["type"]).rsplit("/", 1)[-1]


def _role_for(permission: Permission | None) -> Role | None:
    if permission is None:
        return None
    return next(role for role in ROLES if allows(role, permission))


def _headers(gateway: Gateway, permission: Permission | None) -> dict[str, str]:
    role = _role_for(permission)
    return {} if role is None else gateway.auth(role)


def _path(template: str, nul_in: str | None = None) -> str:
    """The endpoint's path with each parameter filled (``%00`` in the one named ``nul_in``)."""
    return re.sub(r"\{(\w+)\}", lambda m: "a%00b" if m.group(1) == nul_in else "x1", template)


async def test_every_query_parameter_answers_hostile_values_with_a_4xx(ledger_gateway: Gateway) -> None:
    """Every declared query parameter of every GET endpoint, with every hostile value: never a 5xx; a NUL
    is ``validation-failed``. Positive control: the endpoint answers 200 without the parameter."""
    gateway = ledger_gateway
    tried = 0
    for endpoint in all_endpoints():
        if endpoint.method != "GET" or not endpoint.query or "{" in endpoint.path:
            continue
        headers = _headers(gateway, endpoint.permission)
        base = {"nonce": secrets.token_hex(16)} if endpoint.path == "/v1/alliance/fingerprints" else {}
        async with gateway.client.get(endpoint.path, params=base, headers=headers) as control:
            assert await _status(control) in ((200, ""), (503, UNCONFIGURED)), (endpoint.name, await control.text())
        for name, _schema, _description in endpoint.query:
            for value in HOSTILE:
                async with gateway.client.get(endpoint.path, params={**base, name: value}, headers=headers) as answer:
                    what = (endpoint.name, name, value[:12])
                    status, code = await _status(answer)
                    assert status < 500 or code == UNCONFIGURED, (what, await answer.text())
                    if "\x00" in value:
                        await assert_problem(answer, 400, "validation-failed")
                    tried += 1
    assert tried > 200  # the sweep ran over the route table, not over nothing


async def test_a_nul_in_any_path_parameter_is_validation_failed(ledger_gateway: Gateway) -> None:
    """A NUL in each path parameter of each endpoint (every method), from a caller allowed to call it:
    ``validation-failed`` before the store is asked. Positive control: the same path without it reaches
    the handler (a 404 naming what was not found, or a body error, never ``validation-failed``'s NUL text)."""
    gateway = ledger_gateway
    tried = 0
    for endpoint in all_endpoints():
        for parameter in re.findall(r"\{(\w+)\}", endpoint.path):
            headers = _headers(gateway, endpoint.permission)
            response = await gateway.client.request(endpoint.method, _path(endpoint.path, parameter), headers=headers)
            problem = await assert_problem(response, 400, "validation-failed")
            assert "NUL" in problem["detail"], (endpoint.name, problem)
            response = await gateway.client.request(endpoint.method, _path(endpoint.path), headers=headers)
            assert response.status < 500, (endpoint.name, await response.text())
            if response.status == 400:
                assert "NUL" not in (await response.json())["detail"]
            tried += 1
    assert tried > 20


async def test_a_nul_in_a_login_is_refused_as_bad_input_not_as_a_store_failure(ledger_gateway: Gateway) -> None:
    """The unauthenticated attack: a NUL in the username. Positive control: a wrong password is 401."""
    gateway = ledger_gateway
    response = await gateway.client.post("/v1/sessions", json={"username": "teller1\x00", "password": "x" * 16})
    await assert_problem(response, 400, "validation-failed")
    response = await gateway.client.post("/v1/sessions", json={"username": "teller1", "password": "x" * 16})
    await assert_problem(response, 401, "unauthenticated")


def _holder(name: str) -> dict[str, Any]:
    return {"holder_name": name, "tier": 2, "phone": "13800138000", "kind": "personal"}


async def _open_wallet(gateway: Gateway) -> str:
    response = await gateway.client.post("/v1/wallets", json=_holder("Hostile Input"),
                                         headers={**gateway.auth(Role.TELLER), "Idempotency-Key": secrets.token_hex(8)})
    assert response.status == 201, await response.text()
    wallet_id: str = (await response.json())["wallet_id"]
    return wallet_id


async def test_a_nul_in_a_body_string_is_validation_failed_in_json_and_cbor(ledger_gateway: Gateway) -> None:
    """A NUL in a transfer's memo (JSON and CBOR), in a map key, and in a wallet holder's name: 400, nothing
    posted. Positive control: the same transfer with a plain memo is posted."""
    gateway = ledger_gateway
    payer, payee = await _open_wallet(gateway), await _open_wallet(gateway)
    response = await gateway.client.post(f"/v1/wallets/{payer}/cash-in", json={"amount_fen": 500},
                                         headers={**gateway.auth(Role.TELLER), "Idempotency-Key": secrets.token_hex(8)})
    assert response.status == 200, await response.text()
    teller = gateway.auth(Role.TELLER)

    def transfer(memo: str) -> dict[str, Any]:
        return {"from_wallet": payer, "to_wallet": payee, "amount_fen": 100, "memo": memo}

    attacks: list[tuple[str, dict[str, Any]]] = [
        ("/v1/transfers", {"json": transfer("rent\x00")}),
        ("/v1/transfers", {"data": cbor2.dumps(transfer("rent\x00")), "headers": {"Content-Type": "application/cbor"}}),
        ("/v1/transfers", {"data": cbor2.dumps({**transfer("rent"), "me\x00mo": "x"}),
                           "headers": {"Content-Type": "application/cbor"}}),
        ("/v1/wallets", {"json": _holder("Zhang\x00San")}),
    ]
    for path, kwargs in attacks:
        headers = {**teller, **kwargs.pop("headers", {}), "Idempotency-Key": secrets.token_hex(8)}
        await assert_problem(await gateway.client.post(path, headers=headers, **kwargs), 400, "validation-failed")
    payee_balance = (await (await gateway.client.get(f"/v1/wallets/{payee}", headers=teller)).json())["balance_fen"]
    assert payee_balance == 0
    response = await gateway.client.post("/v1/transfers", json=transfer("rent"),
                                         headers={**teller, "Idempotency-Key": secrets.token_hex(8)})
    assert response.status == 201, await response.text()


async def test_the_postgresql_store_refuses_a_nul_as_bad_data_not_as_unavailable(postgres_server: Any) -> None:
    """Text that reached the store another way (a device's log, a peer's feed): PostgreSQL's refusal is
    ``TextNotStorable`` (400 ``validation-failed``), not ``StoreUnavailable`` (503); nothing is written, and
    the connection serves the next transaction. Positive control: the same text without the NUL is stored."""
    database = await open_database(postgres_server.create_database())
    try:
        await database.migrate()
        insert = "INSERT INTO settings_kv (name, value) VALUES (?, ?)"
        await database.write(lambda tx: tx.execute("CREATE TABLE settings_kv (name TEXT PRIMARY KEY, value TEXT)"))
        with pytest.raises(TextNotStorable) as raised:
            await database.write(lambda tx: tx.execute(insert, ("a", "x\x00y")))
        assert raised.value.http_status == 400 and raised.value.code == "validation-failed"
        await database.write(lambda tx: tx.execute(insert, ("b", "xy")))
        rows = await database.read(lambda tx: tx.fetchall("SELECT name, value FROM settings_kv"))
        assert [dict(row) for row in rows] == [{"name": "b", "value": "xy"}]
    finally:
        await database.close()
