"""gateway.schemes.evm and gateway.policy.evm, checked against independent implementations:
eth-account (transactions, recovery, EIP-712), eth-abi (calldata) and eth-utils (selectors, EIP-55).

The HSM is stood in for by a coincurve private key whose signatures are forced high-S half of the
time, as SoftHSM2's are (~50 %), so low-S normalisation and recovery-id search are both exercised.
"""

from __future__ import annotations

import os
import random
from typing import Any

import pytest
import rlp  # type: ignore[import-untyped]
from coincurve import PrivateKey
from eth_abi.abi import decode as abi_decode
from eth_account import Account
from eth_account._utils.legacy_transactions import Transaction
from eth_account.messages import _hash_eip191_message, encode_typed_data
from eth_account.typed_transactions.typed_transaction import TypedTransaction
from eth_utils.abi import function_signature_to_4byte_selector
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from hexbytes import HexBytes
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.errors import (
    InvalidAddress,
    InvalidEvmAmount,
    InvalidEvmTransaction,
    InvalidGasFields,
    InvalidTypedData,
    PolicyRefused,
    SignatureRecoveryFailed,
    TypedDataTooComplex,
    UnknownContract,
    UnknownToken,
)
from gateway.keys import evm_address
from gateway.policy import evm as policy
from gateway.policy.chains import EvmChainSettings, EvmNativeSettings, EvmTokenSettings, TypedDataDomainSettings
from gateway.schemes.evm.eip712 import MAX_TYPED_DEPTH, dependencies, parse_typed_data
from gateway.schemes.evm.erc20 import ERC20_METHODS, Erc20Call, decode_erc20_calldata, erc20_calldata
from gateway.schemes.evm.signatures import HALF_N, SECP256K1_N, low_s, recover_signature
from gateway.schemes.evm.transactions import Fees, UnsignedTransaction, check_fees, finish_transaction, parse_data
from gateway.schemes.evm.values import checksum, parse_address, parse_amount


class SoftKey:
    """A stand-in for the HSM: raw r‖s over a digest, high-S whenever ``high`` says so."""

    def __init__(self) -> None:
        self.private = PrivateKey()
        self.public = self.private.public_key.format(compressed=False)
        self.address = evm_address(self.public)

    def sign(self, digest: bytes, high: bool) -> bytes:
        recoverable = self.private.sign_recoverable(digest, hasher=None)
        r, s = int.from_bytes(recoverable[:32], "big"), int.from_bytes(recoverable[32:64], "big")
        assert s <= HALF_N  # libsecp256k1 always gives low-S
        if high:
            s = SECP256K1_N - s
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


@pytest.fixture(scope="module")
def key() -> SoftKey:
    return SoftKey()


def _random_transaction(rng: random.Random, tx_type: str) -> UnsignedTransaction:
    if tx_type == "eip1559":
        max_fee = rng.randrange(1, 10**12)
        fees = Fees(rng.randrange(21_000, 10**7), max_fee_per_gas=max_fee,
                    max_priority_fee_per_gas=rng.randrange(0, max_fee))
    else:
        fees = Fees(rng.randrange(21_000, 10**7), gas_price=rng.randrange(0, 10**12))
    data = bytes(rng.randrange(256) for _ in range(rng.choice([0, 4, 68, 200])))
    return UnsignedTransaction(tx_type, rng.choice([1, 71, 1030, 11155111, 131277322940537]),  # type: ignore[arg-type]
                               rng.randrange(0, 2**40), fees, os.urandom(20), rng.randrange(0, 2**200), data)


