"""The teller UI shows a supervisor what an EIP-712 approval signs: the decoded amount and recipient,
or the message itself for a listed type — never only a digest."""

from __future__ import annotations

from tui.format import describe_payload, payload_summary

PERMIT_PAYLOAD = {
    "request_id": "etd_1", "key_id": "k" * 32, "signer": "0x" + "aa" * 20, "chain_id": 1, "chain": "Ethereum",
    "primary_type": "Permit", "verifying_contract": "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48",
    "digest": "0x" + "11" * 32,
    "intent": {"chain_id": 1, "asset": "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48", "symbol": "USDC",
               "decimals": 6, "method": "approve", "recipient": "0x" + "22" * 20, "amount": "900000000000"},
    "typed_data": {"message": {"value": "900000000000"}},
}


def test_a_permit_approval_shows_amount_and_spender() -> None:
    rows = dict(describe_payload("evm_typed_data", PERMIT_PAYLOAD))
    assert rows["Type"] == "Permit" and rows["Method"] == "approve"
    assert rows["Amount"] == "900,000.000000 USDC (900000000000 base units)"
    assert rows["Recipient"] == "0x" + "22" * 20 and rows["Digest"] == "0x" + "11" * 32
    assert payload_summary("evm_typed_data", PERMIT_PAYLOAD).startswith("900,000.000000 USDC → 0x22222222")


def test_a_listed_type_shows_its_message() -> None:
    payload = {**PERMIT_PAYLOAD, "primary_type": "Order", "intent": None,
               "typed_data": {"message": {"maker": "0x" + "aa" * 20, "sellAmount": 5}}}
    rows = dict(describe_payload("evm_typed_data", payload))
    assert rows["Type"] == "Order" and '"sellAmount": 5' in rows["Message"]
    assert rows["Amount"] == "not decoded: read the message"
