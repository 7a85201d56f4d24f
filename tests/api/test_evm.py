"""Stablecoin signing over HTTP, on SQLite and on PostgreSQL, proven with independent tools:
eth-account recovers and decodes every raw transaction, eth-abi decodes the ERC-20 calldata, an
in-process EVM (eth-tester + py-evm) executes a signed transfer, and eth-account recovers EIP-712
signatures. Nonces: 200 concurrent requests for one address get exactly 0..199."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from typing import Any

import pytest
import rlp  # type: ignore[import-untyped]
from eth_abi.abi import decode as abi_decode
from eth_account import Account
from eth_account._utils.legacy_transactions import Transaction
from eth_account.messages import encode_typed_data
from eth_account.typed_transactions.typed_transaction import TypedTransaction
from eth_utils.crypto import keccak
from hexbytes import HexBytes

from gateway.auth.roles import Role
from gateway.errors import HsmUnavailable
from gateway.evm.transactions import EvmTransactions, transaction_document
from tests.api.support import assert_problem, audit_entries, runtime
from tests.conftest import (
    EVM_CAPPED_TOKEN,
    EVM_DENIED,
    EVM_TEST_CHAIN_ID,
    EVM_TEST_TOKEN,
    Gateway,
    login,
    new_evm_key,
)

pytestmark = pytest.mark.softhsm

RECIPIENT = "0x1111111111111111111111111111111111111111"
GWEI = 10**9


def idem() -> dict[str, str]:
    return {"Idempotency-Key": uuid.uuid4().hex}


def fees(tx_type: str) -> dict[str, Any]:
    if tx_type == "eip1559":
        return {"type": "eip1559", "gas_limit": 90_000, "max_fee_per_gas": str(20 * GWEI),
                "max_priority_fee_per_gas": str(2 * GWEI)}
    return {"type": "legacy", "gas_limit": 90_000, "gas_price": str(20 * GWEI)}


def native(key: dict[str, Any], tx_type: str = "eip1559", value: int = 10**15, to: str = RECIPIENT,
           **extra: Any) -> dict[str, Any]:
    return {"key_id": key["key_id"], "chain_id": EVM_TEST_CHAIN_ID, **fees(tx_type), "to": to, "value": str(value),
            **extra}


def erc20(key: dict[str, Any], method: str = "transfer", amount: int = 5 * 10**6, to: str | None = RECIPIENT,
          token: str = EVM_TEST_TOKEN, tx_type: str = "eip1559", **extra: Any) -> dict[str, Any]:
    intent: dict[str, Any] = {"token": token, "method": method, "amount": str(amount)}
    if to is not None:
        intent["to"] = to
    return {"key_id": key["key_id"], "chain_id": EVM_TEST_CHAIN_ID, **fees(tx_type), "erc20": intent, **extra}


async def sign(gw: Gateway, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    return await gw.client.post("/v1/evm/transactions", json=body,
                                headers={**gw.auth(Role.BACKEND), **(headers or idem())})


async def signed(gw: Gateway, body: dict[str, Any]) -> dict[str, Any]:
    response = await sign(gw, body)
    assert response.status == 200, await response.text()
    document: dict[str, Any] = await response.json()
    assert document["status"] == "signed"
    return document


def decode(raw_hex: str) -> dict[str, Any]:
    """eth-account's own decoding of a raw transaction."""
    raw = HexBytes(raw_hex)
    if raw[0] == 2:
        fields: dict[str, Any] = TypedTransaction.from_bytes(raw).as_dict()
        return fields
    legacy: dict[str, Any] = rlp.decode(bytes(raw), Transaction).as_dict()
    legacy["chainId"] = (legacy["v"] - 35) // 2
    return legacy


