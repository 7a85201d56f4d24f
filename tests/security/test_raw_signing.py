"""Raw and batch signatures through one orchestration (gateway/operations/raw.py): check, sign, then one
store write of the audit entry and the Idempotency-Key answer; the answer leaves only after that write.

Tried as a client (or a second gateway instance) would: retries with the same key, a race with another
instance for one key, and a store that refuses the audit entry. The gateway is the real one (SoftHSM2
token, SQLite); HSM calls are counted by a pass-through wrapper around the real signer, and signatures
are checked with ``cryptography``.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from gateway.auth.roles import Role
from gateway.ledger.store import Tx
from gateway.operations import idempotency
from gateway.operations.idempotency import IdempotentRequest
from tests.api.support import assert_problem, audit_entries, audit_head, runtime, signed
from tests.conftest import Gateway

pytestmark = pytest.mark.softhsm


class CountingSigner:
    """The real signer, counting the signatures the HSM is asked for; ``before_sign`` runs first (once)."""

    def __init__(self, real: Any, before_sign: Any = None) -> None:
        self.real = real
        self.before_sign = before_sign
        self.calls = 0

    async def _before(self) -> None:
        if self.before_sign is not None:
            hook, self.before_sign = self.before_sign, None
            await hook()

    async def sign(self, key_id: str, algorithm: str, data: bytes) -> bytes:
        await self._before()
        self.calls += 1
        signature: bytes = await self.real.sign(key_id, algorithm, data)
        return signature

    async def sign_many(self, key_id: str, algorithm: str, items: Sequence[bytes]) -> list[bytes]:
        await self._before()
        self.calls += len(items)
        signatures: list[bytes] = await self.real.sign_many(key_id, algorithm, items)
        return signatures

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def _public_key(document: dict[str, Any]) -> ec.EllipticCurvePublicKey:
    key = serialization.load_pem_public_key(document["public_key_pem"].encode())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


async def _raw_key(gw: Gateway) -> dict[str, Any]:
    """A fresh ECDSA P-256 key with usage raw, made through the API."""
    response = await gw.client.post("/v1/keys", json={"label": f"raw-{uuid.uuid4().hex[:8]}", "algorithm":
                                                      "ecdsa-p256", "usage": ["raw"]}, headers=gw.auth(Role.ADMIN))
    assert response.status == 201, await response.text()
    document: dict[str, Any] = await response.json()
    return document


async def _sign(gw: Gateway, key_id: str, digest: str, idem: str | None) -> tuple[int, bytes, Any]:
    headers = gw.auth(Role.BACKEND)
    if idem is not None:
        headers["Idempotency-Key"] = idem
    response = await gw.client.post(f"/v1/keys/{key_id}/sign", json={"digest": digest}, headers=headers)
    return response.status, await response.read(), response.headers


async def test_idempotent_raw_sign_retry_returns_the_same_signature_without_a_second_hsm_call(
    ledger_gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Raw signature retried with the same Idempotency-Key signed twice: the retry gets the first
    answer byte for byte, and the HSM is asked once (single and batch; SQLite and PostgreSQL)."""
    gateway = ledger_gateway
    key = await _raw_key(gateway)
    counting = CountingSigner(runtime(gateway).signer)
    monkeypatch.setattr(runtime(gateway), "signer", counting)
    digest, idem = os.urandom(32).hex(), f"raw-{uuid.uuid4()}"
    status, first, _ = await _sign(gateway, key["key_id"], digest, idem)
    assert status == 200 and counting.calls == 1
    status, again, headers = await _sign(gateway, key["key_id"], digest, idem)
    assert status == 200 and again == first and headers.get("Idempotent-Replayed") == "true"
    assert counting.calls == 1, "the retry asked the HSM again"
    signature = bytes.fromhex(json.loads(first)["der"])
    _public_key(key).verify(signature, bytes.fromhex(digest), ec.ECDSA(Prehashed(hashes.SHA256())))

    body = {"key_id": key["key_id"], "digests": [os.urandom(32).hex() for _ in range(5)]}
    headers = {**gateway.auth(Role.BACKEND), "Idempotency-Key": f"raw-batch-{uuid.uuid4()}"}
    responses = [await gateway.client.post("/v1/sign/batch", json=body, headers=headers) for _ in range(2)]
    assert [r.status for r in responses] == [200, 200]
    assert await responses[0].read() == await responses[1].read()
    assert counting.calls == 1 + 5, "the batch retry asked the HSM again"


