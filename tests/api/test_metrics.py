"""``ecny_signatures_total`` counts every HSM signature where it is made: raw and batch signing,
transfer envelopes (usage ``ecny``), device certificates and load vouchers (``voucher``), EVM
transactions (``evm``) and audit checkpoints (``audit``). Read back with prometheus-client's own
text parser, against a real gateway on a real SoftHSM2 token."""

from __future__ import annotations

import secrets
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.auth.roles import Role
from gateway.hardwallet.simulator import SimulatedDevice
from tests.api.support import runtime
from tests.conftest import EVM_TEST_CHAIN_ID, Gateway, new_evm_key
from tests.device.flows import ensure_voucher_key, load, open_wallet, register

pytestmark = pytest.mark.softhsm


async def signatures(gw: Gateway) -> dict[tuple[str, str], float]:
    """(algorithm, usage) → count, from ``GET /metrics``."""
    response = await gw.client.get("/metrics", headers=gw.auth(Role.AUDITOR))
    assert response.status == 200
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(await response.text()):
        if family.name == "ecny_signatures":
            for sample in family.samples:
                if sample.name == "ecny_signatures_total":
                    counts[(sample.labels["algorithm"], sample.labels["usage"])] = sample.value
    return counts


def grown(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]) -> dict[tuple[str, str], float]:
    """What grew, leaving out audit checkpoints (they fall due on their own; see the last test)."""
    return {label: after[label] - before.get(label, 0.0) for label in after
            if after[label] != before.get(label, 0.0) and label[1] != "audit"}


async def checkpoints(gw: Gateway) -> int:
    row = await runtime(gw).database.read(lambda tx: tx.fetchone("SELECT COUNT(*) AS n FROM audit_checkpoints"))
    return int(row["n"])


async def test_raw_and_batch_signatures_are_counted(gateway: Gateway, raw_keys: dict[str, dict[str, str]]) -> None:
    key = raw_keys["p256"]
    before = await signatures(gateway)
    response = await gateway.client.post(f"/v1/keys/{key['key_id']}/sign", json={"digest": secrets.token_hex(32)},
                                         headers=gateway.auth(Role.BACKEND))
    assert response.status == 200, await response.text()
    response = await gateway.client.post("/v1/sign/batch", json={"key_id": key["key_id"],
                                                                 "digests": [secrets.token_hex(32)] * 3},
                                         headers=gateway.auth(Role.BACKEND))
    assert response.status == 200, await response.text()
    assert grown(before, await signatures(gateway)) == {("ecdsa-p256", "raw"): 4.0}


async def test_transfer_envelope_certificate_and_voucher_are_counted(
    gateway: Gateway, raw_keys: dict[str, dict[str, str]]  # raw_keys makes the ecny key
) -> None:
    payer, payee = await open_wallet(gateway, cash=10_000), await open_wallet(gateway)
    voucher_key = await ensure_voucher_key(gateway)
    before = await signatures(gateway)
    response = await gateway.client.post(
        "/v1/transfers", json={"from_wallet": payer, "to_wallet": payee, "amount_fen": 100},
        headers={**gateway.auth(Role.BACKEND), "Idempotency-Key": uuid.uuid4().hex})
    assert response.status == 201, await response.text()
    ecny_algorithm = (await (await gateway.client.get(
        f"/v1/keys/{(await response.json())['kid']}", headers=gateway.auth(Role.ADMIN))).json())["algorithm"]
    device = SimulatedDevice.create()
    await register(gateway, device, payer)
    await load(gateway, device, 1_000)
    assert grown(before, await signatures(gateway)) == {(ecny_algorithm, "ecny"): 1.0,
                                                         (voucher_key["algorithm"], "voucher"): 2.0}


async def test_evm_transactions_are_counted(evm_gateway: Gateway) -> None:
    key = await new_evm_key(evm_gateway, f"metrics-{secrets.token_hex(3)}")
    before = await signatures(evm_gateway)
    body = {"key_id": key["key_id"], "chain_id": EVM_TEST_CHAIN_ID, "type": "eip1559", "gas_limit": 21000,
            "max_fee_per_gas": "30000000000", "max_priority_fee_per_gas": "1000000000",
            "to": "0x" + "11" * 20, "value": "1000", "data": "0x"}
    headers = {**evm_gateway.auth(Role.BACKEND), "Idempotency-Key": uuid.uuid4().hex}
    response = await evm_gateway.client.post("/v1/evm/transactions", json=body, headers=headers)
    assert response.status == 200, await response.text()
    assert grown(before, await signatures(evm_gateway)) == {("ecdsa-secp256k1", "evm"): 1.0}


async def test_audit_checkpoints_are_counted(gateway: Gateway, raw_keys: dict[str, dict[str, str]]) -> None:
    before, stored_before = await signatures(gateway), await checkpoints(gateway)
    response = await gateway.client.post(f"/v1/keys/{raw_keys['p256']['key_id']}/sign",
                                         json={"digest": secrets.token_hex(32)}, headers=gateway.auth(Role.BACKEND))
    assert response.status == 200, await response.text()
    # Sign the head now, or wait for the checkpoint the count of entries may just have started
    # (it holds the same lock); either way the new entry ends up checkpointed, and signed once.
    await runtime(gateway).audit.checkpoint()
    after = await signatures(gateway)
    made = after[("ecdsa-p256", "audit")] - before.get(("ecdsa-p256", "audit"), 0.0)
    assert made == await checkpoints(gateway) - stored_before >= 1
