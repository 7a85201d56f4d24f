"""The Ethereum JSON-RPC signer tried as an insider or a careless client would (issue 18).

Each attack is the request such a client really sends to ``POST /v1/evm/rpc``; next to it, the
legitimate call still works. Signatures are checked with eth-account, the store is read for what was
(not) recorded, and the audit log as an auditor reads it.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_keys import keys as eth_keys
from eth_utils.crypto import keccak
from hexbytes import HexBytes
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.api.endpoints import RATE_LIMITER
from gateway.auth.roles import Role
from gateway.config import load_settings
from gateway.errors import ConfigError, EvmUpstreamFailed, GatewayError
from gateway.evm.rpc import read_message, read_transaction, read_typed_data_param, typed_data_chain
from gateway.evm.upstream import UpstreamNode
from gateway.schemes.evm.transactions import UnsignedTransaction
from tests.api.support import assert_problem, audit_entries, runtime
from tests.api.test_evm import decode
from tests.conftest import EVM_DENIED, EVM_TEST_CHAIN_ID, Gateway, login
from tests.evm_node import EthTesterNode
from tests.evm_rpc_support import (
    eip1559,
    error_of,
    legacy,
    new_key,
    rpc,
)

pytestmark = pytest.mark.softhsm


async def _transactions(gw: Gateway, key: dict[str, Any]) -> list[Any]:
    return list(await runtime(gw).database.read(lambda tx: tx.fetchall(
        "SELECT nonce, status FROM evm_transactions WHERE key_id = ? ORDER BY nonce", (key["key_id"],))))


async def _signed_nonce(gw: Gateway, key: dict[str, Any], **extra: Any) -> int:
    answer = await rpc(gw, "eth_signTransaction", [eip1559(key["address"], **extra)])
    assert "error" not in answer, answer
    assert Account.recover_transaction(answer["result"]) == key["address"]
    nonce: int = decode(answer["result"])["nonce"]
    return nonce


async def test_json_rpc_needs_a_credential_and_a_signing_role(rpc_gateway: Gateway) -> None:
    """JSON-RPC signer reached without a credential, or by a role that may not sign EVM transactions."""
    gw = rpc_gateway
    key = await new_key(gw, f"rpc-auth-{secrets.token_hex(3)}", "evm")
    body = {"jsonrpc": "2.0", "id": 1, "method": "eth_signTransaction", "params": [eip1559(key["address"])]}
    await assert_problem(await gw.client.post("/v1/evm/rpc", json=body), 401, "unauthenticated")
    await assert_problem(await gw.client.post("/v1/evm/rpc", json=body,
                                              headers={"Authorization": "Bearer ecny_not-a-key"}), 401)
    await assert_problem(await gw.client.post("/v1/evm/rpc", json=body, headers=gw.auth(Role.TELLER)), 403,
                         "forbidden")
    # An admin reads the chain (evm.read) but signs nothing and sees no accounts to sign with.
    assert (await rpc(gw, "eth_chainId", [], role=Role.ADMIN))["result"] == hex(EVM_TEST_CHAIN_ID)
    assert (await rpc(gw, "eth_accounts", [], role=Role.ADMIN))["result"] == []
    error_of(await rpc(gw, "eth_signTransaction", [eip1559(key["address"])], role=Role.ADMIN), -32003, "forbidden")
    assert await _transactions(gw, key) == []
    assert await _signed_nonce(gw, key) == 0  # the backend's call is signed


async def test_json_rpc_transactions_meet_the_same_policy_and_refusals_are_audited(rpc_gateway: Gateway) -> None:
    """JSON-RPC used to sign what POST /v1/evm/transactions refuses (a deny-listed recipient, a fee above
    the cap, calldata to an unknown contract), or to consume a nonce with a refused call."""
    gw = rpc_gateway
    key = await new_key(gw, f"rpc-policy-{secrets.token_hex(3)}", "evm")
    seq = (await audit_entries(gw))[-1]["seq"]
    error = error_of(await rpc(gw, "eth_signTransaction", [eip1559(key["address"], to=EVM_DENIED)]), -32022,
                     "recipient-not-allowed")
    assert error["data"]["status"] == 422
    error_of(await rpc(gw, "eth_signTransaction", [eip1559(key["address"], maxFeePerGas=hex(10**15))]), -32022,
             "evm-fee-cap-exceeded")
    error_of(await rpc(gw, "eth_signTransaction", [eip1559(key["address"], to="0x" + "22" * 20,
                                                           data="0xa9059cbb" + "00" * 64)]), -32022,
             "unknown-contract")
    assert await _transactions(gw, key) == []
    refused = [entry for entry in await audit_entries(gw, seq) if entry["action"] == "evm.rpc.sign_transaction"]
    assert [(entry["decision"], entry["reasons"][0]) for entry in refused] == [
        ("refused", "recipient-not-allowed"), ("refused", "evm-fee-cap-exceeded"), ("refused", "unknown-contract")]
    assert await _signed_nonce(gw, key) == 0  # no refused call consumed a nonce
    allowed = [entry for entry in await audit_entries(gw, seq) if entry["action"] == "evm.rpc.sign_transaction"]
    assert allowed[-1]["decision"] == "allowed" and allowed[-1]["key_id"] == key["key_id"]


async def test_json_rpc_nonce_must_be_the_allocators(rpc_gateway: Gateway) -> None:
    """A client choosing its own nonce over JSON-RPC: one already used (a replacement of a signed
    transaction) or one ahead (a gap that stalls every later transaction)."""
    gw = rpc_gateway
    key = await new_key(gw, f"rpc-nonce-{secrets.token_hex(3)}", "evm")
    assert await _signed_nonce(gw, key, nonce="0x0") == 0
    error = error_of(await rpc(gw, "eth_signTransaction", [eip1559(key["address"], nonce="0x0", value=2)]),
                     -32009, "nonce-conflict")
    assert error["data"]["next_nonce"] == 1
    error_of(await rpc(gw, "eth_signTransaction", [eip1559(key["address"], nonce="0x5")]), -32009, "nonce-conflict")
    assert await _signed_nonce(gw, key, nonce="0x1") == 1


async def test_json_rpc_retries_sign_once(rpc_gateway: Gateway) -> None:
    """A client retrying a JSON-RPC call after a timeout gets a second transaction with a second nonce (a
    double payment); an Idempotency-Key reused for another transaction signs it."""
    gw = rpc_gateway
    key = await new_key(gw, f"rpc-idem-{secrets.token_hex(3)}", "evm")
    transaction = eip1559(key["address"])
    first = await rpc(gw, "eth_signTransaction", [transaction], call_id="retry-1")
    again = await rpc(gw, "eth_signTransaction", [transaction], call_id="retry-1")  # the same bytes again
    assert first["result"] == again["result"]
    other = await rpc(gw, "eth_signTransaction", [transaction], call_id="retry-2")  # a new call, a new nonce
    assert decode(other["result"])["nonce"] == 1
    header = {"Idempotency-Key": "rpc-" + secrets.token_hex(8)}
    keyed = await rpc(gw, "eth_signTransaction", [transaction], headers=header, call_id=1)
    replay = await rpc(gw, "eth_signTransaction", [transaction], headers=header, call_id=2)  # new id, same key
    assert keyed["result"] == replay["result"] and decode(keyed["result"])["nonce"] == 2
    error_of(await rpc(gw, "eth_signTransaction", [eip1559(key["address"], value=7)], headers=header), -32009,
             "idempotency-key-reused")
    assert [row["nonce"] for row in await _transactions(gw, key)] == [0, 1, 2]
    # Typed data and messages are idempotent the same way.
    message_key = await new_key(gw, f"rpc-idem-msg-{secrets.token_hex(3)}", "message")
    signed = await rpc(gw, "personal_sign", ["0x01", message_key["address"]], call_id="m-1")
    assert (await rpc(gw, "personal_sign", ["0x01", message_key["address"]], call_id="m-1")) == signed


async def test_json_rpc_approval_is_not_bypassed(rpc_gateway: Gateway) -> None:
    """A transaction above the approval threshold signed over JSON-RPC without a supervisor."""
    gw = rpc_gateway
    key = await new_key(gw, f"rpc-approval-{secrets.token_hex(3)}", "evm")
    big = eip1559(key["address"], value=150 * 10**18)
    error = error_of(await rpc(gw, "eth_signTransaction", [big], call_id="big"), -32010, "evm-approval-pending")
    approval_id = error["data"]["approval_id"]
    assert error["data"]["status"] == 202 and error["data"]["nonce"] == 0
    response = await gw.client.get(f"/v1/approvals/{approval_id}", headers=gw.auth(Role.SUPERVISOR))
    assert response.status == 200, await response.text()
    assert (await response.json())["status"] == "pending"
    again = error_of(await rpc(gw, "eth_signTransaction", [big], call_id="big"), -32010, "evm-approval-pending")
    assert again["data"]["approval_id"] == approval_id  # the retry is the same parked transaction
    assert [(row["nonce"], row["status"]) for row in await _transactions(gw, key)] == [(0, "pending_approval")]
    # A supervisor approves: the same call now answers the signed transaction (as a client retrying would
    # expect), the one the approval signed — nonce 0, recovered to the key — never a second one.
    payload_hash = (await response.json())["payload_hash"]
    decided = await gw.client.post(f"/v1/approvals/{approval_id}/approve",
                                   json={"payload_hash": payload_hash, "note": "checked"},
                                   headers=await login(gw, "supervisor1"))
    assert decided.status == 200, await decided.text()
    signed = await rpc(gw, "eth_signTransaction", [big], call_id="big")
    assert "result" in signed, signed
    assert decode(signed["result"])["nonce"] == 0 and Account.recover_transaction(signed["result"]) == key["address"]
    assert [(row["nonce"], row["status"]) for row in await _transactions(gw, key)] == [(0, "signed")]
    # A rejected one answers an error, not a signature.
    other = eip1559(key["address"], value=151 * 10**18)
    parked = error_of(await rpc(gw, "eth_signTransaction", [other], call_id="other"), -32010, "evm-approval-pending")
    shown = await (await gw.client.get(f"/v1/approvals/{parked['data']['approval_id']}",
                                       headers=gw.auth(Role.SUPERVISOR))).json()
    rejected = await gw.client.post(f"/v1/approvals/{shown['approval_id']}/reject",
                                    json={"payload_hash": shown["payload_hash"], "note": "no"},
                                    headers=await login(gw, "supervisor1"))
    assert rejected.status == 200, await rejected.text()
    refused = error_of(await rpc(gw, "eth_signTransaction", [other], call_id="other"), -32009, "nonce-conflict")
    assert refused["data"]["status"] == "rejected"


async def test_a_parked_send_is_broadcast_once_when_retried_after_the_approval(rpc_gateway: Gateway,
                                                                            eth_node: EthTesterNode) -> None:
    """Threat: eth_sendTransaction above the approval threshold broadcast before a supervisor decides, or —
    once approved — the client's retry signing and broadcasting a second transaction (another nonce, twice
    the value). Before the approval nothing reaches the node; the retry after it broadcasts the transaction
    the approval signed (nonce 0, from the key's address), which the chain mines; one transaction row."""
    gw = rpc_gateway
    key = await new_key(gw, f"rpc-send-approval-{secrets.token_hex(3)}", "evm")
    eth_node.reset({key["address"]: 200 * 10**18})
    big = legacy(key["address"], value=150 * 10**18)
    error = error_of(await rpc(gw, "eth_sendTransaction", [big], call_id="send-big"), -32010, "evm-approval-pending")
    approval_id = error["data"]["approval_id"]
    again = error_of(await rpc(gw, "eth_sendTransaction", [big], call_id="send-big"), -32010, "evm-approval-pending")
    assert again["data"]["approval_id"] == approval_id  # the retry is the same parked transaction
    assert "eth_sendRawTransaction" not in eth_node.calls
    shown = await (await gw.client.get(f"/v1/approvals/{approval_id}", headers=gw.auth(Role.SUPERVISOR))).json()
    decided = await gw.client.post(f"/v1/approvals/{approval_id}/approve",
                                   json={"payload_hash": shown["payload_hash"], "note": "checked"},
                                   headers=await login(gw, "supervisor1"))
    assert decided.status == 200, await decided.text()
    sent = await rpc(gw, "eth_sendTransaction", [big], call_id="send-big")
    assert "result" in sent, sent
    mined = eth_node.chain.get_transaction_by_hash(sent["result"])
    assert (mined["nonce"], mined["value"], mined["from"].lower()) == (0, 150 * 10**18, key["address"].lower())
    assert eth_node.chain.get_transaction_receipt(sent["result"])["status"] == 1
    assert eth_node.calls.count("eth_sendRawTransaction") == 1
    assert [(row["nonce"], row["status"]) for row in await _transactions(gw, key)] == [(0, "signed")]


async def test_transaction_objects_are_read_strictly(rpc_gateway: Gateway) -> None:
    """A transaction object with fields the gateway would not sign (an access list, an EIP-7702
    authorisation, blob hashes), an ambiguous quantity ("21000" decimal, a JSON number), another
    transaction type, or no recipient (contract creation): refused, never signed without them."""
    gw = rpc_gateway
    key = await new_key(gw, f"rpc-strict-{secrets.token_hex(3)}", "evm")
    sender = key["address"]
    for bad, problem in (
        (eip1559(sender, accessList=[{"address": "0x" + "33" * 20, "storageKeys": []}]), "invalid-rpc-params"),
        (eip1559(sender, authorizationList=[]), "invalid-rpc-params"),
        (eip1559(sender, blobVersionedHashes=["0x01" + "00" * 31]), "invalid-rpc-params"),
        ({**eip1559(sender), "gas": "21000"}, "invalid-rpc-params"),
        ({**eip1559(sender), "value": 1000}, "invalid-rpc-params"),
        ({**eip1559(sender), "nonce": "0x00"}, "invalid-rpc-params"),
        (eip1559(sender, type="0x1"), "invalid-rpc-params"),
        (eip1559(sender, data="0x12", input="0x34"), "invalid-rpc-params"),
        ({key: value for key, value in eip1559(sender).items() if key != "to"}, "invalid-evm-transaction"),
        (eip1559(sender, gasPrice=hex(10**9)), "invalid-gas-fields"),
        ({key: value for key, value in eip1559(sender).items() if key != "from"}, "invalid-rpc-params"),
    ):
        error_of(await rpc(gw, "eth_signTransaction", [bad]), -32602, problem)
    error_of(await rpc(gw, "eth_signTransaction", [eip1559(sender, chainId="0x4d2")]), -32022, "unknown-chain")
    assert await _transactions(gw, key) == []
    assert await _signed_nonce(gw, key, accessList=[]) == 0  # an empty access list is what clients send


async def test_message_signing_is_only_for_message_keys_and_never_a_bare_hash(rpc_gateway: Gateway) -> None:
    """personal_sign/eth_sign used to make an EVM key sign an arbitrary message (or a transaction's signing
    hash, a bare-hash eth_sign), or a message key used to sign transactions or typed data."""
    gw = rpc_gateway
    evm_key = await new_key(gw, f"rpc-msg-evm-{secrets.token_hex(3)}", "evm")
    message_key = await new_key(gw, f"rpc-msg-{secrets.token_hex(3)}", "message")
    error_of(await rpc(gw, "personal_sign", ["0x68656c6c6f", evm_key["address"]]), -32004, "evm-account-not-found")
    error_of(await rpc(gw, "eth_sign", [evm_key["address"], "0x68656c6c6f"]), -32004, "evm-account-not-found")
    error_of(await rpc(gw, "eth_signTransaction", [eip1559(message_key["address"])]), -32004,
             "evm-account-not-found")
    # eth_sign over a transaction's signing hash: the signature is over the EIP-191 digest of those 32
    # bytes, so it is no signature of the transaction.
    unsigned = UnsignedTransaction.from_json({
        "type": "eip1559", "chain_id": EVM_TEST_CHAIN_ID, "nonce": 0, "gas_limit": 21_000,
        "max_fee_per_gas": str(20 * 10**9), "max_priority_fee_per_gas": str(10**9),
        "to": "0x" + "11" * 20, "value": str(10**18), "data": "0x"})
    signing_hash = unsigned.signing_hash()
    signature = (await rpc(gw, "eth_sign", [message_key["address"], "0x" + signing_hash.hex()]))["result"]
    rsv = HexBytes(signature)
    bare = eth_keys.Signature(vrs=(rsv[64] - 27, int.from_bytes(rsv[:32], "big"), int.from_bytes(rsv[32:64], "big")))
    assert bare.recover_public_key_from_msg_hash(signing_hash).to_checksum_address() != message_key["address"]
    assert Account.recover_message(encode_defunct(primitive=signing_hash), signature=signature) \
        == message_key["address"]
    # A keystore password (personal_sign's third param) is refused; the message is audited by its hash only.
    error_of(await rpc(gw, "personal_sign", ["0x01", message_key["address"], "hunter2"]), -32602,
             "invalid-rpc-params")
    seq = (await audit_entries(gw))[-1]["seq"]
    secret_text = "transfer all to " + secrets.token_hex(8)
    await rpc(gw, "personal_sign", [secret_text, message_key["address"]])
    entry = [e for e in await audit_entries(gw, seq) if e["action"] == "evm.rpc.sign_message"][-1]
    assert entry["decision"] == "allowed" and entry["result"]["message_bytes"] == len(secret_text)
    assert secret_text not in str(entry) and secret_text.encode().hex() not in str(entry)
    assert entry["result"]["digest"] == keccak(b"\x19Ethereum Signed Message:\n" + str(len(secret_text)).encode()
                                               + secret_text.encode()).hex()


async def test_message_usage_fits_secp256k1_only(rpc_gateway: Gateway) -> None:
    """A `message` key made on a curve EIP-191 signers cannot use (P-256, Ed25519)."""
    gw = rpc_gateway
    for algorithm in ("ecdsa-p256", "ed25519"):
        response = await gw.client.post("/v1/keys", json={"label": f"msg-{algorithm}-{secrets.token_hex(3)}",
                                                          "algorithm": algorithm, "usage": ["message"]},
                                        headers=gw.auth(Role.ADMIN))
        await assert_problem(response, 400, "validation-failed")
    both = await gw.client.post("/v1/keys", json={"label": f"msg-evm-{secrets.token_hex(3)}",
                                                  "algorithm": "ecdsa-secp256k1", "usage": ["evm", "message"]},
                                headers=gw.auth(Role.ADMIN))
    assert both.status == 201, await both.text()


async def test_envelope_errors_are_json_rpc_errors(rpc_gateway: Gateway) -> None:
    """Malformed JSON-RPC (bad JSON, a wrong envelope, an unknown method, an oversized or keyed batch)
    answered with a traceback or a 500, or a notification that signs without anyone receiving it."""
    gw = rpc_gateway
    headers = {**gw.auth(Role.BACKEND), "Content-Type": "application/json"}

    async def post(body: bytes | str, extra: dict[str, str] | None = None) -> Any:
        response = await gw.client.post("/v1/evm/rpc", data=body, headers={**headers, **(extra or {})})
        assert response.status == 200, await response.text()
        return await response.json()

    await assert_problem(await gw.client.post("/v1/evm/rpc", data=b"", headers=headers), 400, "validation-failed")
    await assert_problem(await gw.client.post("/v1/evm/rpc", data=b'{"jsonrpc": "2.0"}', headers={
        **gw.auth(Role.BACKEND), "Content-Type": "text/plain"}), 415, "unsupported-media-type")
    answer = await post(b'{"jsonrpc": "2.0", "id": 1, "method": ')
    assert answer["id"] is None and answer["error"]["code"] == -32700
    for envelope in ('{"jsonrpc": "1.0", "id": 1, "method": "eth_chainId"}', '{"jsonrpc": "2.0", "id": 1}',
                     '{"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": "x"}',
                     '{"jsonrpc": "2.0", "id": [1], "method": "eth_chainId"}', '[]', '7'):
        answer = await post(envelope)
        assert answer["error"]["code"] == -32600, (envelope, answer)
    error_of(await rpc(gw, "eth_getBalance", ["0x" + "11" * 20, "latest"]), -32601, "rpc-method-not-found")
    error_of(await rpc(gw, "eth_chainId", [1]), -32602, "invalid-rpc-params")
    call = {"jsonrpc": "2.0", "method": "eth_chainId"}
    too_many = [{**call, "id": n} for n in range(21)]
    assert (await post(json.dumps(too_many)))["error"]["code"] == -32600
    batch = '[{"jsonrpc": "2.0", "id": 1, "method": "eth_chainId"}]'
    assert (await post(batch, {"Idempotency-Key": "k-" + secrets.token_hex(4)}))["error"]["code"] == -32600
    # A batch: answers in order, the invalid member answered on its own, the notification not executed.
    key = await new_key(gw, f"rpc-batch-{secrets.token_hex(3)}", "evm")
    notification = {"jsonrpc": "2.0", "method": "eth_signTransaction", "params": [eip1559(key["address"])]}
    answers = await post(json.dumps([{**call, "id": "a"}, notification, {"id": "b"},
                                                   {**call, "id": "c"}]))
    assert [a["id"] for a in answers] == ["a", "b", "c"]  # an invalid member keeps its readable id
    assert answers[0]["result"] == answers[2]["result"] == hex(EVM_TEST_CHAIN_ID)
    assert answers[1]["error"]["code"] == -32600
    assert await _transactions(gw, key) == []
    only = await gw.client.post("/v1/evm/rpc", json=notification, headers=gw.auth(Role.BACKEND))
    assert only.status == 204 and await _transactions(gw, key) == []


async def test_without_default_chain_or_node_the_signer_says_so(gateway: Gateway) -> None:
    """A gateway with no JSON-RPC chain or node configured guessing a chain for a transaction, or
    pretending to broadcast."""
    gw = gateway
    error_of(await rpc(gw, "eth_chainId", []), -32602, "evm-rpc-no-default-chain")
    error_of(await rpc(gw, "eth_sendTransaction", [legacy("0x" + "11" * 20)]), -32601, "rpc-method-not-found")


async def test_local_nonce_behind_the_chain_is_refused_and_signalled(rpc_gateway: Gateway,
                                                                     eth_node: EthTesterNode) -> None:
    """eth_sendTransaction after the gateway's nonces were reset below what the chain has seen: the
    transaction would reuse a mined nonce (stuck, or replacing a pending one)."""
    gw = rpc_gateway
    key = await new_key(gw, f"rpc-drift-{secrets.token_hex(3)}", "evm")
    eth_node.reset({key["address"]: 10 * 10**18})
    for _ in range(2):
        sent = await rpc(gw, "eth_sendTransaction", [legacy(key["address"])])
        assert eth_node.chain.get_transaction_receipt(sent["result"])["status"] == 1
    response = await gw.client.post(f"/v1/evm/nonces/{EVM_TEST_CHAIN_ID}/{key['address']}", json={"next_nonce": 0},
                                    headers=gw.auth(Role.ADMIN))
    assert response.status == 200, await response.text()
    before = await _transactions(gw, key)
    error = error_of(await rpc(gw, "eth_sendTransaction", [legacy(key["address"])]), -32009,
                     "evm-nonce-behind-chain")
    assert (error["data"]["chain_count"], error["data"]["next_nonce"]) == (2, 0)
    assert await _transactions(gw, key) == before  # nothing signed
    labels = {"chain_id": str(EVM_TEST_CHAIN_ID), "address": key["address"]}
    assert runtime(gw).metrics.registry.get_sample_value("ecny_evm_nonce_drift", labels) == 2
    metrics = await (await gw.client.get("/metrics", headers=gw.auth(Role.ADMIN))).text()
    assert f'ecny_evm_nonce_drift{{address="{key["address"]}",chain_id="{EVM_TEST_CHAIN_ID}"}} 2.0' in metrics
    signal = await runtime(gw).database.read(lambda tx: tx.fetchone(  # in the outbox, or moved on by the monitor
        "SELECT kind, detail FROM (SELECT 1 AS newer, seq, kind, detail FROM risk_outbox WHERE subject = ? "
        "UNION ALL SELECT 0, seq, kind, detail FROM risk_signals WHERE subject = ?) AS t ORDER BY newer DESC, seq DESC",
        (key["address"], key["address"])))
    assert signal is not None and signal["kind"] == "evm.nonce_behind_chain"
    # The admin sets the next nonce to the chain's: sending works again, with nonce 2.
    response = await gw.client.post(f"/v1/evm/nonces/{EVM_TEST_CHAIN_ID}/{key['address']}", json={"next_nonce": 2},
                                    headers=gw.auth(Role.ADMIN))
    assert response.status == 200, await response.text()
    sent = await rpc(gw, "eth_sendTransaction", [legacy(key["address"])])
    assert eth_node.chain.get_transaction_by_hash(sent["result"])["nonce"] == 2
    assert runtime(gw).metrics.registry.get_sample_value("ecny_evm_nonce_drift", labels) == 0


async def test_send_transaction_only_to_the_nodes_chain(rpc_gateway: Gateway, eth_node: EthTesterNode) -> None:
    """eth_sendTransaction for another registered chain broadcast to the configured node (a transaction
    signed for chain A handed to a node of chain B), or an account the gateway has no key for probed
    through the node."""
    gw = rpc_gateway
    key = await new_key(gw, f"rpc-chain-{secrets.token_hex(3)}", "evm")
    calls = len(eth_node.calls)
    error_of(await rpc(gw, "eth_sendTransaction", [legacy(key["address"], chainId="0x1")]), -32602,
             "invalid-rpc-params")
    error_of(await rpc(gw, "eth_sendTransaction", [legacy("0x" + "44" * 20)]), -32004, "evm-account-not-found")
    assert eth_node.calls[calls:] == []  # the node was asked nothing, about the unknown account least of all
    assert await _transactions(gw, key) == []


async def test_a_nul_anywhere_in_a_json_rpc_request_is_a_json_rpc_validation_error(rpc_gateway: Gateway) -> None:
    """A NUL (U+0000) in the method, the id or a param, as in every other body (tests/api/test_hostile_input.py):
    a JSON-RPC error whose data names ``validation-failed``. Positive control: the same call without it."""
    gw = rpc_gateway
    key = await new_key(gw, f"rpc-nul-{secrets.token_hex(3)}", "message")
    message = "0x" + b"hello".hex()
    for method, params, call_id in (("personal_sign\x00", [message, key["address"]], 1),
                                    ("personal_sign", [message, key["address"]], "id\x00"),
                                    ("personal_sign", [message, key["address"] + "\x00"], 2)):
        response = await gw.client.post("/v1/evm/rpc", json={"jsonrpc": "2.0", "id": call_id, "method": method,
                                                              "params": params}, headers=gw.auth(Role.BACKEND))
        assert response.status == 200, await response.text()
        error_of(await response.json(), -32602, "validation-failed")
    answer = await rpc(gw, "personal_sign", [message, key["address"]])
    assert answer["result"].startswith("0x") and len(answer["result"]) == 132


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**300, 2**300) | st.text(max_size=80)
                     | st.sampled_from(["0x", "0x0", "0x00", "0x2", "0x5208", "0x" + "11" * 20, "0xzz", "-0x1"]),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                    max_size=4), max_leaves=12)