def check_signed(document: dict[str, Any], body: dict[str, Any], key: dict[str, Any]) -> dict[str, Any]:
    """eth-account recovers the key's address and decodes what was asked for."""
    raw = document["raw_transaction"]
    assert Account.recover_transaction(raw) == key["address"] == document["from"]
    assert document["tx_hash"] == "0x" + keccak(HexBytes(raw)).hex()
    fields = decode(raw)
    assert fields["chainId"] == body["chain_id"]
    assert fields["nonce"] == document["nonce"]
    assert fields["gas"] == body["gas_limit"]
    if body["type"] == "eip1559":
        assert HexBytes(raw)[0] == 2
        assert fields["maxFeePerGas"] == int(body["max_fee_per_gas"])
        assert fields["maxPriorityFeePerGas"] == int(body["max_priority_fee_per_gas"])
    else:
        assert fields["gasPrice"] == int(body["gas_price"])
    if "erc20" in body:
        intent = body["erc20"]
        assert "0x" + bytes(fields["to"]).hex() == intent["token"].lower()
        assert fields["value"] == 0
        data = bytes(fields["data"])
        if intent["method"] == "burn":
            assert data[:4] == keccak(text="burn(uint256)")[:4]
            assert abi_decode(["uint256"], data[4:]) == (int(intent["amount"]),)
        else:
            assert data[:4] == keccak(text=f"{intent['method']}(address,uint256)")[:4]
            assert abi_decode(["address", "uint256"], data[4:]) == (intent["to"].lower(), int(intent["amount"]))
    else:
        assert "0x" + bytes(fields["to"]).hex() == body["to"].lower()
        assert fields["value"] == int(body["value"])
        assert "0x" + bytes(fields["data"]).hex() == (body.get("data") or "0x").lower()
    return fields


async def test_chain_registry(evm_gateway: Gateway) -> None:
    gw = evm_gateway
    response = await gw.client.get("/v1/evm/chains", headers=gw.auth(Role.BACKEND))
    assert response.status == 200, await response.text()
    chains = {chain["chain_id"]: chain for chain in await response.json()}
    assert {1, 11155111, 1030, 71, EVM_TEST_CHAIN_ID} <= set(chains)
    assert chains[1]["name"] == "Ethereum" and all(t["example"] for t in chains[1]["tokens"])
    token = chains[EVM_TEST_CHAIN_ID]["tokens"][0]
    assert (token["address"], token["symbol"], token["decimals"], token["per_tx_cap"]) == (
        EVM_TEST_TOKEN, "TUSD", 6, str(1_000 * 10**6))
    await assert_problem(await gw.client.get("/v1/evm/chains", headers=gw.auth(Role.TELLER)), 403, "forbidden")


@pytest.mark.parametrize("tx_type", ["eip1559", "legacy"])
async def test_eth_account_recovers_every_transaction(evm_gateway: Gateway, tx_type: str) -> None:
    gw = evm_gateway
    key = await new_evm_key(gw, f"evm-recover-{tx_type}-{secrets.token_hex(3)}")
    bodies = [
        native(key, tx_type),
        native(key, tx_type, value=0, to=EVM_TEST_TOKEN.lower(),
               data="0xa9059cbb" + "00" * 12 + RECIPIENT[2:] + f"{777:064x}"),  # raw calldata, decoded by policy
        erc20(key, "transfer", tx_type=tx_type),
        erc20(key, "approve", amount=10**6, tx_type=tx_type),
        erc20(key, "mint", amount=99 * 10**6, tx_type=tx_type),
        erc20(key, "burn", amount=3, to=None, tx_type=tx_type),
    ]
    nonces = []
    for body in bodies:
        document = await signed(gw, body)
        check_signed(document, body, key)
        nonces.append(document["nonce"])
    assert nonces == list(range(len(bodies)))
    assert document["intent"]["method"] == "burn" and document["intent"]["amount"] == "3"


async def test_signed_transfer_executes_on_eth_tester(evm_gateway: Gateway) -> None:
    from eth_tester import EthereumTester, PyEVMBackend  # type: ignore[attr-defined]

    gw = evm_gateway
    chain = EthereumTester(PyEVMBackend())
    key = await new_evm_key(gw, f"evm-exec-{secrets.token_hex(3)}")
    funder = chain.get_accounts()[0]
    chain.send_transaction({"from": funder, "to": key["address"], "value": 10 * 10**18, "gas": 21_000,
                            "max_fee_per_gas": 10 * GWEI, "max_priority_fee_per_gas": GWEI})
    recipient = "0x" + secrets.token_hex(20)
    for tx_type, value in (("eip1559", 10**18), ("legacy", 2 * 10**17)):
        sender_before = chain.get_balance(key["address"])
        body = {**native(key, tx_type, value=value, to=recipient), "gas_limit": 21_000}
        document = await signed(gw, body)
        tx_hash = chain.send_raw_transaction(document["raw_transaction"])
        assert tx_hash == document["tx_hash"]
        receipt = chain.get_transaction_receipt(tx_hash)
        assert receipt["status"] == 1
        paid = receipt["gas_used"] * receipt["effective_gas_price"]
        assert chain.get_balance(key["address"]) == sender_before - value - paid
    assert chain.get_balance(recipient) == 12 * 10**17
    assert chain.get_nonce(key["address"]) == 2


