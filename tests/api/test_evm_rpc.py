"""The Ethereum JSON-RPC signer (``POST /v1/evm/rpc``) driven by the clients Ethereum teams use: web3.py's
``HTTPProvider`` and ethers v6's ``JsonRpcProvider`` with its signer (node, from the committed lock in
tests/ethers). eth-account recovers every signature; signed transactions execute on an EVM (eth-tester's
py-evm chain, also the upstream node of ``eth_sendTransaction``), on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct, encode_typed_data
from eth_account.typed_transactions.typed_transaction import TypedTransaction
from hexbytes import HexBytes
from web3 import HTTPProvider, Web3

from gateway.auth.roles import Role
from tests.api.support import runtime
from tests.api.test_evm import decode, permit_document
from tests.conftest import EVM_DENIED, EVM_TEST_CHAIN_ID, Gateway
from tests.evm_node import EthTesterNode
from tests.evm_rpc_support import (
    GWEI,
    RECIPIENT,
    eip1559,
    legacy,
    new_key,
)

pytestmark = pytest.mark.softhsm

ETHERS_DIR = Path(__file__).resolve().parents[1] / "ethers"


def web3_client(gw: Gateway, role: Role = Role.BACKEND) -> Web3:
    url = str(gw.client.make_url("/v1/evm/rpc"))
    return Web3(HTTPProvider(url, request_kwargs={"headers": gw.auth(role), "timeout": 30}))


async def test_web3py_accounts_chain_id_and_every_sign_method(rpc_gateway: Gateway) -> None:
    """Positive control: web3.py reads the accounts and chain id and signs through every method; eth-account
    recovers each signature to the key's address."""
    gw = rpc_gateway
    evm_key = await new_key(gw, f"rpc-w3-{secrets.token_hex(3)}", "evm")
    message_key = await new_key(gw, f"rpc-w3-msg-{secrets.token_hex(3)}", "message")
    w3 = web3_client(gw)
    accounts = await asyncio.to_thread(lambda: w3.eth.accounts)
    assert evm_key["address"] in accounts and message_key["address"] in accounts
    assert await asyncio.to_thread(lambda: w3.eth.chain_id) == EVM_TEST_CHAIN_ID

    def call(method: str, params: list[Any]) -> Any:
        answer = w3.provider.make_request(method, params)  # type: ignore[arg-type]
        assert "error" not in answer, answer
        return answer["result"]

    raw = await asyncio.to_thread(call, "eth_signTransaction", [eip1559(evm_key["address"])])
    assert Account.recover_transaction(raw) == evm_key["address"]
    fields = TypedTransaction.from_bytes(HexBytes(raw)).as_dict()
    assert (fields["chainId"], fields["nonce"], fields["gas"], fields["value"]) == (EVM_TEST_CHAIN_ID, 0, 21_000,
                                                                                    10**15)
    assert fields["maxFeePerGas"] == 20 * GWEI and "0x" + bytes(fields["to"]).hex() == RECIPIENT
    raw = await asyncio.to_thread(call, "eth_signTransaction", [legacy(evm_key["address"], nonce="0x1")])
    assert Account.recover_transaction(raw) == evm_key["address"]
    assert decode(raw)["nonce"] == 1 and decode(raw)["chainId"] == EVM_TEST_CHAIN_ID

    document = permit_document(evm_key["address"], "1000000")
    for method in ("eth_signTypedData_v4", "eth_signTypedData"):
        signature = await asyncio.to_thread(call, method, [evm_key["address"], document])
        assert Account.recover_message(encode_typed_data(full_message=document), signature=signature) \
            == evm_key["address"]
    signature = await asyncio.to_thread(call, "eth_signTypedData_v4", [evm_key["address"], json.dumps(document)])
    assert Account.recover_message(encode_typed_data(full_message=document), signature=signature) \
        == evm_key["address"]

    text = "Sign in to example.org\nNonce: " + secrets.token_hex(8)
    signature = await asyncio.to_thread(call, "personal_sign", ["0x" + text.encode().hex(), message_key["address"]])
    assert Account.recover_message(encode_defunct(text=text), signature=signature) == message_key["address"]
    signature = await asyncio.to_thread(call, "personal_sign", [text, message_key["address"]])  # plain text too
    assert Account.recover_message(encode_defunct(text=text), signature=signature) == message_key["address"]
    signature = await asyncio.to_thread(call, "eth_sign", [message_key["address"], "0xdeadbeef"])
    assert Account.recover_message(encode_defunct(hexstr="0xdeadbeef"), signature=signature) \
        == message_key["address"]