@pytest.mark.parametrize("tx_type", ["eip1559", "legacy"])
def test_eth_account_recovers_and_decodes_every_transaction(key: SoftKey, tx_type: str) -> None:
    rng = random.Random(1234 if tx_type == "legacy" else 4321)
    high_seen = 0
    for round_ in range(40):
        unsigned = _random_transaction(rng, tx_type)
        high = round_ % 2 == 0
        high_seen += high
        signed = finish_transaction(unsigned, key.sign(unsigned.signing_hash(), high), key.public)
        assert signed.signature.s <= HALF_N
        assert Account.recover_transaction(signed.raw) == key.address
        assert signed.tx_hash == bytes(keccak(signed.raw))
        fees = unsigned.fees
        if tx_type == "eip1559":
            assert signed.raw[0] == 2
            decoded = TypedTransaction.from_bytes(HexBytes(signed.raw)).as_dict()
            assert decoded["chainId"] == unsigned.chain_id
            assert decoded["maxFeePerGas"] == fees.max_fee_per_gas
            assert decoded["maxPriorityFeePerGas"] == fees.max_priority_fee_per_gas
            assert decoded["accessList"] == ()
            assert decoded["v"] == signed.signature.y_parity
        else:
            decoded = rlp.decode(signed.raw, Transaction).as_dict()
            assert decoded["gasPrice"] == fees.gas_price
            assert decoded["v"] in (unsigned.chain_id * 2 + 35, unsigned.chain_id * 2 + 36)  # EIP-155
        assert decoded["nonce"] == unsigned.nonce
        assert decoded["gas"] == fees.gas_limit
        assert bytes(decoded["to"]) == unsigned.to
        assert decoded["value"] == unsigned.value
        assert bytes(decoded["data"]) == unsigned.data
        assert (decoded["r"], decoded["s"]) == (signed.signature.r, signed.signature.s)
    assert high_seen == 20


def test_eth_account_signs_the_same_signing_hash(key: SoftKey) -> None:
    """Our signing hash is the one eth-account signs: a signature of eth-account's transaction, made
    by the same key, reassembles into the same raw bytes."""
    account = Account.from_key(key.private.secret)
    for tx_type in ("eip1559", "legacy"):
        unsigned = _random_transaction(random.Random(7), tx_type)
        fields: dict[str, Any] = {"nonce": unsigned.nonce, "gas": unsigned.fees.gas_limit,
                                  "to": checksum(unsigned.to), "value": unsigned.value, "data": unsigned.data,
                                  "chainId": unsigned.chain_id}
        if tx_type == "eip1559":
            fields |= {"type": 2, "maxFeePerGas": unsigned.fees.max_fee_per_gas,
                       "maxPriorityFeePerGas": unsigned.fees.max_priority_fee_per_gas}
        else:
            fields["gasPrice"] = unsigned.fees.gas_price
        theirs = account.sign_transaction(fields)
        ours = unsigned.assemble(theirs.v - (unsigned.chain_id * 2 + 35) if tx_type == "legacy" else theirs.v,
                                 theirs.r, theirs.s)
        assert ours == bytes(theirs.raw_transaction)
        # eth-account's signature verifies over our signing hash: both sign the same bytes.
        their_signature = theirs.r.to_bytes(32, "big") + theirs.s.to_bytes(32, "big")
        recovered = recover_signature(unsigned.signing_hash(), their_signature, key.public)
        assert (recovered.r, recovered.s) == (theirs.r, theirs.s)


def test_low_s_and_recovery_failures(key: SoftKey) -> None:
    digest = os.urandom(32)
    raw = key.sign(digest, high=True)
    r, s = low_s(raw)
    assert s <= HALF_N and r == int.from_bytes(raw[:32], "big")
    with pytest.raises(SignatureRecoveryFailed):
        recover_signature(digest, raw, SoftKey().public)  # another key's signature
    with pytest.raises(SignatureRecoveryFailed):
        low_s(raw[:63])
    with pytest.raises(SignatureRecoveryFailed):
        low_s(bytes(32) + raw[32:])


def test_erc20_calldata_decodes_with_eth_abi() -> None:
    recipient = os.urandom(20)
    for name, method in ERC20_METHODS.items():
        assert method.selector == function_signature_to_4byte_selector(method.signature)
        call = Erc20Call(method.name, None if name == "burn" else recipient, 123_456_789 * 10**12)
        data = erc20_calldata(call)
        assert data[:4] == method.selector
        values = abi_decode(list(method.types), data[4:])
        if name == "burn":
            assert values == (call.amount,)
        else:
            assert values == ("0x" + recipient.hex(), call.amount)
        assert decode_erc20_calldata(data) == call
    assert decode_erc20_calldata(bytes.fromhex("23b872dd") + bytes(96)) is None  # transferFrom: not ours
    with pytest.raises(InvalidEvmTransaction):
        decode_erc20_calldata(erc20_calldata(Erc20Call("transfer", recipient, 1)) + b"\x00")
    with pytest.raises(InvalidEvmTransaction):
        decode_erc20_calldata(ERC20_METHODS["transfer"].selector + bytes(40))


