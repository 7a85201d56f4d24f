"""Bad requests get the right status and problem `type` — never a 500 — and sign nothing.

"Nothing signed" is checked the way an auditor would: through GET /v1/audit, no new allowed
`keys.sign` / `keys.sign_batch` entry after the bad request.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from gateway.auth.roles import Role
from tests.api.support import assert_problem, audit_entries, audit_head, signed
from tests.conftest import Gateway

pytestmark = pytest.mark.softhsm

JSON = {"Content-Type": "application/json"}


class Audit:
    def __init__(self, gateway: Gateway, head: int) -> None:
        self.gateway = gateway
        self.head = head

    async def new_signatures(self) -> list[dict[str, Any]]:
        return signed(await audit_entries(self.gateway, self.head))


@pytest_asyncio.fixture
async def nothing_signed(gateway: Gateway) -> AsyncIterator[Audit]:
    """Fails the test if an allowed signing entry appears in the audit log while it runs."""
    audit = Audit(gateway, await audit_head(gateway))
    yield audit
    assert await audit.new_signatures() == [], "a bad request was signed"


def _sign_path(raw_keys: dict[str, Any], name: str = "p256") -> str:
    return f"/v1/keys/{raw_keys[name]['key_id']}/sign"


async def _post_raw(gateway: Gateway, path: str, data: bytes, content_type: str = "application/json") -> Any:
    headers = gateway.auth(Role.BACKEND) | {"Content-Type": content_type}
    return await gateway.client.post(path, data=data, headers=headers)


async def test_the_audit_check_sees_a_real_signature(gateway: Gateway, raw_keys: dict[str, Any]) -> None:
    """The `nothing_signed` check can fail: a good request does show up."""
    audit = Audit(gateway, await audit_head(gateway))
    response = await gateway.client.post(
        _sign_path(raw_keys), json={"digest": os.urandom(32).hex()}, headers=gateway.auth(Role.BACKEND)
    )
    assert response.status == 200, await response.text()
    entries = await audit.new_signatures()
    assert [e["key_id"] for e in entries] == [raw_keys["p256"]["key_id"]]


@pytest.mark.parametrize(
    "data",
    [b'{"digest": ', b"{digest: '00'}", b"\xff\xfe", b'{"digest": "00"} trailing', b"[" * 5000 + b"]" * 5000, b"NaN"],
    ids=["truncated", "single-quotes", "not-utf8", "trailing-garbage", "too-deep", "nan"],
)
async def test_malformed_json_is_invalid_body(
    gateway: Gateway, raw_keys: dict[str, Any], nothing_signed: Audit, data: bytes
) -> None:
    await assert_problem(await _post_raw(gateway, _sign_path(raw_keys), data), 400, "invalid-body")


@pytest.mark.parametrize("data", [b'["00"]', b'"00"', b"12", b"null", b"true", b"{}", b""],
                         ids=["array", "string", "number", "null", "bool", "empty-object", "empty-body"])
async def test_json_that_is_not_the_object_is_validation_failed(
    gateway: Gateway, raw_keys: dict[str, Any], nothing_signed: Audit, data: bytes
) -> None:
    await assert_problem(await _post_raw(gateway, _sign_path(raw_keys), data), 400, "validation-failed")


@pytest.mark.parametrize(
    "digest",
    ["zz", "abc", "0", "", "0x" + "00" * 32, " " + "00" * 32, "00" * 31 + "g0", 12, 1.5, None, True, ["00"]],
    ids=["not-hex", "odd-length", "one-digit", "empty", "0x-prefix", "space", "non-hex-tail", "int", "float",
         "null", "bool", "list"],
)
async def test_bad_digest_is_validation_failed(
    gateway: Gateway, raw_keys: dict[str, Any], nothing_signed: Audit, digest: Any
) -> None:
    response = await gateway.client.post(_sign_path(raw_keys), json={"digest": digest},
                                         headers=gateway.auth(Role.BACKEND))
    problem = await assert_problem(response, 400, "validation-failed")
    assert [error["field"] for error in problem["errors"]][:1] == ["digest"]


@pytest.mark.parametrize("size", [0, 1, 31, 33, 64])
@pytest.mark.parametrize("key", ["p256", "k1"])
async def test_wrong_digest_length_for_ecdsa(
    gateway: Gateway, raw_keys: dict[str, Any], nothing_signed: Audit, key: str, size: int
) -> None:
    if size == 0:  # "" fails the hex pattern before the length check
        digest = ""
    else:
        digest = os.urandom(size).hex()
    response = await gateway.client.post(_sign_path(raw_keys, key), json={"digest": digest},
                                         headers=gateway.auth(Role.BACKEND))
    await assert_problem(response, 400, "validation-failed")


async def test_wrong_digest_length_in_a_batch(gateway: Gateway, raw_keys: dict[str, Any],
                                              nothing_signed: Audit) -> None:
    digests = [os.urandom(32).hex(), os.urandom(33).hex()]
    response = await gateway.client.post("/v1/sign/batch", json={"key_id": raw_keys["p256"]["key_id"],
                                                                 "digests": digests},
                                         headers=gateway.auth(Role.BACKEND))
    await assert_problem(response, 400, "validation-failed")


async def test_ed25519_message_over_64_kib_is_refused(gateway: Gateway, raw_keys: dict[str, Any]) -> None:
    audit = Audit(gateway, await audit_head(gateway))
    response = await gateway.client.post(_sign_path(raw_keys, "ed"), json={"digest": "00" * 65537},
                                         headers=gateway.auth(Role.BACKEND))
    await assert_problem(response, 400, "validation-failed")  # the hex field holds at most 64 KiB
    assert await audit.new_signatures() == []
    response = await gateway.client.post(_sign_path(raw_keys, "ed"), json={"digest": "00" * 65536},
                                         headers=gateway.auth(Role.BACKEND))
    assert response.status == 200, await response.text()  # the limit itself is fine
    assert len(await audit.new_signatures()) == 1


async def test_unknown_key_id_is_key_not_found(gateway: Gateway, nothing_signed: Audit) -> None:
    unknown = secrets.token_hex(16)
    response = await gateway.client.post(f"/v1/keys/{unknown}/sign", json={"digest": "00" * 32},
                                         headers=gateway.auth(Role.BACKEND))
    await assert_problem(response, 404, "key-not-found")
    await assert_problem(await gateway.client.get(f"/v1/keys/{unknown}", headers=gateway.auth(Role.BACKEND)),
                         404, "key-not-found")
    response = await gateway.client.post("/v1/sign/batch", json={"key_id": unknown, "digests": ["00" * 32]},
                                         headers=gateway.auth(Role.BACKEND))
    await assert_problem(response, 404, "key-not-found")


@pytest.mark.parametrize("key_id", ["nothex", "ABCDEF" * 5 + "AB", "0" * 31, "0" * 33, "%2e%2e", "x" * 300, "é" * 32],
                         ids=["word", "upper-case", "short", "long", "dots", "very-long", "non-ascii"])
async def test_malformed_key_id_is_not_found(
    gateway: Gateway, nothing_signed: Audit, raw_keys: dict[str, Any], key_id: str
) -> None:
    response = await gateway.client.post(f"/v1/keys/{key_id}/sign", json={"digest": "00" * 32},
                                         headers=gateway.auth(Role.BACKEND))
    await assert_problem(response, 404)
    response = await gateway.client.get(f"/v1/keys/{key_id}", headers=gateway.auth(Role.BACKEND))
    await assert_problem(response, 404)


async def test_upper_case_key_id_of_a_real_key_is_not_found(
    gateway: Gateway, raw_keys: dict[str, Any], nothing_signed: Audit
) -> None:
    key_id = raw_keys["p256"]["key_id"].upper()
    response = await gateway.client.post(f"/v1/keys/{key_id}/sign", json={"digest": "00" * 32},
                                         headers=gateway.auth(Role.BACKEND))
    await assert_problem(response, 404, "key-not-found")


async def test_key_without_raw_usage_is_refused(
    gateway: Gateway, raw_keys: dict[str, Any], nothing_signed: Audit
) -> None:
    for name in ("ecny", "audit"):
        response = await gateway.client.post(_sign_path(raw_keys, name), json={"digest": "00" * 32},
                                             headers=gateway.auth(Role.BACKEND))
        await assert_problem(response, 403, "key-usage-not-allowed")
        response = await gateway.client.post(
            "/v1/sign/batch", json={"key_id": raw_keys[name]["key_id"], "digests": ["00" * 32]},
            headers=gateway.auth(Role.BACKEND),
        )
        await assert_problem(response, 403, "key-usage-not-allowed")


async def test_usage_refusal_is_audited(gateway: Gateway, raw_keys: dict[str, Any], nothing_signed: Audit) -> None:
    request_id = f"usage-{secrets.token_hex(6)}"
    response = await gateway.client.post(_sign_path(raw_keys, "ecny"), json={"digest": "00" * 32},
                                         headers=gateway.auth(Role.BACKEND) | {"X-Request-Id": request_id})
    await assert_problem(response, 403, "key-usage-not-allowed")
    entries = [e for e in await audit_entries(gateway, nothing_signed.head) if e["request_id"] == request_id]
    assert [(e["action"], e["decision"], e["reasons"][0]) for e in entries] == [
        ("keys.sign", "refused", "key-usage-not-allowed")
    ]


async def test_oversize_body_is_payload_too_large(
    gateway: Gateway, raw_keys: dict[str, Any], nothing_signed: Audit
) -> None:
    limit = gateway.settings.server.max_body_bytes
    body = b'{"digest": "' + b"00" * (limit // 2 + 16) + b'"}'
    assert len(body) > limit
    await assert_problem(await _post_raw(gateway, _sign_path(raw_keys), body), 413, "payload-too-large")
    await assert_problem(await _post_raw(gateway, "/v1/sign/batch", body), 413, "payload-too-large")
    # The connection and the gateway are still fine afterwards.
    response = await gateway.client.get("/healthz")
    assert response.status == 200


async def test_batch_over_a_thousand_digests_is_too_large(
    gateway: Gateway, raw_keys: dict[str, Any], nothing_signed: Audit
) -> None:
    digests = ["00" * 32] * 1001
    response = await gateway.client.post("/v1/sign/batch", json={"key_id": raw_keys["p256"]["key_id"],
                                                                 "digests": digests},
                                         headers=gateway.auth(Role.BACKEND))
    await assert_problem(response, 413, "payload-too-large")


async def test_empty_batch_is_validation_failed(
    gateway: Gateway, raw_keys: dict[str, Any], nothing_signed: Audit
) -> None:
    response = await gateway.client.post("/v1/sign/batch", json={"key_id": raw_keys["p256"]["key_id"],
                                                                 "digests": []},
                                         headers=gateway.auth(Role.BACKEND))
    await assert_problem(response, 400, "validation-failed")


@pytest.mark.parametrize(
    "query",
    [{"limit": "1.5"}, {"limit": "0"}, {"limit": "1001"}, {"limit": "-1"}, {"limit": "ten"}, {"limit": "1e2"},
     {"after_seq": "-1"}, {"after_seq": "0.5"}, {"after_seq": "9" * 30}, {"after_seq": "9" * 5000},
     {"limit": "\u00b2"}, {"limit": "\u0663"}, {"limit": " 5"}],
    ids=["float", "zero", "over-max", "negative", "word", "exponent", "negative-after", "float-after", "huge-after",
         "5000-digits", "superscript-two", "arabic-indic-three", "leading-space"],
)
async def test_bad_audit_query_is_validation_failed(gateway: Gateway, query: dict[str, str]) -> None:
    response = await gateway.client.get("/v1/audit", params=query, headers=gateway.auth(Role.AUDITOR))
    await assert_problem(response, 400, "validation-failed")


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/sign/batch", {"key_id": 12, "digests": ["00" * 32]}, "key_id"),
        ("/v1/sign/batch", {"key_id": "KEY", "digests": "00" * 32}, "digests"),
        ("/v1/keys", {"label": 12, "algorithm": "ecdsa-p256", "usage": ["raw"]}, "label"),
        ("/v1/keys", {"label": "ok-label", "algorithm": "ecdsa-p256", "usage": "raw"}, "usage"),
        ("/v1/keys", {"label": "ok-label", "algorithm": 1, "usage": ["raw"]}, "algorithm"),
        ("/v1/sessions", {"username": 1.0, "password": "x" * 12}, "username"),
    ],
    ids=["int-key-id", "string-digests", "int-label", "string-usage", "int-algorithm", "float-username"],
)
async def test_wrong_json_type_is_validation_failed(
    gateway: Gateway, nothing_signed: Audit, path: str, body: dict[str, Any], field: str
) -> None:
    role = Role.ADMIN if path == "/v1/keys" else Role.BACKEND
    response = await gateway.client.post(path, json=body, headers=gateway.auth(role))
    problem = await assert_problem(response, 400, "validation-failed")
    assert field in {error["field"].split(".")[0] for error in problem["errors"]}, problem


async def test_extra_field_is_validation_failed(
    gateway: Gateway, raw_keys: dict[str, Any], nothing_signed: Audit
) -> None:
    response = await gateway.client.post(_sign_path(raw_keys), json={"digest": "00" * 32, "hash": "sha256"},
                                         headers=gateway.auth(Role.BACKEND))
    problem = await assert_problem(response, 400, "validation-failed")
    assert "hash" in {error["field"] for error in problem["errors"]}
    response = await gateway.client.post(
        "/v1/keys", json={"label": f"extra-{secrets.token_hex(4)}", "algorithm": "ed25519", "usage": ["raw"],
                          "extractable": True},
        headers=gateway.auth(Role.ADMIN),
    )
    await assert_problem(response, 400, "validation-failed")


async def test_missing_field_is_validation_failed(gateway: Gateway, nothing_signed: Audit) -> None:
    response = await gateway.client.post("/v1/sign/batch", json={"digests": ["00" * 32]},
                                         headers=gateway.auth(Role.BACKEND))
    problem = await assert_problem(response, 400, "validation-failed")
    assert "key_id" in {error["field"] for error in problem["errors"]}


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "application/cbor",
                                          "application/octet-stream", "multipart/form-data; boundary=x"])
async def test_wrong_content_type_is_unsupported(
    gateway: Gateway, raw_keys: dict[str, Any], nothing_signed: Audit, content_type: str
) -> None:
    body = b'{"digest": "' + os.urandom(32).hex().encode() + b'"}'
    response = await _post_raw(gateway, _sign_path(raw_keys), body, content_type)
    await assert_problem(response, 415, "unsupported-media-type")


async def test_json_with_charset_is_accepted(gateway: Gateway, raw_keys: dict[str, Any]) -> None:
    body = b'{"digest": "' + os.urandom(32).hex().encode() + b'"}'
    response = await _post_raw(gateway, _sign_path(raw_keys), body, "application/json; charset=utf-8")
    assert response.status == 200, await response.text()


@pytest.mark.parametrize("path", ["/v1/nothing", "/v1/keys/" + "0" * 32 + "/sign/extra", "/", "/v2/keys"])
async def test_unknown_endpoint_is_a_problem_404(gateway: Gateway, path: str) -> None:
    await assert_problem(await gateway.client.get(path), 404, "not-found")
    await assert_problem(await gateway.client.post(path, json={}, headers=gateway.auth(Role.BACKEND)), 404, "not-found")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [("DELETE", "/v1/keys", {"GET", "POST"}), ("PUT", "/v1/keys/" + "0" * 32, {"GET"}),
     ("GET", "/v1/sign/batch", {"POST"}), ("POST", "/healthz", {"GET"}), ("PATCH", "/v1/audit", {"GET"})],
)
async def test_wrong_method_is_a_problem_405(gateway: Gateway, method: str, path: str, allowed: set[str]) -> None:
    response = await gateway.client.request(method, path, headers=gateway.auth(Role.ADMIN))
    await assert_problem(response, 405, "method-not-allowed")
    # RFC 9110 §15.5.6: a 405 carries an Allow header naming the methods the resource has.
    assert {m.strip() for m in response.headers.get("Allow", "").split(",")} == allowed


async def test_unknown_algorithm_is_validation_failed(gateway: Gateway) -> None:
    for algorithm in ("rsa-2048", "ECDSA-P256", "", "sm2x"):
        response = await gateway.client.post(
            "/v1/keys", json={"label": f"algo-{secrets.token_hex(4)}", "algorithm": algorithm, "usage": ["raw"]},
            headers=gateway.auth(Role.ADMIN),
        )
        await assert_problem(response, 400, "validation-failed")


@pytest.mark.parametrize(
    ("algorithm", "usage"),
    [("ed25519", ["evm"]), ("ecdsa-p256", ["evm"]), ("ecdsa-secp256k1", ["ecny"]), ("ecdsa-secp256k1", ["audit"]),
     ("ecdsa-p256", []), ("ecdsa-p256", ["raw", "nonsense"])],
)
async def test_usage_that_does_not_fit_is_validation_failed(
    gateway: Gateway, algorithm: str, usage: list[str]
) -> None:
    before = await gateway.client.get("/v1/keys", headers=gateway.auth(Role.ADMIN))
    response = await gateway.client.post(
        "/v1/keys", json={"label": f"misfit-{secrets.token_hex(4)}", "algorithm": algorithm, "usage": usage},
        headers=gateway.auth(Role.ADMIN),
    )
    await assert_problem(response, 400, "validation-failed")
    after = await gateway.client.get("/v1/keys", headers=gateway.auth(Role.ADMIN))
    assert len((await after.json())["keys"]) == len((await before.json())["keys"])


@pytest.mark.parametrize("label", ["", "-starts-with-dash", "has space", "x" * 65, "ünïcode", "a/b"])
async def test_bad_label_is_validation_failed(gateway: Gateway, label: str) -> None:
    response = await gateway.client.post(
        "/v1/keys", json={"label": label, "algorithm": "ed25519", "usage": ["raw"]}, headers=gateway.auth(Role.ADMIN)
    )
    await assert_problem(response, 400, "validation-failed")


async def test_duplicate_label_is_already_exists(gateway: Gateway, raw_keys: dict[str, Any]) -> None:
    label = raw_keys["ed"]["label"]
    response = await gateway.client.post(
        "/v1/keys", json={"label": label, "algorithm": "ed25519", "usage": ["raw"]}, headers=gateway.auth(Role.ADMIN)
    )
    await assert_problem(response, 409, "already-exists")
    listing = await (await gateway.client.get("/v1/keys", headers=gateway.auth(Role.ADMIN))).json()
    assert [key["label"] for key in listing["keys"]].count(label) == 1


async def test_overlong_idempotency_key_is_validation_failed(
    gateway: Gateway, raw_keys: dict[str, Any], nothing_signed: Audit
) -> None:
    response = await gateway.client.post(
        _sign_path(raw_keys), json={"digest": "00" * 32},
        headers=gateway.auth(Role.BACKEND) | {"Idempotency-Key": "k" * 256},
    )
    await assert_problem(response, 400, "validation-failed")


async def test_sessions_body_errors(gateway: Gateway) -> None:
    await assert_problem(
        await gateway.client.post("/v1/sessions", data=b"{", headers=JSON), 400, "invalid-body"
    )
    await assert_problem(
        await gateway.client.post("/v1/sessions", json={"username": "teller1"}), 400, "validation-failed"
    )
    await assert_problem(
        await gateway.client.post("/v1/sessions", data=b"username=teller1",
                                  headers={"Content-Type": "application/x-www-form-urlencoded"}),
        415, "unsupported-media-type",
    )


@pytest_asyncio.fixture
async def wallet_id(gateway: Gateway) -> str:
    response = await gateway.client.post(
        "/v1/wallets", json={"holder_name": "Bad Input", "phone": "13800138000", "tier": 4, "kind": "personal"},
        headers=gateway.auth(Role.TELLER),
    )
    assert response.status == 201, await response.text()
    return str((await response.json())["wallet_id"])


@pytest.mark.parametrize("amount", [1.5, 100.0, 1e2, "100", True, None, -1, 0, [100]],
                         ids=["float", "integral-float", "exponent", "string", "bool", "null", "negative", "zero",
                              "list"])
async def test_amount_that_is_not_a_positive_integer_is_refused(
    gateway: Gateway, wallet_id: str, amount: Any
) -> None:
    response = await gateway.client.post(
        f"/v1/wallets/{wallet_id}/cash-in", json={"amount_fen": amount},
        headers=gateway.auth(Role.TELLER) | {"Idempotency-Key": secrets.token_hex(8)},
    )
    await assert_problem(response, 400, "validation-failed")
    shown = await gateway.client.get(f"/v1/wallets/{wallet_id}", headers=gateway.auth(Role.TELLER))
    assert (await shown.json())["balance_fen"] == 0


@pytest.mark.parametrize("tier", [2.0, 2.5, "2", 0, 5], ids=["integral-float", "float", "string", "zero", "five"])
async def test_tier_that_is_not_an_integer_in_range_is_validation_failed(
    gateway: Gateway, wallet_id: str, tier: Any
) -> None:
    response = await gateway.client.post(f"/v1/wallets/{wallet_id}/tier", json={"tier": tier},
                                         headers=gateway.auth(Role.TELLER))
    await assert_problem(response, 400, "validation-failed")
    response = await gateway.client.post(
        "/v1/wallets", json={"holder_name": "Bad Tier", "phone": "13800138000", "tier": tier, "kind": "personal"},
        headers=gateway.auth(Role.TELLER),
    )
    await assert_problem(response, 400, "validation-failed")


@pytest.mark.parametrize("cursor", ["\u00b2", "9" * 5000, "9" * 25, "-1", "1.5", "abc"],
                         ids=["superscript-two", "5000-digits", "beyond-64-bit", "negative", "float", "word"])
async def test_bad_transactions_cursor_is_validation_failed(gateway: Gateway, wallet_id: str, cursor: str) -> None:
    response = await gateway.client.get(f"/v1/wallets/{wallet_id}/transactions", params={"cursor": cursor},
                                        headers=gateway.auth(Role.TELLER))
    await assert_problem(response, 400, "validation-failed")