def permit_document(owner: str, value: str, contract: str = EVM_TEST_TOKEN, chain_id: int = EVM_TEST_CHAIN_ID,
                    name: str = "Test USD") -> dict[str, Any]:
    return {
        "types": {
            "EIP712Domain": [{"name": "name", "type": "string"}, {"name": "version", "type": "string"},
                             {"name": "chainId", "type": "uint256"}, {"name": "verifyingContract", "type": "address"}],
            "Permit": [{"name": "owner", "type": "address"}, {"name": "spender", "type": "address"},
                       {"name": "value", "type": "uint256"}, {"name": "nonce", "type": "uint256"},
                       {"name": "deadline", "type": "uint256"}],
        },
        "primaryType": "Permit",
        "domain": {"name": name, "version": "1", "chainId": chain_id, "verifyingContract": contract},
        "message": {"owner": owner, "spender": RECIPIENT, "value": value, "nonce": 0, "deadline": 1_900_000_000},
    }


async def test_eip712_permit_recovers_to_the_key(evm_gateway: Gateway) -> None:
    gw = evm_gateway
    key = await new_evm_key(gw, f"evm-712-{secrets.token_hex(3)}")
    document = permit_document(key["address"], "1000000")
    response = await gw.client.post("/v1/evm/typed-data", json={"key_id": key["key_id"], "chain_id": EVM_TEST_CHAIN_ID,
                                                                "typed_data": document},
                                    headers=gw.auth(Role.BACKEND))
    assert response.status == 200, await response.text()
    result = await response.json()
    assert Account.recover_message(encode_typed_data(full_message=document), signature=result["signature"]) \
        == key["address"] == result["signer"]
    assert result["intent"]["method"] == "approve" and result["intent"]["amount"] == "1000000"
    assert int(result["s"], 16) <= 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0
    for bad, code in ((permit_document(key["address"], "1", name="Other"), "typed-data-domain-not-allowed"),
                      (permit_document(key["address"], "1", chain_id=1), "typed-data-domain-not-allowed"),
                      (permit_document(key["address"], str(10**12)), "evm-cap-exceeded")):
        response = await gw.client.post("/v1/evm/typed-data", json={
            "key_id": key["key_id"], "chain_id": EVM_TEST_CHAIN_ID, "typed_data": bad}, headers=gw.auth(Role.BACKEND))
        await assert_problem(response, 422, code)


async def test_200_concurrent_requests_get_nonces_0_to_199(evm_gateway: Gateway) -> None:
    gw = evm_gateway
    key = await new_evm_key(gw, f"evm-nonces-{secrets.token_hex(3)}")
    headers = [idem() for _ in range(200)]
    bodies = [native(key, "eip1559" if i % 2 else "legacy", value=i + 1) for i in range(200)]
    responses = await asyncio.gather(*(sign(gw, body, header) for body, header in zip(bodies, headers, strict=True)))
    documents = []
    for response in responses:
        assert response.status == 200, await response.text()
        documents.append(await response.json())
    assert sorted(d["nonce"] for d in documents) == list(range(200))
    for document, body in zip(documents, bodies, strict=True):
        assert check_signed(document, body, key)["value"] == int(body["value"])
    # A retry with the same Idempotency-Key gets the same signed transaction, and consumes no nonce.
    again = await sign(gw, bodies[17], headers[17])
    assert again.status == 200 and again.headers.get("Idempotent-Replayed") == "true"
    assert await again.json() == documents[17]
    assert (await signed(gw, native(key)))["nonce"] == 200
    # Same key, another body: 409, nothing signed.
    await assert_problem(await sign(gw, bodies[18], headers[17]), 409, "idempotency-key-reused")
    assert (await signed(gw, native(key)))["nonce"] == 201


async def _count(gw: Gateway, key: dict[str, Any]) -> int:
    row = await runtime(gw).database.read(lambda tx: tx.fetchone(
        "SELECT COUNT(*) AS n FROM evm_transactions WHERE key_id = ?", (key["key_id"],)))
    assert row is not None
    return int(row["n"])