def test_eip55_addresses() -> None:
    raw = os.urandom(20)
    good = to_checksum_address(raw)
    assert parse_address(good) == raw
    assert parse_address(good.lower()) == raw
    assert parse_address("0x" + good[2:].upper()) == raw
    letters = [i for i, c in enumerate(good) if i > 1 and c.isalpha()]
    while not letters:  # an address with no letters has no checksum to get wrong: take another
        raw = os.urandom(20)
        good = to_checksum_address(raw)
        letters = [i for i, c in enumerate(good) if i > 1 and c.isalpha()]
    i = letters[0]
    wrong = good[:i] + good[i].swapcase() + good[i + 1:]
    if wrong[2:].lower() != wrong[2:] and wrong[2:].upper() != wrong[2:]:
        with pytest.raises(InvalidAddress, match="EIP-55"):
            parse_address(wrong)
    for bad in ("", "0x1234", good[2:], "0x" + "g" * 40, good + "00", None, 5):
        with pytest.raises(InvalidAddress):
            parse_address(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["-1", "1.5", "1e3", "0x10", " 1", "", "1_000", str(2**256), 1, 1.5, None, True])
def test_bad_amounts(text: Any) -> None:
    with pytest.raises(InvalidEvmAmount):
        parse_amount(text)


def test_amounts() -> None:
    assert parse_amount("0") == 0
    assert parse_amount(str(2**256 - 1)) == 2**256 - 1
    assert parse_amount("000123") == 123
    assert parse_data(None) == b"" and parse_data("0x") == b"" and parse_data("0xA9059CBB") == bytes.fromhex("a9059cbb")
    for bad in ("a9059cbb", "0x123", "0xzz"):
        with pytest.raises(InvalidEvmTransaction):
            parse_data(bad)


@pytest.mark.parametrize(
    ("tx_type", "gas_limit", "max_fee", "priority", "gas_price"),
    [("eip1559", 21000, 10, 1, 5), ("eip1559", 21000, None, 1, None), ("eip1559", 21000, 10, None, None),
     ("eip1559", 21000, 1, 10, None), ("eip1559", None, 10, 1, None), ("eip1559", 20999, 10, 1, None),
     ("eip1559", -1, 10, 1, None), ("legacy", 21000, None, None, None), ("legacy", 21000, 10, None, 5),
     ("legacy", 21000, None, 1, 5), ("legacy", 10**9, None, None, 5)],
)
def test_inconsistent_gas_fields(tx_type: Any, gas_limit: Any, max_fee: Any, priority: Any, gas_price: Any) -> None:
    with pytest.raises(InvalidGasFields):
        check_fees(tx_type, gas_limit, max_fee, priority, gas_price)


def test_consistent_gas_fields() -> None:
    assert check_fees("eip1559", 21000, 10, 10, None) == Fees(21000, 10, 10, None)
    assert check_fees("legacy", 60000, None, None, 0) == Fees(60000, gas_price=0)


# --- EIP-712 against eth-account -------------------------------------------------------------------

TOKEN = "0x" + "9a" * 20


def permit(owner: str, spender: str, value: Any, chain_id: int = 1, contract: str = TOKEN) -> dict[str, Any]:
    return {
        "types": {
            "EIP712Domain": [{"name": "name", "type": "string"}, {"name": "version", "type": "string"},
                             {"name": "chainId", "type": "uint256"}, {"name": "verifyingContract", "type": "address"}],
            "Permit": [{"name": "owner", "type": "address"}, {"name": "spender", "type": "address"},
                       {"name": "value", "type": "uint256"}, {"name": "nonce", "type": "uint256"},
                       {"name": "deadline", "type": "uint256"}],
        },
        "primaryType": "Permit",
        "domain": {"name": "USD Coin", "version": "2", "chainId": chain_id, "verifyingContract": contract},
        "message": {"owner": owner, "spender": spender, "value": value, "nonce": 0, "deadline": 2**255},
    }