async def test_a_race_lost_to_another_instance_answers_as_it_did_and_still_audits_the_signature(
    ledger_gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two instances racing one Idempotency-Key: both answers leave, or a signature leaves unaudited.
    Another instance commits its answer for the key while this one signs; this one answers with that
    answer (a replay), and the signature it made — never sent — still has its audit entry (SQLite and
    PostgreSQL)."""
    gw = ledger_gateway
    key_id = (await _raw_key(gw))["key_id"]
    digest, idem = os.urandom(32).hex(), f"raw-race-{uuid.uuid4()}"
    path = f"/v1/keys/{key_id}/sign"
    body = json.dumps({"digest": digest}).encode()
    # What the other instance records: the same caller, key and request (docs/spec.md §5's request hash).
    request = IdempotentRequest("client:test-backend", idem,
                                hashlib.sha256(b"POST " + path.encode() + b"\n" + body).digest())
    winner = idempotency.Recorded(200, "application/json", b'{"signature":"from-the-other-instance"}')

    async def other_instance_answers() -> None:
        assert await idempotency.record_unless_present(runtime(gw).database, request, winner) is None

    monkeypatch.setattr(runtime(gw), "signer", CountingSigner(runtime(gw).signer, other_instance_answers))
    head = await audit_head(gw)
    response = await gw.client.post(path, data=body, headers={
        **gw.auth(Role.BACKEND), "Idempotency-Key": idem, "Content-Type": "application/json"})
    assert response.status == 200 and await response.read() == winner.body
    assert response.headers.get("Idempotent-Replayed") == "true"
    entries = signed(await audit_entries(gw, head))
    assert [e["payload_hash"] for e in entries] == [hashlib.sha256(bytes.fromhex(digest)).hexdigest()]


async def test_no_signature_leaves_when_its_audit_entry_cannot_be_written(
    gateway: Gateway, raw_keys: dict[str, Any]
) -> None:
    """Signature released without its audit entry: when the store refuses the entry, the answer is a
    503 problem with no signature in it and no Idempotency-Key answer is kept; the retry signs and
    audits."""
    gw = gateway
    key_id = raw_keys["p256"]["key_id"]
    database = runtime(gw).database
    digest, idem = os.urandom(32).hex(), f"raw-store-{uuid.uuid4()}"
    head = await audit_head(gw)

    def refuse_audit_entries(tx: Tx) -> None:
        # A trigger whose table is gone: every insert into audit_log on this connection fails in the store.
        tx.execute("CREATE TEMP TABLE audit_refused (x)")
        tx.execute("CREATE TEMP TRIGGER refuse_audit BEFORE INSERT ON audit_log BEGIN "
                   "INSERT INTO audit_refused VALUES (1); END")
        tx.execute("DROP TABLE temp.audit_refused")

    await database.write(refuse_audit_entries)
    try:
        response = await gw.client.post(f"/v1/keys/{key_id}/sign", json={"digest": digest},
                                        headers={**gw.auth(Role.BACKEND), "Idempotency-Key": idem})
        problem = await assert_problem(response, 503)
        assert "signature" not in problem and "der" not in problem
    finally:
        await database.write(lambda tx: tx.execute("DROP TRIGGER temp.refuse_audit"))
    assert signed(await audit_entries(gw, head)) == []
    status, body, headers = await _sign(gw, key_id, digest, idem)
    assert status == 200 and "Idempotent-Replayed" not in headers and b"signature" in body
    assert len(signed(await audit_entries(gw, head))) == 1