async def test_bad_input_has_specific_problems_and_signs_nothing(evm_gateway: Gateway) -> None:
    gw = evm_gateway
    key = await new_evm_key(gw, f"evm-bad-{secrets.token_hex(3)}")
    response = await gw.client.post("/v1/keys", json={"label": f"raw-k1-{secrets.token_hex(3)}",
                                                      "algorithm": "ecdsa-secp256k1", "usage": ["raw"]},
                                    headers=gw.auth(Role.ADMIN))
    assert response.status == 201, await response.text()
    raw_k1 = await response.json()
    good = native(key)
    wrong_checksum = "0x" + "aAbB" * 10  # mixed case that is not its EIP-55 form
    eip1559_fees = {k: v for k, v in good.items() if k not in ("type", "gas_limit", "max_fee_per_gas",
                                                                 "max_priority_fee_per_gas")}
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({**good, "to": wrong_checksum}, 400, "invalid-address"),
        (erc20(key, to=wrong_checksum), 400, "invalid-address"),
        ({**good, "chain_id": 424242}, 422, "unknown-chain"),
        (erc20(key, amount=1_000 * 10**6 + 1), 422, "evm-cap-exceeded"),
        ({**native(key, value=1_001 * 10**18)}, 422, "evm-cap-exceeded"),
        (erc20(key, amount=-5), 400, "invalid-evm-amount"),
        ({**erc20(key), "erc20": {**erc20(key)["erc20"], "amount": "1.5"}}, 400, "invalid-evm-amount"),
        ({**good, "value": "-1"}, 400, "invalid-evm-amount"),
        ({**good, "value": "0.5"}, 400, "invalid-evm-amount"),
        ({**good, "value": 1.5}, 400, "validation-failed"),
        ({**good, "gas_limit": 21000.0}, 400, "validation-failed"),
        ({**good, "max_fee_per_gas": "1e9"}, 400, "invalid-evm-amount"),
        ({**good, "to": "0x" + "42" * 20, "value": "0", "data": "0xa9059cbb" + "00" * 64}, 422, "unknown-contract"),
        ({**good, "to": EVM_TEST_TOKEN, "value": "0", "data": "0x23b872dd" + "00" * 96}, 422, "unknown-contract"),
        (erc20(key, token="0x" + "43" * 20), 422, "unknown-token"),
        ({**good, "gas_price": str(GWEI)}, 400, "invalid-gas-fields"),
        ({**good, "gas_limit": None}, 400, "invalid-gas-fields"),
        ({**eip1559_fees, "type": "eip1559", "gas_limit": 21000}, 400, "invalid-gas-fields"),
        ({**good, "max_priority_fee_per_gas": str(30 * GWEI)}, 400, "invalid-gas-fields"),
        ({**good, "gas_limit": -1}, 400, "invalid-gas-fields"),
        ({**native(key, "legacy"), "max_fee_per_gas": str(GWEI)}, 400, "invalid-gas-fields"),
        ({**native(key, "legacy"), "gas_price": None}, 400, "invalid-gas-fields"),
        (native(key, to=EVM_DENIED), 422, "recipient-not-allowed"),
        (erc20(key, "approve", to=EVM_DENIED), 422, "recipient-not-allowed"),
        ({**erc20(key), "to": RECIPIENT}, 400, "invalid-evm-transaction"),
        (erc20(key, "burn"), 400, "invalid-evm-transaction"),
        (erc20(key, "transfer", to=None), 400, "invalid-evm-transaction"),
        ({k: v for k, v in good.items() if k != "to"}, 400, "invalid-evm-transaction"),
        ({**good, "nonce": -1}, 400, "validation-failed"),
        ({**good, "nonce": 5}, 409, "nonce-conflict"),
        ({**good, "type": "eip2930"}, 400, "validation-failed"),
        ({**good, "key_id": raw_k1["key_id"]}, 403, "key-usage-not-allowed"),
    ]
    for body, status, code in cases:
        response = await sign(gw, body)
        await assert_problem(response, status, code)
    response = await gw.client.post("/v1/evm/transactions", json=good, headers=gw.auth(Role.BACKEND))
    await assert_problem(response, 400, "idempotency-key-required")
    assert await _count(gw, key) == 0
    # Nothing consumed a nonce: the first good request gets 0.
    assert (await signed(gw, good))["nonce"] == 0
    assert (await signed(gw, {**good, "nonce": 1}))["nonce"] == 1
    await assert_problem(await sign(gw, {**good, "nonce": 1}), 409, "nonce-conflict")