_TX = st.fixed_dictionaries({}, optional={name: _JSON for name in (
    "from", "to", "gas", "gasPrice", "maxFeePerGas", "maxPriorityFeePerGas", "value", "data", "input", "nonce",
    "chainId", "type", "accessList")})


@settings(max_examples=300, deadline=None)
@given(st.one_of(_JSON, _TX))
def test_hostile_params_are_refused_as_problems_never_crashes(value: Any) -> None:
    """A hostile or broken client's params (wrong types, huge numbers, nested junk) reaching the
    readers of transaction objects, typed data and messages as an unhandled exception (a 500)."""
    readers: list[Any] = [read_transaction, read_typed_data_param, read_message]
    if isinstance(value, dict):  # typed_data_chain reads a document read_typed_data_param returned
        readers.append(typed_data_chain)
    for reader in readers:
        try:
            reader(value)
        except GatewayError as error:
            assert error.http_status == 400, error


async def test_hostile_params_over_http_are_json_rpc_errors(rpc_gateway: Gateway) -> None:
    """The same junk sent to every method over HTTP: each answer is a JSON-RPC error naming a client
    problem, never an internal error, and nothing is signed."""
    gw = rpc_gateway
    key = await new_key(gw, f"rpc-junk-{secrets.token_hex(3)}", "evm")
    junk: list[Any] = [None, 1, "x", {}, [], [[]], [{}], [None, None], ["0x", {}], [key["address"], 7],
                       [key["address"], {"types": "x"}], [{"from": key["address"], "gas": 2**80}],
                       [{"from": key["address"], "to": key["address"], "data": ["0x00"]}],
                       [{"from": key["address"], "to": "0x" + "11" * 20, "gas": "0x5208", "value": "0x" + "f" * 65}],
                       [key["address"], '{"types": {}, "primaryType": "X", "domain": {"chainId": true}}']]
    methods = ["eth_accounts", "eth_chainId", "eth_signTransaction", "eth_sendTransaction", "eth_signTypedData_v4",
               "eth_signTypedData", "personal_sign", "eth_sign"]
    for method in methods:
        for params in junk:
            response = await gw.client.post("/v1/evm/rpc", json={"jsonrpc": "2.0", "id": 1, "method": method,
                                                                  "params": params}, headers=gw.auth(Role.BACKEND))
            assert response.status == 200, await response.text()
            answer = await response.json()
            if "result" in answer:  # eth_accounts / eth_chainId with empty params
                assert method in ("eth_accounts", "eth_chainId") and params in (None, []), answer
                continue
            assert answer["error"]["code"] in (-32600, -32602, -32004, -32022), (method, params, answer)
    assert await _transactions(gw, key) == []