MAIL = {
    "types": {
        "EIP712Domain": [{"name": "name", "type": "string"}, {"name": "version", "type": "string"},
                         {"name": "chainId", "type": "uint256"}, {"name": "verifyingContract", "type": "address"},
                         {"name": "salt", "type": "bytes32"}],
        "Person": [{"name": "name", "type": "string"}, {"name": "wallets", "type": "address[]"}],
        "Mail": [{"name": "from", "type": "Person"}, {"name": "to", "type": "Person[]"},
                 {"name": "contents", "type": "string"}, {"name": "attachment", "type": "bytes"},
                 {"name": "urgent", "type": "bool"}, {"name": "tags", "type": "bytes4[2]"},
                 {"name": "delta", "type": "int64"}, {"name": "grid", "type": "uint8[2][]"}],
    },
    "primaryType": "Mail",
    "domain": {"name": "Ether Mail", "version": "1", "chainId": "1",
               "verifyingContract": "0xCcCCccccCCCCcCCCCCCcCcCccCcCCCcCcccccccC", "salt": "0x" + "01" * 32},
    "message": {
        "from": {"name": "Cow", "wallets": ["0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826",
                                            "0xDeaDbeefdEAdbeefdEadbEEFdeadbeEFdEaDbeeF"]},
        "to": [{"name": "Bob", "wallets": ["0xbBbBBBBbbBBBbbbBbbBbbbbBBbBbbbbBbBbbBBbB"]},
               {"name": "Émilie 🐄", "wallets": []}],
        "contents": "Hello, Bob!",
        "attachment": "0x00ff10",
        "urgent": True,
        "tags": ["0xdeadbeef", "0x00000001"],
        "delta": -42,
        "grid": [[1, 2], [3, 255]],
    },
}


def _oracle(document: dict[str, Any]) -> bytes:
    return bytes(_hash_eip191_message(encode_typed_data(full_message=document)))


def test_eip712_digests_match_eth_account(key: SoftKey) -> None:
    for document in (MAIL, permit(key.address, "0x" + "cd" * 20, "1000000"),
                     permit(key.address.lower(), "0x" + "cd" * 20, 2**256 - 1, chain_id=131277322940537)):
        typed = parse_typed_data(document)
        assert typed.digest == _oracle(document)
    no_domain_type = permit(key.address, "0x" + "cd" * 20, 5)
    del no_domain_type["types"]["EIP712Domain"]
    assert parse_typed_data(no_domain_type).digest == _oracle(no_domain_type)


def test_eip712_signature_recovers_with_eth_account(key: SoftKey) -> None:
    document = permit(key.address, "0x" + "cd" * 20, "1000000")
    typed = parse_typed_data(document)
    for high in (False, True):
        signature = recover_signature(typed.digest, key.sign(typed.digest, high), key.public)
        assert Account.recover_message(encode_typed_data(full_message=document), signature=signature.rsv()) \
            == key.address


@pytest.mark.parametrize("change", [
    lambda d: d["message"].pop("nonce"),
    lambda d: d["message"].update(extra=1),
    lambda d: d["message"].update(value=-1),
    lambda d: d["message"].update(value=2**256),
    lambda d: d["message"].update(value=1.5),
    lambda d: d["message"].update(value=True),
    lambda d: d["message"].update(owner="0x1234"),
    lambda d: d.update(primaryType="EIP712Domain"),
    lambda d: d.update(primaryType="Nope"),
    lambda d: d["types"]["Permit"].append({"name": "x", "type": "uint7"}),
    lambda d: d["types"]["Permit"].append({"name": "x", "type": "Unknown"}),
    lambda d: d["types"]["EIP712Domain"].append({"name": "color", "type": "string"}),
    lambda d: d.update(extra={}),
    lambda d: d.pop("domain"),
])
def test_eip712_refuses_malformed_documents(change: Any) -> None:
    document = permit("0x" + "aa" * 20, "0x" + "cd" * 20, "1")
    change(document)
    with pytest.raises((InvalidTypedData, InvalidAddress)):
        parse_typed_data(document)


# --- policy ----------------------------------------------------------------------------------------

USDX = "0x" + "ab" * 20
DENIED = "0x" + "de" * 20


def chain(**extra: Any) -> EvmChainSettings:
    return EvmChainSettings(
        chain_id=5, name="test", native=EvmNativeSettings(per_tx_cap=10**18, daily_cap=3 * 10**18),
        approval_threshold=5 * 10**17,
        tokens=[EvmTokenSettings(address=USDX, symbol="USDX", decimals=6, per_tx_cap=1_000, daily_cap=2_500,
                                 approval_threshold=500)],
        recipient_denylist=[DENIED],
        **{"typed_data_domains": [TypedDataDomainSettings(verifying_contract=USDX, name="USD Coin")], **extra})


