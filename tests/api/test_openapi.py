"""GET /openapi.json: an OpenAPI 3.1 document that is complete and true to the server (docs/spec.md §5).

Complete: its operations are exactly the router's routes. True: real responses — successes and
problem documents — have a documented status and content type and validate against the documented
schema; documented request schemas accept what the server accepts and refuse what it refuses.
"""

from __future__ import annotations

import os
import re
import secrets
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import ClientResponse
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_spec

from gateway.app import all_endpoints
from gateway.auth.roles import Role
from tests.conftest import PASSWORDS, Gateway

pytestmark = pytest.mark.softhsm

METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


@pytest_asyncio.fixture
async def document(gateway: Gateway) -> dict[str, Any]:
    response = await gateway.client.get("/openapi.json", headers=gateway.auth(Role.AUDITOR))
    assert response.status == 200, await response.text()
    assert response.content_type == "application/json"
    return dict(await response.json())


def _validator(document: dict[str, Any], schema: dict[str, Any]) -> Draft202012Validator:
    """A validator for ``schema`` whose ``#/components/...`` references resolve in ``document``."""
    root = {"$schema": "https://json-schema.org/draft/2020-12/schema", "components": document["components"],
            "allOf": [schema]}
    Draft202012Validator.check_schema(root)
    return Draft202012Validator(root)


def _operation(document: dict[str, Any], method: str, template: str) -> dict[str, Any]:
    assert template in document["paths"], f"{template} is not documented"
    operations = document["paths"][template]
    assert method.lower() in operations, f"{method} {template} is not documented"
    return dict(operations[method.lower()])


async def conforms(document: dict[str, Any], method: str, template: str, response: ClientResponse) -> Any:
    """The response's status and content type are documented for the operation and its body fits
    the documented schema. Returns the parsed body."""
    operation = _operation(document, method, template)
    text = await response.text()
    documented = operation["responses"]
    assert str(response.status) in documented, f"{method} {template}: {response.status} not documented ({text})"
    content = documented[str(response.status)].get("content", {})
    assert response.content_type in content, (
        f"{method} {template} {response.status}: {response.content_type} not in {sorted(content)}"
    )
    if not response.content_type.endswith("json"):
        return text
    body = await response.json(content_type=None)
    errors = sorted(_validator(document, content[response.content_type]["schema"]).iter_errors(body), key=str)
    assert not errors, f"{method} {template} {response.status}: " + "; ".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5]
    )
    return body


def _request_schema(document: dict[str, Any], method: str, template: str) -> Draft202012Validator:
    body = _operation(document, method, template)["requestBody"]
    return _validator(document, body["content"]["application/json"]["schema"])


# --- the document itself -------------------------------------------------------------------------


async def test_openapi_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"] == "3.1.0"
    assert document["info"]["title"] and document["info"]["version"]
    validate_spec(document)  # raises OpenAPIValidationError on any structural problem


async def test_needs_authentication(gateway: Gateway) -> None:
    response = await gateway.client.get("/openapi.json")
    assert response.status == 401


async def test_operations_are_exactly_the_routes(gateway: Gateway, document: dict[str, Any]) -> None:
    routes = set()
    for route in gateway.client.server.app.router.routes():
        if route.method == "HEAD":
            continue
        info = route.resource.get_info() if route.resource is not None else {}
        routes.add((route.method.lower(), info.get("path") or info.get("formatter")))
    documented = {
        (method, path) for path, operations in document["paths"].items() for method in operations if method in METHODS
    }
    assert documented == routes, (
        f"undocumented: {sorted(routes - documented)}; documented but not served: {sorted(documented - routes)}"
    )
    assert routes == {(e.method.lower(), e.path) for e in all_endpoints()}


async def test_every_operation_documents_its_responses(document: dict[str, Any]) -> None:
    operation_ids = []
    endpoints = {(e.method.lower(), e.path): e for e in all_endpoints()}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            where = f"{method.upper()} {path}"
            endpoint = endpoints[(method, path)]
            operation_ids.append(operation["operationId"])
            responses = operation["responses"]
            assert responses, where
            successes = {s for s in responses if s.startswith("2")}
            assert str(endpoint.response_status) in successes, where
            assert successes - {str(endpoint.response_status)} <= {str(s) for s in endpoint.responses}, where
            for status, response in responses.items():
                assert response["description"], (where, status)
                assert response.get("content"), (where, status)
                if not status.startswith("2"):
                    assert set(response["content"]) == {"application/problem+json"}, (where, status)
            if endpoint.permission is not None:
                assert {"401", "403"} <= set(responses), where
                assert operation.get("security") != [], where
            else:
                assert operation["security"] == [], where
            if endpoint.request_model is not None or endpoint.raw_body is not None:
                assert {"400", "413", "415"} <= set(responses), where
                assert operation["requestBody"]["required"] is True, where
            else:
                assert "requestBody" not in operation, where
            parameters = {p["name"]: p for p in operation.get("parameters", [])}
            for name in re.findall(r"{(\w+)}", path):
                assert parameters[name]["in"] == "path" and parameters[name]["required"] is True, (where, name)
            if endpoint.idempotency != "none":
                assert parameters["Idempotency-Key"]["in"] == "header", where
                assert "409" in responses, where
    assert len(operation_ids) == len(set(operation_ids)), "operationIds must be unique"