async def test_a_failing_or_foreign_node_is_reported_not_trusted(rpc_gateway: Gateway, eth_node: EthTesterNode) -> None:
    """eth_sendTransaction through a node of another chain (a transaction handed to the wrong network),
    or a node that refuses the transaction reported as success."""
    gw = rpc_gateway
    key = await new_key(gw, f"rpc-node-{secrets.token_hex(3)}", "evm")
    eth_node.reset({})  # the key's address holds nothing on this chain
    eth_node.chain_id = 1
    error = error_of(await rpc(gw, "eth_sendTransaction", [legacy(key["address"])]), -32052, "evm-upstream-failed")
    assert error["data"]["status"] == 502 and "request id" in error["message"]
    assert await _transactions(gw, key) == []  # nothing signed for the wrong network
    eth_node.chain_id = EVM_TEST_CHAIN_ID
    error = error_of(await rpc(gw, "eth_sendTransaction", [legacy(key["address"])]), -32052, "evm-upstream-failed")
    data = error["data"]
    assert data["upstream_error"]["code"] == -32000 and data["upstream_error"]["message"]
    assert Account.recover_transaction(data["raw_transaction"]) == key["address"]  # signed, refused by the node
    assert data["tx_hash"] == "0x" + keccak(HexBytes(data["raw_transaction"])).hex()