async def test_transactions_signed_over_json_rpc_execute_on_the_evm(rpc_gateway: Gateway,
                                                                    eth_node: EthTesterNode) -> None:
    """Positive control: a raw transaction from eth_signTransaction executes on py-evm, and
    eth_sendTransaction signs and broadcasts through the upstream node (after its nonce check)."""
    gw = rpc_gateway
    key = await new_key(gw, f"rpc-exec-{secrets.token_hex(3)}", "evm")
    eth_node.reset({key["address"]: 10 * 10**18})
    recipient = Web3.to_checksum_address("0x" + secrets.token_hex(20))
    w3 = web3_client(gw)

    raw = (await asyncio.to_thread(w3.provider.make_request, "eth_signTransaction",  # type: ignore[arg-type]
                                   [eip1559(key["address"], to=recipient, value=10**18)]))["result"]
    tx_hash = eth_node.chain.send_raw_transaction(raw)
    assert eth_node.chain.get_transaction_receipt(tx_hash)["status"] == 1

    answer = await asyncio.to_thread(w3.provider.make_request, "eth_sendTransaction",  # type: ignore[arg-type]
                                     [legacy(key["address"], to=recipient, value=2 * 10**17)])
    assert "error" not in answer, answer
    receipt = eth_node.chain.get_transaction_receipt(answer["result"])
    assert receipt["status"] == 1
    assert eth_node.chain.get_balance(recipient) == 12 * 10**17
    assert eth_node.chain.get_nonce(key["address"]) == 2
    assert eth_node.calls[-3:] == ["eth_chainId", "eth_getTransactionCount", "eth_sendRawTransaction"]
    drift = runtime(gw).metrics.registry.get_sample_value(
        "ecny_evm_nonce_drift", {"chain_id": str(EVM_TEST_CHAIN_ID), "address": key["address"]})
    assert drift == 0  # the node counted 1 (the first transaction), the gateway's next nonce was 1


async def test_ethers_v6_provider_and_signer(rpc_gateway: Gateway, eth_node: EthTesterNode,
                                             tmp_path: Path) -> None:
    """Positive control: ethers v6 (JsonRpcProvider + JsonRpcSigner, batching as it does by default)
    detects the chain, lists the accounts, signs a transaction, typed data and a message, and sends a
    transaction; a policy refusal reaches it as a JSON-RPC error carrying the problem type."""
    node = shutil.which("node")
    assert node is not None, "node (20+) is needed: `make test` installs it with the system packages"
    assert (ETHERS_DIR / "node_modules" / "ethers").is_dir(), \
        "ethers is not installed: `make test` runs `npm ci` in tests/ethers (from the committed package-lock.json)"
    gw = rpc_gateway
    key = await new_key(gw, f"rpc-ethers-{secrets.token_hex(3)}", "evm")
    message_key = await new_key(gw, f"rpc-ethers-msg-{secrets.token_hex(3)}", "message")
    eth_node.reset({key["address"]: 10 * 10**18})
    fees = {"gasLimit": 21_000, "maxFeePerGas": str(20 * GWEI), "maxPriorityFeePerGas": str(2 * GWEI),
            "chainId": EVM_TEST_CHAIN_ID, "type": 2}
    permit = permit_document(key["address"], "2500000")
    types = {name: fields for name, fields in permit["types"].items() if name != "EIP712Domain"}
    tasks = {
        "address": key["address"],
        "transaction": {"to": RECIPIENT, "value": str(10**15), **fees},
        "typedData": {"domain": permit["domain"], "types": types, "message": permit["message"]},
        "messageAddress": message_key["address"], "message": "hello from ethers",
        "send": {"to": RECIPIENT, "value": str(3 * 10**15), **fees},
        "refused": {"to": EVM_DENIED, "value": "1", **fees},
    }
    token = gw.auth(Role.BACKEND)["Authorization"].removeprefix("Bearer ")
    process = await asyncio.create_subprocess_exec(
        node, str(ETHERS_DIR / "rpc_client.mjs"), str(gw.client.make_url("/v1/evm/rpc")), cwd=ETHERS_DIR,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "ECNY_TOKEN": token})
    stdout, stderr = await asyncio.wait_for(process.communicate(json.dumps(tasks).encode()), timeout=120)
    assert process.returncode == 0, stderr.decode()
    out = json.loads(stdout)

    assert out["chainId"] == str(EVM_TEST_CHAIN_ID)
    assert key["address"] in out["accounts"] and message_key["address"] in out["accounts"]
    assert eth_node.chain.get_transaction_by_hash(out["sentHash"])["nonce"] == 0  # sent first, executed
    assert eth_node.chain.get_transaction_receipt(out["sentHash"])["status"] == 1
    assert out["transactionFrom"] == Account.recover_transaction(out["rawTransaction"]) == key["address"]
    assert decode(out["rawTransaction"])["nonce"] == 1
    assert sorted(out["batched"]) == [2, 3]  # one JSON-RPC batch, two nonces, no gap
    recovered = Account.recover_message(encode_typed_data(full_message=permit), signature=out["typedDataSignature"])
    assert recovered == out["typedDataSigner"] == key["address"]
    recovered = Account.recover_message(encode_defunct(text="hello from ethers"), signature=out["messageSignature"])
    assert recovered == out["messageSigner"] == message_key["address"]
    assert out["refusedError"]["code"] == -32022
    assert out["refusedError"]["data"]["code"] == "recipient-not-allowed"