def test_policy_on_decoded_intents() -> None:
    registry = chain()
    token = parse_address(USDX)
    recipient = os.urandom(20)
    native = policy.decode_intent(registry, recipient, 10**18, b"")
    assert (native.asset, native.method, native.amount) == ("native", "transfer", 10**18)
    assert policy.evaluate(registry, native, {}).allowed and policy.needs_approval(registry, native)
    assert policy.evaluate(registry, native, {"native": 2 * 10**18 + 1}).reasons == ("daily-cap-exceeded",)
    raw_transfer = erc20_calldata(Erc20Call("transfer", recipient, 1_001))
    intent = policy.decode_intent(registry, token, 0, raw_transfer)
    assert (intent.asset, intent.symbol, intent.recipient, intent.amount) == (
        checksum(token), "USDX", checksum(recipient), 1_001)
    assert policy.evaluate(registry, intent, {}).reasons == ("per-tx-cap-exceeded",)
    burn = policy.decode_intent(registry, token, 0, erc20_calldata(Erc20Call("burn", None, 10)))
    assert burn.recipient is None and policy.evaluate(registry, burn, {}).allowed
    denied = policy.erc20_intent(registry, token, Erc20Call("approve", parse_address(DENIED), 1))
    assert policy.evaluate(registry, denied, {}).reasons == ("recipient-denied",)
    allow_only = chain(recipient_allowlist=["0x" + "01" * 20])
    assert policy.evaluate(allow_only, intent, {}).reasons == ("recipient-not-allowlisted", "per-tx-cap-exceeded")
    with pytest.raises(UnknownContract):
        policy.decode_intent(registry, os.urandom(20), 0, raw_transfer)
    with pytest.raises(UnknownContract):
        policy.decode_intent(registry, token, 0, bytes.fromhex("23b872dd") + bytes(96))
    with pytest.raises(InvalidEvmTransaction):
        policy.decode_intent(registry, token, 1, raw_transfer)
    with pytest.raises(UnknownToken):
        policy.erc20_intent(registry, os.urandom(20), Erc20Call("transfer", recipient, 1))


def _refusal(registry: EvmChainSettings, document: dict[str, Any], signer: str) -> tuple[str, list[str]]:
    with pytest.raises(PolicyRefused) as caught:
        policy.read_typed_data(registry, parse_typed_data(document), signer)
    return caught.value.code, caught.value.reasons


def test_typed_data_domain_policy(key: SoftKey) -> None:
    registry = chain()
    allowed = parse_typed_data(permit(key.address, "0x" + "cd" * 20, "999", chain_id=5, contract=USDX))
    reading = policy.read_typed_data(registry, allowed, key.address)
    intent = reading.intent
    assert intent is not None and intent.method == "approve" and intent.amount == 999 and not reading.listed
    assert intent.recipient == checksum(parse_address("0x" + "cd" * 20)) and intent.asset == checksum(
        parse_address(USDX))
    assert policy.evaluate(registry, intent, {}).allowed
    over = policy.read_typed_data(registry, parse_typed_data(
        permit(key.address, "0x" + "cd" * 20, "1001", chain_id=5, contract=USDX)), key.address).intent
    assert over is not None and policy.evaluate(registry, over, {}).reasons == ("per-tx-cap-exceeded",)
    code, reasons = _refusal(registry, permit(key.address, "0x" + "cd" * 20, "1", chain_id=1, contract=USDX),
                             key.address)
    assert code == "typed-data-domain-not-allowed" and "domain-chain-mismatch" in reasons
    assert _refusal(registry, permit(key.address, "0x" + "cd" * 20, "1", chain_id=5), key.address) == (
        "typed-data-domain-not-allowed", ["domain-not-allowlisted"])
    assert _refusal(registry, permit("0x" + "aa" * 20, "0x" + "cd" * 20, "1", chain_id=5, contract=USDX),
                    key.address) == ("policy-refused", ["permit-owner-not-signer"])