@pytest.fixture
async def odd_node() -> Any:
    """A JSON-RPC "node" on 127.0.0.1 whose answers a test chooses."""
    replies: list[bytes] = []

    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=replies.pop(0), content_type="application/json")

    app = web.Application()
    app.router.add_post("/", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("/")), replies
    await server.close()


async def test_upstream_answers_are_untrusted_input(odd_node: Any) -> None:
    """A broken or hostile node (no answer, not JSON, another call's answer, a huge body, a malformed
    quantity) making the gateway crash, hang or believe a wrong nonce count."""
    url, replies = odd_node
    closed = UpstreamNode("http://127.0.0.1:9/", 2.0)  # the discard port: nothing listens
    with pytest.raises(EvmUpstreamFailed, match="did not answer"):
        await closed.chain_id()
    await closed.close()
    node = UpstreamNode(url, 5.0)
    try:
        for call_id, (reply, problem) in enumerate((
            (b"<html>bad gateway</html>", "without JSON"),
            (b'{"jsonrpc": "2.0", "id": 999, "result": "0x1"}', "not the JSON-RPC response"),
            (b'{"jsonrpc": "2.0", "id": %d, "result": "0x" }', "hex quantity"),
            (b'{"jsonrpc": "2.0", "id": %d, "result": 12}', "hex quantity"),
            (b'{"jsonrpc": "2.0", "id": %d, "result": "0x' + b"f" * 70 + b'"}', "hex quantity"),
            (b'{"jsonrpc": "2.0", "id": %d, "error": {"code": -32000, "message": "boom"}}', "refused: boom"),
            (b'{"jsonrpc": "2.0", "id": %d}', "neither result nor error"),
            (b'{"jsonrpc": "2.0", "id": %d, "result": "' + b"0" * (1 << 20) + b'"}', "larger than"),
        ), start=1):  # the node's client numbers its calls 1, 2, …
            replies.append(reply.replace(b"%d", str(call_id).encode()))
            with pytest.raises(EvmUpstreamFailed, match=problem):
                await node.transaction_count("0x" + "11" * 20)
    finally:
        await node.close()