# --- real responses against the document ---------------------------------------------------------


async def test_key_documents_match_schema(
    gateway: Gateway, document: dict[str, Any], raw_keys: dict[str, Any]
) -> None:
    admin = gateway.auth(Role.ADMIN)
    for name in ("p256", "k1", "ed"):
        response = await gateway.client.get(f"/v1/keys/{raw_keys[name]['key_id']}", headers=admin)
        body = await conforms(document, "GET", "/v1/keys/{key_id}", response)
        assert body["key_id"] == raw_keys[name]["key_id"]
    await conforms(document, "GET", "/v1/keys", await gateway.client.get("/v1/keys", headers=admin))
    response = await gateway.client.post(
        "/v1/keys", json={"label": f"openapi-{secrets.token_hex(4)}", "algorithm": "ecdsa-secp256k1",
                          "usage": ["evm"]},
        headers=admin,
    )
    assert response.status == 201
    body = await conforms(document, "POST", "/v1/keys", response)
    assert body["address"].startswith("0x")


async def test_sign_responses_match_schema(
    gateway: Gateway, document: dict[str, Any], raw_keys: dict[str, Any]
) -> None:
    backend = gateway.auth(Role.BACKEND)
    for name in ("p256", "ed"):
        request = {"digest": os.urandom(32).hex()}
        assert not list(_request_schema(document, "POST", "/v1/keys/{key_id}/sign").iter_errors(request))
        response = await gateway.client.post(
            f"/v1/keys/{raw_keys[name]['key_id']}/sign", json=request,
            headers=backend | {"Idempotency-Key": secrets.token_hex(8)},
        )
        assert response.status == 200
        await conforms(document, "POST", "/v1/keys/{key_id}/sign", response)
    request = {"key_id": raw_keys["k1"]["key_id"], "digests": [os.urandom(32).hex() for _ in range(3)]}
    assert not list(_request_schema(document, "POST", "/v1/sign/batch").iter_errors(request))
    response = await gateway.client.post("/v1/sign/batch", json=request, headers=backend)
    assert response.status == 200
    assert len((await conforms(document, "POST", "/v1/sign/batch", response))["signatures"]) == 3


async def test_audit_responses_match_schema(gateway: Gateway, document: dict[str, Any]) -> None:
    auditor = gateway.auth(Role.AUDITOR)
    response = await gateway.client.get("/v1/audit", params={"limit": "50"}, headers=auditor)
    page = await conforms(document, "GET", "/v1/audit", response)
    assert page["entries"], "the audit log has entries by now"
    response = await gateway.client.get("/v1/audit/verify", headers=auditor)
    await conforms(document, "GET", "/v1/audit/verify", response)
    response = await gateway.client.get("/v1/audit/checkpoints", params={"limit": "5"}, headers=auditor)
    await conforms(document, "GET", "/v1/audit/checkpoints", response)
    parameters = {p["name"] for p in _operation(document, "GET", "/v1/audit")["parameters"]}
    assert parameters == {"after_seq", "limit"}


async def test_service_and_session_responses_match_schema(gateway: Gateway, document: dict[str, Any]) -> None:
    await conforms(document, "GET", "/healthz", await gateway.client.get("/healthz"))
    await conforms(document, "GET", "/readyz", await gateway.client.get("/readyz"))
    text = await conforms(document, "GET", "/metrics",
                          await gateway.client.get("/metrics", headers=gateway.auth(Role.ADMIN)))
    assert "# TYPE" in text
    response = await gateway.client.post("/v1/sessions", json={"username": "teller1", "password": PASSWORDS["teller1"]})
    assert response.status == 201
    await conforms(document, "POST", "/v1/sessions", response)
    response = await gateway.client.post("/v1/sessions", json={"username": "teller1", "password": "wrong-password"})
    assert response.status == 401
    await conforms(document, "POST", "/v1/sessions", response)