def test_only_the_exact_standard_struct_decodes(key: SoftKey) -> None:
    registry = chain()
    reordered = permit(key.address, "0x" + "cd" * 20, "1", chain_id=5, contract=USDX)
    fields = reordered["types"]["Permit"]
    fields[0], fields[1] = fields[1], fields[0]
    renamed = permit(key.address, "0x" + "cd" * 20, "1", chain_id=5, contract=USDX)
    renamed["types"]["Permit"][2]["name"] = "amount"
    renamed["message"]["amount"] = renamed["message"].pop("value")
    for document in (reordered, renamed):
        assert _refusal(registry, document, key.address) == ("typed-data-not-allowed",
                                                             ["typed-data-nonstandard-struct"])
    other = permit(key.address, "0x" + "cd" * 20, "1", chain_id=5, contract=USDX)
    other["types"]["Order"] = other["types"].pop("Permit")
    other["primaryType"] = "Order"
    assert _refusal(registry, other, key.address) == ("typed-data-not-allowed", ["typed-data-type-not-listed"])
    listed = chain(typed_data_domains=[TypedDataDomainSettings(verifying_contract=USDX, name="USD Coin",
                                                               primary_types=["Order"])])
    reading = policy.read_typed_data(listed, parse_typed_data(other), key.address)
    assert reading.listed and reading.intent is None
    with pytest.raises(ValidationError):
        TypedDataDomainSettings(verifying_contract=USDX, primary_types=["Permit"])


def test_fees_count_against_the_native_caps() -> None:
    registry = chain()
    token_intent = policy.erc20_intent(registry, parse_address(USDX), Erc20Call("transfer", os.urandom(20), 10))
    fees = check_fees("eip1559", 21_000, 10**11, 10**9, None)
    assert fees.max_total == 21_000 * 10**11 and policy.check_fee_caps(registry, fees).allowed
    assert policy.spending(token_intent, fees.max_total) == {checksum(parse_address(USDX)): 10, "native":
                                                             fees.max_total}
    assert policy.evaluate(registry, token_intent, {"native": 3 * 10**18 - 1}, fees.max_total).reasons == (
        "native-daily-cap-exceeded",)
    native = policy.decode_intent(registry, os.urandom(20), 10**18, b"")
    assert policy.evaluate(registry, native, {}, 1).reasons == ("per-tx-cap-exceeded",)
    costly = check_fees("legacy", 21_000, None, None, 10**15)
    assert policy.check_fee_caps(registry, costly).reasons == ("fee-per-gas-above-cap", "total-fee-above-cap")
    assert policy.check_fee_caps(registry, check_fees("eip1559", 2_000_000, 10**9, 1, None)).reasons == (
        "gas-limit-above-cap",)


def _chain_of_types(count: int) -> dict[str, Any]:
    types: dict[str, Any] = {f"T{i}": [{"name": "x", "type": f"T{i + 1}[]"}] for i in range(count - 1)}
    types[f"T{count - 1}"] = [{"name": "x", "type": "uint256"}]
    return {"types": {"EIP712Domain": [{"name": "chainId", "type": "uint256"}], **types}, "primaryType": "T0",
            "domain": {"chainId": 1}, "message": {"x": []}}


def test_the_type_walk_is_iterative_and_bounded() -> None:
    """A type graph of 3,000 structs, each an array of the next: refused as too complex, and the walk
    itself (below the struct count bound) never recurses."""
    with pytest.raises(TypedDataTooComplex):
        parse_typed_data(_chain_of_types(3_000))
    graph = {f"T{i}": [("x", f"T{i + 1}[]")] for i in range(2_999)} | {"T2999": [("x", "uint256")]}
    with pytest.raises(TypedDataTooComplex):
        dependencies(graph, "T0")  # iterative: no RecursionError at 3,000 levels
    assert len(dependencies(graph, f"T{2_999 - MAX_TYPED_DEPTH}")) == MAX_TYPED_DEPTH + 1
    deep = _chain_of_types(MAX_TYPED_DEPTH + 2)
    with pytest.raises(TypedDataTooComplex):
        parse_typed_data(deep)
    fits = _chain_of_types(MAX_TYPED_DEPTH + 1)
    assert parse_typed_data(fits).digest == _oracle(fits)
    shadow = permit("0x" + "aa" * 20, "0x" + "cd" * 20, "1")
    shadow["types"]["uint256"] = [{"name": "a", "type": "bool"}]
    with pytest.raises(InvalidTypedData):
        parse_typed_data(shadow)


@given(st.binary(min_size=20, max_size=20))
def test_checksum_is_eip55_as_eth_utils_writes_it(address: bytes) -> None:
    assert checksum(address) == to_checksum_address(address)
    assert parse_address(checksum(address)) == address
