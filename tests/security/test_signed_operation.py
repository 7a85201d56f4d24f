"""The one signed operation (issue 15): record and commit before the HSM, sign, store with the answer.

Tried as a client would after a crash or an HSM outage between commit and signing: the retry with the
same Idempotency-Key must finish *that* work — one record, one audit entry, one spend, one signature —
never do it a second time. The HSM failure is real from the operation's point of view: the signer
the service holds raises :class:`~gateway.errors.HsmUnavailable` once, as the pool does when its
workers are gone. Signatures are checked with independent clients (eth-account, pycose).
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Sequence
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data

from gateway.auth.roles import Role
from gateway.errors import HsmUnavailable
from tests.api.support import assert_problem, audit_entries, runtime
from tests.api.test_evm import permit_document
from tests.api.test_wallets import cash_in, open_wallet, verify_with_pycose, wallet
from tests.conftest import EVM_TEST_CHAIN_ID, Gateway, new_evm_key

pytestmark = pytest.mark.softhsm


class FailingOnce:
    """A signer whose first signature fails as an unavailable HSM does; later ones go to the real signer."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.calls = 0

    async def sign(self, key_id: str, algorithm: str, data: bytes) -> bytes:
        self.calls += 1
        if self.calls == 1:
            raise HsmUnavailable("simulated: the HSM went away after commit")
        signature: bytes = await self.real.sign(key_id, algorithm, data)
        return signature

    async def sign_many(self, key_id: str, algorithm: str, items: Sequence[bytes]) -> list[bytes]:
        signatures: list[bytes] = await self.real.sign_many(key_id, algorithm, items)
        return signatures


async def test_typed_data_retried_after_a_crash_is_signed_once_and_counted_once(
    evm_gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EIP-712 request retried after a crash signed or counted twice: the retry with the same
    Idempotency-Key signs the request recorded by the first attempt (same request id), and the
    permit's amount counts once against the day; no second request is recorded."""
    gw = evm_gateway
    key = await new_evm_key(gw, f"so-712-{uuid.uuid4().hex[:6]}")
    service = runtime(gw).typed_data
    failing = FailingOnce(service.signer)
    monkeypatch.setattr(service, "signer", failing)
    document = permit_document(key["address"], "1000000")
    body = {"key_id": key["key_id"], "chain_id": EVM_TEST_CHAIN_ID, "typed_data": document}
    headers = {**gw.auth(Role.BACKEND), "Idempotency-Key": uuid.uuid4().hex}
    seq = (await audit_entries(gw))[-1]["seq"]

    await assert_problem(await gw.client.post("/v1/evm/typed-data", json=body, headers=headers), 503,
                         "hsm-unavailable")
    database = runtime(gw).database

    def stored(tx: Any) -> list[Any]:
        return tx.fetchall("SELECT request_id, status FROM evm_typed_data WHERE signer = ?", (key["address"],))

    rows = await database.read(stored)
    assert [row["status"] for row in rows] == ["unsigned"]  # recorded and committed before the HSM was asked

    retry = await gw.client.post("/v1/evm/typed-data", json=body, headers=headers)
    assert retry.status == 200, await retry.text()
    signed = await retry.json()
    assert signed["request_id"] == rows[0]["request_id"] and signed["status"] == "signed"
    assert Account.recover_message(encode_typed_data(full_message=document), signature=signed["signature"]) \
        == key["address"]
    again = await gw.client.post("/v1/evm/typed-data", json=body, headers=headers)
    assert again.status == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert await again.json() == signed

    assert len(await database.read(stored)) == 1
    spend = await database.read(lambda tx: tx.fetchall(
        "SELECT amount FROM evm_spend WHERE address = ?", (key["address"],)))
    assert [int(row["amount"]) for row in spend] == [1_000_000]
    allowed = [e for e in await audit_entries(gw, seq) if e["action"] == "evm.typed_data.sign"
               and e["decision"] == "allowed"]
    assert [e["result"]["request_id"] for e in allowed] == [signed["request_id"]]
    assert failing.calls == 2


async def test_transfer_retried_after_an_hsm_outage_has_one_posting_one_audit_entry_one_envelope(
    ledger_gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Transfer retried after an HSM outage posted or audited twice: the first attempt commits the
    posting and its audit entry, then fails at the HSM (503); the retry signs that transfer — the
    envelope verifies with pycose — with exactly one audit entry and one posting."""
    gw = ledger_gateway
    payer, payee = await open_wallet(gw), await open_wallet(gw)
    await cash_in(gw, payer, 1_000)
    wallets = runtime(gw).wallets
    failing = FailingOnce(wallets.signer)
    monkeypatch.setattr(wallets, "signer", failing)
    headers = {**gw.auth(Role.BACKEND), "Idempotency-Key": uuid.uuid4().hex}
    body = {"from_wallet": payer, "to_wallet": payee, "amount_fen": 300}
    seq = (await audit_entries(gw))[-1]["seq"]

    await assert_problem(await gw.client.post("/v1/transfers", json=body, headers=headers), 503, "hsm-unavailable")
    retry = await gw.client.post("/v1/transfers", json=body, headers=headers)
    assert retry.status == 201, await retry.text()
    document = await retry.json()
    key = await (await gw.client.get(f"/v1/keys/{document['kid']}", headers=gw.auth(Role.BACKEND))).json()
    assert verify_with_pycose(document["envelope"], key["public_key_pem"])["amount"] == 300

    created = [e for e in await audit_entries(gw, seq) if e["action"] == "transfers.create"]
    assert [(e["decision"], e["result"]["transfer_id"]) for e in created] == [("allowed", document["transfer_id"])]
    assert (await wallet(gw, payer))["balance_fen"] == 700 and (await wallet(gw, payee))["balance_fen"] == 300


def test_the_operations_below_the_api_load_without_it() -> None:
    """A flow below the API calling back into HTTP code: the signed operation, the idempotency records
    and every flow that uses them import in a fresh interpreter without loading any ``gateway.api``
    module (import-linter checks the same statically; this catches what a deferred import would hide)."""
    modules = ["gateway.operations.signed", "gateway.operations.idempotency", "gateway.wallets.accounts",
               "gateway.offline.devices", "gateway.evm.transactions", "gateway.evm.typed_data"]
    script = ("import importlib, json, sys\n"
              f"for name in {modules!r}: importlib.import_module(name)\n"
              "print(json.dumps(sorted(m for m in sys.modules if m.startswith('gateway'))))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                                       text=True).stdout)
    assert set(modules) <= set(loaded)  # the positive control: they did load
    assert [name for name in loaded if name == "gateway.api" or name.startswith("gateway.api.")] == []