async def test_daily_cap_counts_todays_signatures(evm_gateway: Gateway) -> None:
    gw = evm_gateway
    key = await new_evm_key(gw, f"evm-daily-{secrets.token_hex(3)}")
    await signed(gw, erc20(key, amount=600, token=EVM_CAPPED_TOKEN))
    await signed(gw, erc20(key, "burn", amount=400, to=None, token=EVM_CAPPED_TOKEN))
    problem = await assert_problem(await sign(gw, erc20(key, amount=1, token=EVM_CAPPED_TOKEN)), 422,
                                   "evm-cap-exceeded")
    assert problem["reasons"] == ["daily-cap-exceeded"]
    assert (await signed(gw, erc20(key, amount=10**6)))["nonce"] == 2  # another token: its own cap


async def stored_document(gw: Gateway, transaction_id: str) -> dict[str, Any]:
    """The document the stored row of a transaction gives (as a replay or an approval reads it)."""
    row = await runtime(gw).database.read(lambda tx: EvmTransactions.row_in(tx, transaction_id))
    return transaction_document(row)


async def test_approval_above_threshold_binds_the_signing_hash(evm_gateway: Gateway) -> None:
    gw = evm_gateway
    key = await new_evm_key(gw, f"evm-approval-{secrets.token_hex(3)}")
    body = erc20(key, amount=500 * 10**6)  # above the 100-token threshold, below the cap
    response = await sign(gw, body)
    assert response.status == 202, await response.text()
    pending = await response.json()
    assert pending["status"] == "pending_approval" and pending["nonce"] == 0 and "raw_transaction" not in pending
    # The answers are built from the row as inserted, not read back: they are what the stored rows give.
    assert await stored_document(gw, pending["transaction_id"]) == pending
    # Later requests go on with later nonces while the supervisor looks.
    later = await signed(gw, erc20(key, amount=1))
    assert later["nonce"] == 1 and await stored_document(gw, later["transaction_id"]) == later
    approval = await (await gw.client.get(f"/v1/approvals/{pending['approval_id']}",
                                          headers=gw.auth(Role.SUPERVISOR))).json()
    assert approval["kind"] == "evm_transaction" and approval["status"] == "pending"
    assert approval["payload"]["signing_hash"] == pending["signing_hash"]
    assert approval["payload"]["intent"]["amount"] == str(500 * 10**6)
    # The payload shown must be the one approved.
    response = await gw.client.post(f"/v1/approvals/{pending['approval_id']}/approve",
                                    json={"payload_hash": "0" * 64}, headers=gw.auth(Role.SUPERVISOR))
    await assert_problem(response, 409, "approval-payload-mismatch")
    supervisor2 = await login(gw, "supervisor2")
    response = await gw.client.post(f"/v1/approvals/{pending['approval_id']}/approve",
                                    json={"payload_hash": approval["payload_hash"], "note": "checked"},
                                    headers=supervisor2)
    assert response.status == 200, await response.text()
    decided = await response.json()
    assert decided["status"] == "executed" and decided["decided_by"] != decided["requested_by"]
    shown = await (await gw.client.get(f"/v1/approvals/{pending['approval_id']}",
                                       headers=gw.auth(Role.BACKEND))).json()
    result = shown["result"]
    assert result["status"] == "signed" and result["nonce"] == 0
    assert result["signing_hash"] == pending["signing_hash"]
    assert result == decided["result"]
    check_signed(result, body, key)


async def test_rejected_approval_frees_its_nonce(evm_gateway: Gateway) -> None:
    gw = evm_gateway
    key = await new_evm_key(gw, f"evm-reject-{secrets.token_hex(3)}")
    pending = await (await sign(gw, native(key, value=200 * 10**18))).json()
    assert pending["status"] == "pending_approval" and pending["nonce"] == 0
    assert (await signed(gw, native(key)))["nonce"] == 1
    approval = await (await gw.client.get(f"/v1/approvals/{pending['approval_id']}",
                                          headers=gw.auth(Role.SUPERVISOR))).json()
    response = await gw.client.post(f"/v1/approvals/{pending['approval_id']}/reject",
                                    json={"payload_hash": approval["payload_hash"], "note": "no"},
                                    headers=gw.auth(Role.SUPERVISOR))
    assert response.status == 200, await response.text()
    # Nonce 0 was never signed: the next request takes it, so the sequence has no gap.
    assert (await signed(gw, native(key)))["nonce"] == 0
    assert (await signed(gw, native(key)))["nonce"] == 2


