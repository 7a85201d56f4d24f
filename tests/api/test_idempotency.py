"""Idempotency-Key (docs/spec.md §5): the same key and body return the first response again without
signing twice; the same key with another body is 409; keys are scoped to the calling principal."""

from __future__ import annotations

import asyncio
import os
import secrets
from typing import Any

import pytest

from gateway.auth.roles import Role
from tests.api.support import assert_problem, audit_entries, audit_head, new_client, signed
from tests.conftest import PASSWORDS, Gateway

pytestmark = pytest.mark.softhsm


def _key() -> str:
    return f"idem-{secrets.token_hex(8)}"


async def _sign(gateway: Gateway, key_id: str, digest: str, idempotency_key: str | None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes, Any]:
    headers = dict(headers if headers is not None else gateway.auth(Role.BACKEND))
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    response = await gateway.client.post(f"/v1/keys/{key_id}/sign", json={"digest": digest}, headers=headers)
    return response.status, await response.read(), response.headers


async def test_replay_returns_the_first_response_and_signs_once(gateway: Gateway, raw_keys: dict[str, Any]) -> None:
    key_id, digest, idem = raw_keys["p256"]["key_id"], os.urandom(32).hex(), _key()
    head = await audit_head(gateway)

    status, first, headers = await _sign(gateway, key_id, digest, idem)
    assert status == 200, first
    assert "Idempotent-Replayed" not in headers
    for _ in range(3):
        status_again, again, headers_again = await _sign(gateway, key_id, digest, idem)
        assert status_again == status
        assert again == first  # byte for byte: ECDSA is randomised, so a new signature would differ
        assert headers_again["Idempotent-Replayed"] == "true"
        assert headers_again["Content-Type"] == headers["Content-Type"]

    entries = signed(await audit_entries(gateway, head))
    assert len(entries) == 1, entries
    assert entries[0]["key_id"] == key_id
    assert entries[0]["request_id"] == headers["X-Request-Id"]

    # Without the header the same body is signed again: the replay came from the key, not the body.
    status, fresh, _ = await _sign(gateway, key_id, digest, None)
    assert status == 200 and fresh != first
    assert len(signed(await audit_entries(gateway, head))) == 2


async def test_same_key_other_body_is_a_conflict(gateway: Gateway, raw_keys: dict[str, Any]) -> None:
    key_id, idem = raw_keys["p256"]["key_id"], _key()
    status, first, _ = await _sign(gateway, key_id, os.urandom(32).hex(), idem)
    assert status == 200, first
    head = await audit_head(gateway)

    response = await gateway.client.post(
        f"/v1/keys/{key_id}/sign", json={"digest": os.urandom(32).hex()},
        headers=gateway.auth(Role.BACKEND) | {"Idempotency-Key": idem},
    )
    await assert_problem(response, 409, "idempotency-key-reused")
    # Same body on another path (another key) is another request too.
    response = await gateway.client.post(
        f"/v1/keys/{raw_keys['k1']['key_id']}/sign", json={"digest": os.urandom(32).hex()},
        headers=gateway.auth(Role.BACKEND) | {"Idempotency-Key": idem},
    )
    await assert_problem(response, 409, "idempotency-key-reused")
    assert signed(await audit_entries(gateway, head)) == []


async def test_keys_are_scoped_to_the_principal(gateway: Gateway, raw_keys: dict[str, Any]) -> None:
    key_id, digest, idem = raw_keys["p256"]["key_id"], os.urandom(32).hex(), _key()
    _, other = await new_client(gateway, Role.BACKEND, "idem-other")
    head = await audit_head(gateway)

    status, mine, _ = await _sign(gateway, key_id, digest, idem)
    assert status == 200, mine
    status, theirs, headers = await _sign(gateway, key_id, digest, idem, other)
    assert status == 200, theirs
    assert "Idempotent-Replayed" not in headers
    assert theirs != mine  # signed anew, not the other principal's response

    # Now that the other principal has used the key too, another body under it is its conflict.
    status, conflict, _ = await _sign(gateway, key_id, os.urandom(32).hex(), idem, other)
    assert status == 409, conflict
    # And each principal still gets its own first response back.
    assert (await _sign(gateway, key_id, digest, idem))[1] == mine
    assert (await _sign(gateway, key_id, digest, idem, other))[1] == theirs

    entries = signed(await audit_entries(gateway, head))
    assert len(entries) == 2, entries
    assert len({entry["actor"] for entry in entries}) == 2


async def test_concurrent_requests_with_one_key_sign_once(gateway: Gateway, raw_keys: dict[str, Any]) -> None:
    key_id, digest, idem = raw_keys["p256"]["key_id"], os.urandom(32).hex(), _key()
    head = await audit_head(gateway)

    results = await asyncio.gather(*(_sign(gateway, key_id, digest, idem) for _ in range(10)))

    assert {status for status, _, _ in results} == {200}, results
    assert len({body for _, body, _ in results}) == 1, "concurrent requests got different signatures"
    replayed = [headers.get("Idempotent-Replayed") for _, _, headers in results]
    assert replayed.count("true") == 9, replayed
    entries = signed(await audit_entries(gateway, head))
    assert len(entries) == 1, f"{len(entries)} signatures made for one Idempotency-Key"