async def test_wallet_and_transfer_responses_match_schema(
    gateway: Gateway, document: dict[str, Any], raw_keys: dict[str, Any]
) -> None:
    teller, backend = gateway.auth(Role.TELLER), gateway.auth(Role.BACKEND)
    wallets = []
    for _ in range(2):
        response = await gateway.client.post(
            "/v1/wallets", json={"holder_name": "Schema Test", "id_number": "110101199003070011",
                                 "phone": "13800138000", "tier": 1, "kind": "personal"}, headers=teller)
        assert response.status == 201, await response.text()
        wallets.append((await conforms(document, "POST", "/v1/wallets", response))["wallet_id"])
    payer, payee = wallets
    response = await gateway.client.post(f"/v1/wallets/{payer}/cash-in", json={"amount_fen": 10_000},
                                         headers=teller | {"Idempotency-Key": secrets.token_hex(8)})
    await conforms(document, "POST", "/v1/wallets/{wallet_id}/cash-in", response)
    response = await gateway.client.post("/v1/transfers", json={"from_wallet": payer, "to_wallet": payee,
                                                                "amount_fen": 2_500, "memo": "schema"},
                                         headers=backend | {"Idempotency-Key": secrets.token_hex(8)})
    assert response.status == 201, await response.text()
    transfer = await conforms(document, "POST", "/v1/transfers", response)
    for method, template, path in (
        ("GET", "/v1/wallets/{wallet_id}", f"/v1/wallets/{payer}"),
        ("GET", "/v1/wallets", "/v1/wallets?q=Schema"),
        ("GET", "/v1/wallets/{wallet_id}/transactions", f"/v1/wallets/{payer}/transactions"),
        ("GET", "/v1/transfers/{transfer_id}", f"/v1/transfers/{transfer['transfer_id']}"),
        ("GET", "/v1/approvals", "/v1/approvals?status=all"),
    ):
        response = await gateway.client.get(path, headers=backend)
        assert response.status == 200, (path, await response.text())
        await conforms(document, method, template, response)
    response = await gateway.client.post("/v1/transfers", json={"from_wallet": payer, "to_wallet": payee,
                                                                "amount_fen": 10**9},
                                         headers=backend | {"Idempotency-Key": secrets.token_hex(8)})
    assert response.status in (422, 202), await response.text()
    await conforms(document, "POST", "/v1/transfers", response)


async def test_problem_documents_match_schema(
    gateway: Gateway, document: dict[str, Any], raw_keys: dict[str, Any]
) -> None:
    backend, admin = gateway.auth(Role.BACKEND), gateway.auth(Role.ADMIN)
    sign = "/v1/keys/{key_id}/sign"
    p256 = raw_keys["p256"]["key_id"]
    cases: list[tuple[str, str, ClientResponse, int]] = [
        ("GET", "/v1/keys/{key_id}",
         await gateway.client.get(f"/v1/keys/{secrets.token_hex(16)}", headers=backend), 404),
        ("POST", sign, await gateway.client.post(f"/v1/keys/{p256}/sign", json={"digest": "00"}), 401),
        ("POST", sign, await gateway.client.post(f"/v1/keys/{p256}/sign", json={"digest": "00" * 32},
                                                 headers=admin), 403),
        ("POST", sign, await gateway.client.post(f"/v1/keys/{raw_keys['ecny']['key_id']}/sign",
                                                 json={"digest": "00" * 32}, headers=backend), 403),
        ("POST", sign, await gateway.client.post(f"/v1/keys/{p256}/sign", json={"digest": "zz"}, headers=backend),
         400),
        ("POST", sign, await gateway.client.post(f"/v1/keys/{p256}/sign", data=b"{",
                                                 headers=backend | {"Content-Type": "application/json"}), 400),
        ("POST", sign, await gateway.client.post(f"/v1/keys/{p256}/sign", data=b"digest=00",
                                                 headers=backend | {"Content-Type": "text/plain"}), 415),
        ("POST", sign, await gateway.client.post(
            f"/v1/keys/{p256}/sign", data=b'{"digest":"' + b"00" * 600_000 + b'"}',
            headers=backend | {"Content-Type": "application/json"}), 413),
        ("POST", "/v1/keys", await gateway.client.post(
            "/v1/keys", json={"label": raw_keys["p256"]["label"], "algorithm": "ecdsa-p256", "usage": ["raw"]},
            headers=admin), 409),
        ("POST", "/v1/sign/batch", await gateway.client.post(
            "/v1/sign/batch", json={"key_id": p256, "digests": ["00" * 32] * 1001}, headers=backend), 413),
        ("GET", "/v1/audit", await gateway.client.get("/v1/audit", params={"limit": "1.5"},
                                                      headers=gateway.auth(Role.AUDITOR)), 400),
    ]
    for method, template, response, status in cases:
        assert response.status == status, (method, template, await response.text())
        problem = await conforms(document, method, template, response)
        assert problem["status"] == status


async def test_request_schemas_refuse_what_the_server_refuses(document: dict[str, Any]) -> None:
    sign = _request_schema(document, "POST", "/v1/keys/{key_id}/sign")
    for body in ({"digest": "zz"}, {"digest": "abc"}, {"digest": 12}, {"digest": "00", "extra": 1}, {}, ["00"]):
        assert list(sign.iter_errors(body)), body
    create = _request_schema(document, "POST", "/v1/keys")
    assert not list(create.iter_errors({"label": "a-key", "algorithm": "ed25519", "usage": ["raw"]}))
    for body in ({"label": "a-key", "algorithm": "rsa", "usage": ["raw"]},
                 {"label": "a-key", "algorithm": "ed25519", "usage": []},
                 {"label": "a-key", "algorithm": "ed25519", "usage": ["nonsense"]},
                 {"label": "-bad", "algorithm": "ed25519", "usage": ["raw"]}):
        assert list(create.iter_errors(body)), body