async def test_admin_sets_the_next_nonce(evm_gateway: Gateway) -> None:
    gw = evm_gateway
    key = await new_evm_key(gw, f"evm-admin-{secrets.token_hex(3)}")
    first = await signed(gw, native(key))
    path = f"/v1/evm/nonces/{EVM_TEST_CHAIN_ID}/{key['address']}"
    await assert_problem(await gw.client.post(path, json={"next_nonce": 7}, headers=gw.auth(Role.BACKEND)),
                         403, "forbidden")
    await assert_problem(await gw.client.post(f"/v1/evm/nonces/999/{key['address']}", json={"next_nonce": 7},
                                              headers=gw.auth(Role.ADMIN)), 422, "unknown-chain")
    response = await gw.client.post(path, json={"next_nonce": 7}, headers=gw.auth(Role.ADMIN))
    assert response.status == 200, await response.text()
    assert await response.json() == {"chain_id": EVM_TEST_CHAIN_ID, "address": key["address"], "next_nonce": 7,
                                     "previous_next_nonce": 1, "superseded": []}
    assert (await signed(gw, native(key)))["nonce"] == 7
    # Back to 0: the transaction signed with nonce 0 is superseded (e.g. it was dropped), never re-served.
    response = await gw.client.post(path, json={"next_nonce": 0}, headers=gw.auth(Role.ADMIN))
    superseded = (await response.json())["superseded"]
    assert first["transaction_id"] in superseded and len(superseded) == 2
    assert (await signed(gw, native(key)))["nonce"] == 0
    entries = [e for e in await audit_entries(gw) if e["action"] == "evm.nonces.set"]
    assert [e["result"]["next_nonce"] for e in entries[-2:]] == [7, 0]


async def test_a_crash_between_commit_and_signing_is_signed_by_the_retry(
    evm_gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The transaction and its nonce commit before the HSM is asked. If the process dies (here: the
    HSM is unavailable) before the signature is stored, the retry with the same Idempotency-Key signs
    that same transaction — same nonce — and no other nonce is consumed."""
    gw = evm_gateway
    key = await new_evm_key(gw, f"evm-crash-{secrets.token_hex(3)}")
    real_sign = EvmTransactions.sign_recorded
    calls = {"n": 0}

    async def failing_once(self: EvmTransactions, transaction_id: str, *args: Any) -> dict[str, Any]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise HsmUnavailable("simulated crash after commit")
        return await real_sign(self, transaction_id, *args)

    monkeypatch.setattr(EvmTransactions, "sign_recorded", failing_once)
    body, headers = native(key), idem()
    await assert_problem(await sign(gw, body, headers), 503, "hsm-unavailable")
    assert await _count(gw, key) == 1
    response = await sign(gw, body, headers)
    assert response.status == 200, await response.text()
    document = await response.json()
    assert document["nonce"] == 0
    check_signed(document, body, key)
    again = await sign(gw, body, headers)
    assert await again.json() == document
    assert (await signed(gw, native(key)))["nonce"] == 1


async def test_an_unsigned_transaction_is_signed_once_with_its_own_nonce(evm_gateway: Gateway) -> None:
    """The store half of crash recovery, below HTTP: a recorded but unsigned transaction (what a crash
    after commit leaves) is signed by the next seal with the nonce it was given; sealing again
    returns the stored signature, and concurrent seals store one."""
    gw = evm_gateway
    key = await new_evm_key(gw, f"evm-seal-{secrets.token_hex(3)}")
    service = runtime(gw).evm
    from gateway.api.evm import transaction_fields
    from gateway.api.evm_models import EvmTransactionRequest
    from gateway.audit.chain import AuditEntry
    from gateway.evm.drafts import draft_of
    from gateway.policy.evm import require_chain

    record = await runtime(gw).keys.get(runtime(gw).database, key["key_id"])
    chain = require_chain(runtime(gw).settings.evm, EVM_TEST_CHAIN_ID)
    body = native(key)
    draft = draft_of(transaction_fields(EvmTransactionRequest.model_validate(body)), record, chain)
    entry = AuditEntry("test", "backend", "evm.transactions.create", "allowed")
    recorded = await runtime(gw).database.write(lambda tx: service.record_in(tx, draft, entry))
    assert (recorded.status, recorded.nonce) == ("unsigned", 0)
    assert (await signed(gw, native(key)))["nonce"] == 1  # the unsigned one keeps nonce 0
    first, second = await asyncio.gather(service.seal(recorded.transaction_id), service.seal(recorded.transaction_id))
    assert first == second and first["status"] == "signed" and first["nonce"] == 0
    check_signed(first, body, key)
    assert await service.seal(recorded.transaction_id) == first