async def test_concurrent_batches_with_one_key_sign_once(gateway: Gateway, raw_keys: dict[str, Any]) -> None:
    body = {"key_id": raw_keys["k1"]["key_id"], "digests": [os.urandom(32).hex() for _ in range(20)]}
    headers = gateway.auth(Role.BACKEND) | {"Idempotency-Key": _key()}
    head = await audit_head(gateway)

    async def post() -> tuple[int, bytes]:
        response = await gateway.client.post("/v1/sign/batch", json=body, headers=headers)
        return response.status, await response.read()

    results = await asyncio.gather(*(post() for _ in range(5)))
    assert {status for status, _ in results} == {200}, results
    assert len({payload for _, payload in results}) == 1
    assert len(signed(await audit_entries(gateway, head))) == 1


async def _key_count(gateway: Gateway) -> int:
    response = await gateway.client.get("/v1/keys", headers=gateway.auth(Role.ADMIN))
    assert response.status == 200
    return len((await response.json())["keys"])


async def test_key_creation_replays_the_same_key(gateway: Gateway) -> None:
    body = {"label": f"idem-{secrets.token_hex(4)}", "algorithm": "ed25519", "usage": ["raw"]}
    headers = gateway.auth(Role.ADMIN) | {"Idempotency-Key": _key()}
    before = await _key_count(gateway)

    first = await gateway.client.post("/v1/keys", json=body, headers=headers)
    assert first.status == 201, await first.text()
    document = await first.read()
    second = await gateway.client.post("/v1/keys", json=body, headers=headers)
    assert second.status == 201
    assert await second.read() == document
    assert second.headers["Idempotent-Replayed"] == "true"
    assert await _key_count(gateway) == before + 1

    # The same label without the key is a real second attempt, and the label is taken.
    third = await gateway.client.post("/v1/keys", json=body, headers=gateway.auth(Role.ADMIN))
    await assert_problem(third, 409, "already-exists")
    assert await _key_count(gateway) == before + 1


async def test_key_creation_is_scoped_per_admin(gateway: Gateway) -> None:
    """The admin API client and the admin user are two principals: one key string, two keys."""
    login = await gateway.client.post("/v1/sessions", json={"username": "admin1", "password": PASSWORDS["admin1"]})
    assert login.status == 201
    user_headers = {"Authorization": f"Bearer {(await login.json())['token']}"}
    idem = _key()
    before = await _key_count(gateway)

    labels = [f"idem-a-{secrets.token_hex(4)}", f"idem-b-{secrets.token_hex(4)}"]
    for headers, label in zip((gateway.auth(Role.ADMIN), user_headers), labels, strict=True):
        response = await gateway.client.post(
            "/v1/keys", json={"label": label, "algorithm": "ecdsa-p256", "usage": ["raw"]},
            headers=headers | {"Idempotency-Key": idem},
        )
        assert response.status == 201, await response.text()
        assert (await response.json())["label"] == label
    assert await _key_count(gateway) == before + 2


async def test_refused_request_is_not_remembered(gateway: Gateway, raw_keys: dict[str, Any]) -> None:
    """A 4xx raised before the work (e.g. wrong usage) does not burn the key for a corrected request."""
    idem, digest = _key(), os.urandom(32).hex()
    status, body, _ = await _sign(gateway, raw_keys["ecny"]["key_id"], digest, idem)
    assert status == 403, body
    status, body, _ = await _sign(gateway, raw_keys["ecny"]["key_id"], digest, idem)
    assert status == 403, body


async def test_one_key_through_two_instances_is_answered_once(ledger_gateway: Gateway) -> None:
    """Two gateway instances on one store (SQLite file or PostgreSQL database) get the same transfer
    with the same Idempotency-Key at once: neither answers 409 — the one that loses the race replays
    the winner's response — and the money moves once per key."""
    from aiohttp.test_utils import TestClient, TestServer

    from gateway.app import make_app
    from tests.device.flows import open_wallet, wallet

    first = ledger_gateway
    second: TestClient[Any, Any] = TestClient(TestServer(make_app(first.settings)))
    await second.start_server()
    try:
        payer, payee = await open_wallet(first, cash=1_000_000), await open_wallet(first)
        body = {"from_wallet": payer, "to_wallet": payee, "amount_fen": 100}
        rounds = 12
        async def post(client: Any, headers: dict[str, str]) -> tuple[int, Any]:
            response = await client.post("/v1/transfers", json=body, headers=headers)
            return response.status, await response.json()

        for _ in range(rounds):
            headers = first.auth(Role.BACKEND) | {"Idempotency-Key": _key()}
            results = await asyncio.gather(*(post(client, headers) for client in (first.client, second) * 2))
            assert {status for status, _ in results} == {201}, results
            assert len({document["transfer_id"] for _, document in results}) == 1, results
        assert (await wallet(first, payee))["balance_fen"] == rounds * 100
    finally:
        await second.close()