async def test_a_batch_is_charged_per_call(rpc_gateway: Gateway) -> None:
    """A batch used to get past the per-principal rate limit: twenty signing calls for the price of one
    HTTP request."""
    gw = rpc_gateway
    limiter = gw.client.server.app[RATE_LIMITER]
    rate, burst = limiter.rate, limiter.burst
    limiter.rate, limiter.burst = 0.01, 2.0  # refills one token in 100 s: none during the test
    try:
        calls = [{"jsonrpc": "2.0", "id": n, "method": "eth_chainId"} for n in range(6)]
        response = await gw.client.post("/v1/evm/rpc", json=calls, headers=gw.auth(Role.BACKEND))
        assert response.status == 200, await response.text()
        codes = [answer.get("error", {}).get("code") for answer in await response.json()]
    finally:
        limiter.rate, limiter.burst = rate, burst
    assert codes[:2] == [None, None]  # the request's own token, then the second of the burst
    assert codes[2:] == [-32029] * 4


def test_upstream_node_needs_its_chain() -> None:
    """An upstream node configured without saying which chain it serves (transactions of any chain
    would be broadcast to it)."""
    with pytest.raises(ConfigError, match="upstream_url needs default_chain_id"):
        load_settings(None, environ={"ECNY_EVM_RPC__UPSTREAM_URL": "http://127.0.0.1:8545"})
    with pytest.raises(ConfigError, match="not in"):
        load_settings(None, environ={"ECNY_EVM_RPC__DEFAULT_CHAIN_ID": "424242"})
    settings = load_settings(None, environ={"ECNY_EVM_RPC__DEFAULT_CHAIN_ID": "11155111",
                                            "ECNY_EVM_RPC__UPSTREAM_URL": "http://127.0.0.1:8545"})
    assert settings.evm_rpc.default_chain_id == 11155111
