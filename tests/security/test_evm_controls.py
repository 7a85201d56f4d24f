"""EVM controls tried as an insider or a careless client would (issue 14, items 2, 5 and 9a).

Every EIP-712 document here is one eth-account itself accepts (``encode_typed_data``), and every
signature the gateway returns is checked by recovering the signer with eth-account: an oracle
independent of the gateway's own encoder. The chain registry is one chain with a 6-decimal USDC
(per-transaction cap 1,000,000, daily cap 1,500,000, approval above 100,000), a token without caps,
a small native daily cap, and an exchange domain that lists one non-standard type.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from eth_account import Account
from eth_account.messages import encode_typed_data

from gateway.auth.roles import Role
from tests.api.support import assert_problem, runtime
from tests.conftest import Gateway, Token, login, make_settings, new_evm_key, start_gateway
from tests.pg import PostgresServer

pytestmark = pytest.mark.softhsm

CHAIN_ID = 31337
USDC = "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48"
UNCAPPED = "0x7A7a7A7a7a7a7a7A7a7a7a7A7a7A7A7A7A7A7a7A"
EXCHANGE = "0x5e5E5e5e5E5e5E5E5e5E5E5e5e5E5E5E5e5E5E5e"
SPENDER = "0x2222222222222222222222222222222222222222"
RECIPIENT = "0x1111111111111111111111111111111111111111"
USD = 10**6
GWEI = 10**9
NATIVE_DAILY_CAP = 10**16  # 0.01 ETH a day


def controls_chain() -> dict[str, Any]:
    return {
        "chain_id": CHAIN_ID, "name": "controls",
        "native": {"symbol": "ETH", "per_tx_cap": str(10**18), "daily_cap": str(NATIVE_DAILY_CAP)},
        "approval_threshold": str(10**18),
        "tokens": [
            {"address": USDC, "symbol": "USDC", "decimals": 6, "per_tx_cap": str(1_000_000 * USD),
             "daily_cap": str(1_500_000 * USD), "approval_threshold": str(100_000 * USD)},
            {"address": UNCAPPED, "symbol": "FREE", "decimals": 0},
        ],
        "typed_data_domains": [
            {"verifying_contract": USDC, "name": "USD Coin", "version": "2"},
            {"verifying_contract": UNCAPPED},
            {"verifying_contract": EXCHANGE, "name": "Exchange", "primary_types": ["Order"]},
        ],
    }


@pytest_asyncio.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def gw(request: pytest.FixtureRequest, softhsm_token: Token,
             tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    if request.param == "sqlite":
        dsn = f"sqlite:///{tmp_path_factory.mktemp('evm-controls') / 'gateway.db'}"
    else:
        server: PostgresServer = request.getfixturevalue("postgres_server")
        dsn = server.create_database()
    started = await start_gateway(make_settings(softhsm_token, dsn, evm={"chains": [controls_chain()]}))
    response = await started.client.post(
        "/v1/keys", json={"label": f"audit-controls-{request.param}", "algorithm": "ecdsa-p256", "usage": ["audit"]},
        headers=started.auth(Role.ADMIN))
    assert response.status == 201, await response.text()
    yield started
    await started.client.close()


# --- EIP-712 documents, as a wallet or dApp would send them ----------------------------------------

DOMAIN_TYPE = [{"name": "name", "type": "string"}, {"name": "version", "type": "string"},
               {"name": "chainId", "type": "uint256"}, {"name": "verifyingContract", "type": "address"}]
PERMIT_TYPE = [{"name": "owner", "type": "address"}, {"name": "spender", "type": "address"},
               {"name": "value", "type": "uint256"}, {"name": "nonce", "type": "uint256"},
               {"name": "deadline", "type": "uint256"}]
AUTHORIZATION_TYPE = [{"name": "from", "type": "address"}, {"name": "to", "type": "address"},
                      {"name": "value", "type": "uint256"}, {"name": "validAfter", "type": "uint256"},
                      {"name": "validBefore", "type": "uint256"}, {"name": "nonce", "type": "bytes32"}]


def checked(document: dict[str, Any]) -> dict[str, Any]:
    """The document, once eth-account has encoded it: what the gateway gets is valid EIP-712."""
    encode_typed_data(full_message=document)
    return document


def usdc_domain(contract: str = USDC) -> dict[str, Any]:
    return {"name": "USD Coin", "version": "2", "chainId": CHAIN_ID, "verifyingContract": contract}


def permit(owner: str, value: int, contract: str = USDC, fields: list[dict[str, str]] | None = None,
           message: dict[str, Any] | None = None) -> dict[str, Any]:
    name = {USDC: "USD Coin", EXCHANGE: "Exchange"}.get(contract, "Other")  # as the domain entries expect
    domain = {"name": name, "version": "2", "chainId": CHAIN_ID, "verifyingContract": contract}
    return checked({
        "types": {"EIP712Domain": DOMAIN_TYPE, "Permit": fields or PERMIT_TYPE},
        "primaryType": "Permit",
        "domain": domain,
        "message": message or {"owner": owner, "spender": SPENDER, "value": str(value), "nonce": 0,
                               "deadline": 1_900_000_000},
    })


def authorization(primary_type: str, sender: str, value: int) -> dict[str, Any]:
    return checked({
        "types": {"EIP712Domain": DOMAIN_TYPE, primary_type: AUTHORIZATION_TYPE},
        "primaryType": primary_type,
        "domain": usdc_domain(),
        "message": {"from": sender, "to": RECIPIENT, "value": str(value), "validAfter": 0, "validBefore": 1_900_000_000,
                    "nonce": "0x" + secrets.token_hex(32)},
    })


def order(maker: str) -> dict[str, Any]:
    return checked({
        "types": {"EIP712Domain": [{"name": "name", "type": "string"}, {"name": "chainId", "type": "uint256"},
                                   {"name": "verifyingContract", "type": "address"}],
                  "Order": [{"name": "maker", "type": "address"}, {"name": "sellAmount", "type": "uint256"}]},
        "primaryType": "Order",
        "domain": {"name": "Exchange", "chainId": CHAIN_ID, "verifyingContract": EXCHANGE},
        "message": {"maker": maker, "sellAmount": 5},
    })


async def sign_typed(gw: Gateway, key: dict[str, Any], document: dict[str, Any]) -> Any:
    return await gw.client.post("/v1/evm/typed-data", json={"key_id": key["key_id"], "chain_id": CHAIN_ID,
                                                            "typed_data": document},
                                headers={**gw.auth(Role.BACKEND), "Idempotency-Key": uuid.uuid4().hex})


def recovers(document: dict[str, Any], result: dict[str, Any], key: dict[str, Any]) -> bool:
    """eth-account recovers the key's address from the returned signature."""
    recovered: str = Account.recover_message(encode_typed_data(full_message=document), signature=result["signature"])
    return recovered == key["address"] == result["signer"]


async def typed_rows(gw: Gateway, key: dict[str, Any]) -> list[Any]:
    return list(await runtime(gw).database.read(lambda tx: tx.fetchall(
        "SELECT status, signature FROM evm_typed_data WHERE key_id = ? ORDER BY created_at", (key["key_id"],))))


async def approve(gw: Gateway, approval_id: str, supervisor: dict[str, str]) -> dict[str, Any]:
    approval = await (await gw.client.get(f"/v1/approvals/{approval_id}", headers=supervisor)).json()
    response = await gw.client.post(f"/v1/approvals/{approval_id}/approve",
                                    json={"payload_hash": approval["payload_hash"], "note": "checked"},
                                    headers=supervisor)
    assert response.status == 200, await response.text()
    decided: dict[str, Any] = await response.json()
    return decided


# --- EIP-712 -----------------------------------------------------------------------------------------


async def test_small_permit_is_signed(gw: Gateway) -> None:
    """Positive control: a small EIP-2612 permit within every cap is signed at once, and eth-account
    recovers the key's address from the signature."""
    key = await new_evm_key(gw, f"controls-small-{secrets.token_hex(3)}")
    document = permit(key["address"], 10 * USD)
    response = await sign_typed(gw, key, document)
    assert response.status == 200, await response.text()
    result = await response.json()
    assert result["status"] == "signed" and recovers(document, result, key)
    assert result["intent"] == {"chain_id": CHAIN_ID, "asset": USDC, "symbol": "USDC", "decimals": 6,
                                "method": "approve", "recipient": SPENDER, "amount": str(10 * USD)}


async def test_transfer_authorization_beyond_the_cap_is_refused(gw: Gateway) -> None:
    """EIP-3009 authorisation beyond the token's caps: a TransferWithAuthorization (or Receive…) for
    2**255 USDC is read as a transfer and refused by the per-transaction cap; nothing is signed."""
    key = await new_evm_key(gw, f"controls-3009-{secrets.token_hex(3)}")
    for primary_type in ("TransferWithAuthorization", "ReceiveWithAuthorization"):
        problem = await assert_problem(await sign_typed(gw, key, authorization(primary_type, key["address"], 2**255)),
                                       422, "evm-cap-exceeded")
        assert "per-tx-cap-exceeded" in problem["reasons"]
    # As a JSON number 2**255 would parse as a float: refused as malformed, never rounded into an amount.
    as_number = authorization("TransferWithAuthorization", key["address"], 1)
    as_number["message"]["value"] = 2**255
    await assert_problem(await sign_typed(gw, key, as_number), 400, "invalid-typed-data")
    # Within the caps the same authorisation is a transfer the policy reads, and is signed.
    document = authorization("TransferWithAuthorization", key["address"], 5 * USD)
    response = await sign_typed(gw, key, document)
    assert response.status == 200, await response.text()
    result = await response.json()
    assert result["intent"]["method"] == "transfer" and result["intent"]["recipient"] == RECIPIENT
    assert recovers(document, result, key)
    assert [row["status"] for row in await typed_rows(gw, key)] == ["signed"]


async def test_unlimited_permit_is_refused(gw: Gateway) -> None:
    """Unlimited permit: a Permit (or an ERC-20 approve) for 2**256 - 1 is beyond any cap, even on a token
    configured without caps."""
    key = await new_evm_key(gw, f"controls-unlimited-{secrets.token_hex(3)}")
    document = permit(key["address"], 2**256 - 1, contract=UNCAPPED)
    problem = await assert_problem(await sign_typed(gw, key, document), 422, "evm-cap-exceeded")
    assert problem["reasons"] == ["unlimited-approval"]
    response = await sign_typed(gw, key, permit(key["address"], 2**256 - 2, contract=UNCAPPED))
    assert response.status == 200, await response.text()  # the same token without the sentinel: no cap set
    # The same rule for an ERC-20 approve transaction: one policy for both paths.
    body = {"key_id": key["key_id"], "chain_id": CHAIN_ID, "type": "eip1559", "gas_limit": 65_000,
            "max_fee_per_gas": str(20 * GWEI), "max_priority_fee_per_gas": str(GWEI),
            "erc20": {"token": UNCAPPED, "method": "approve", "to": SPENDER, "amount": str(2**256 - 1)}}
    response = await gw.client.post("/v1/evm/transactions", json=body,
                                    headers={**gw.auth(Role.BACKEND), "Idempotency-Key": uuid.uuid4().hex})
    assert (await assert_problem(response, 422, "evm-cap-exceeded"))["reasons"] == ["unlimited-approval"]


async def test_large_permit_waits_for_a_second_person(gw: Gateway) -> None:
    """EIP-2612 permit skipping dual control: a Permit of 900,000 USDC (threshold 100,000) is parked
    for a supervisor, not signed; approved by a supervisor it is signed and recovers to the key."""
    key = await new_evm_key(gw, f"controls-large-{secrets.token_hex(3)}")
    document = permit(key["address"], 900_000 * USD)
    response = await sign_typed(gw, key, document)
    assert response.status == 202, await response.text()
    pending = await response.json()
    assert pending["status"] == "pending_approval" and pending["signature"] is None
    assert [(row["status"], row["signature"]) for row in await typed_rows(gw, key)] == [("pending_approval", None)]
    supervisor1 = gw.auth(Role.SUPERVISOR)
    approval = await (await gw.client.get(f"/v1/approvals/{pending['approval_id']}", headers=supervisor1)).json()
    assert approval["kind"] == "evm_typed_data" and approval["payload"]["digest"] == pending["digest"]
    assert approval["payload"]["intent"]["amount"] == str(900_000 * USD)
    assert approval["payload"]["typed_data"] == document  # the supervisor sees exactly what is signed
    # The requesting client cannot decide it.
    response = await gw.client.post(f"/v1/approvals/{pending['approval_id']}/approve",
                                    json={"payload_hash": approval["payload_hash"]}, headers=gw.auth(Role.BACKEND))
    assert response.status == 403
    decided = await approve(gw, pending["approval_id"], await login(gw, "supervisor2"))
    assert decided["status"] == "executed"
    result = decided["result"]
    assert result["status"] == "signed" and result["digest"] == pending["digest"] and recovers(document, result, key)


async def test_permits_count_against_the_daily_cap(gw: Gateway) -> None:
    """EIP-2612 permit past the daily cap: signed permits count like transactions, so a second Permit
    (or an ERC-20 transfer) whose sum exceeds the 1,500,000 USDC daily cap is refused."""
    key = await new_evm_key(gw, f"controls-daily-{secrets.token_hex(3)}")
    pending = await (await sign_typed(gw, key, permit(key["address"], 900_000 * USD))).json()
    # While it waits nothing counts: a small permit goes through.
    assert (await sign_typed(gw, key, permit(key["address"], 90_000 * USD))).status == 200
    await approve(gw, pending["approval_id"], await login(gw, "supervisor2"))  # 990,000 signed today
    problem = await assert_problem(await sign_typed(gw, key, permit(key["address"], 600_000 * USD)), 422,
                                   "evm-cap-exceeded")
    assert problem["reasons"] == ["daily-cap-exceeded"]
    transfer = {"key_id": key["key_id"], "chain_id": CHAIN_ID, "type": "eip1559", "gas_limit": 65_000,
                "max_fee_per_gas": str(20 * GWEI), "max_priority_fee_per_gas": str(GWEI),
                "erc20": {"token": USDC, "method": "transfer", "to": RECIPIENT, "amount": str(600_000 * USD)}}
    response = await gw.client.post("/v1/evm/transactions", json=transfer,
                                    headers={**gw.auth(Role.BACKEND), "Idempotency-Key": uuid.uuid4().hex})
    assert (await assert_problem(response, 422, "evm-cap-exceeded"))["reasons"] == ["daily-cap-exceeded"]
    # What is left of the day is still usable.
    assert (await sign_typed(gw, key, permit(key["address"], 10_000 * USD))).status == 200


async def test_permit_lookalikes_are_refused(gw: Gateway) -> None:
    """EIP-712 type confusion: a document named Permit whose struct renames or reorders fields (so it
    hashes to a type the token never verifies, and its 'value' is not the amount), or a Permit on an
    allowed domain that is not a registered token, is refused and never read as a permit."""
    key = await new_evm_key(gw, f"controls-lookalike-{secrets.token_hex(3)}")
    reordered = [PERMIT_TYPE[1], PERMIT_TYPE[0], *PERMIT_TYPE[2:]]
    renamed = [*PERMIT_TYPE[:2], {"name": "amount", "type": "uint256"}, *PERMIT_TYPE[3:]]
    retyped = [*PERMIT_TYPE[:2], {"name": "value", "type": "uint128"}, *PERMIT_TYPE[3:]]
    message = {"owner": key["address"], "spender": SPENDER, "nonce": 0, "deadline": 1_900_000_000}
    for fields, body in ((reordered, {**message, "value": str(2**200)}), (renamed, {**message, "amount": str(2**200)}),
                         (retyped, {**message, "value": "1"})):
        problem = await assert_problem(await sign_typed(gw, key, permit(key["address"], 0, fields=fields,
                                                                         message=body)),
                                       422, "typed-data-not-allowed")
        assert problem["reasons"] == ["typed-data-nonstandard-struct"]
    problem = await assert_problem(await sign_typed(gw, key, permit(key["address"], 1, contract=EXCHANGE)), 422,
                                   "typed-data-not-allowed")
    assert problem["reasons"] == ["typed-data-contract-not-a-token"]
    assert await typed_rows(gw, key) == []


async def test_unlisted_types_are_refused_and_listed_ones_need_approval(gw: Gateway) -> None:
    """Blind EIP-712 signing: a primaryType the gateway cannot decode is refused unless the chain's config
    lists it for the domain, and a listed one is signed only after a supervisor approves it."""
    key = await new_evm_key(gw, f"controls-listed-{secrets.token_hex(3)}")
    unlisted = checked({**order(key["address"]), "primaryType": "Order", "types": {
        "EIP712Domain": DOMAIN_TYPE, "Order": [{"name": "maker", "type": "address"},
                                               {"name": "sellAmount", "type": "uint256"}]},
        "domain": usdc_domain()})  # the same type on the token's domain, where it is not listed
    problem = await assert_problem(await sign_typed(gw, key, unlisted), 422, "typed-data-not-allowed")
    assert problem["reasons"] == ["typed-data-type-not-listed"]
    document = order(key["address"])
    response = await sign_typed(gw, key, document)
    assert response.status == 202, await response.text()
    pending = await response.json()
    assert pending["status"] == "pending_approval" and pending["intent"] is None and pending["signature"] is None
    decided = await approve(gw, pending["approval_id"], gw.auth(Role.SUPERVISOR))
    assert decided["result"]["status"] == "signed" and recovers(document, decided["result"], key)


async def test_a_deep_type_graph_is_a_problem_not_a_crash(gw: Gateway) -> None:
    """Type-graph exhaustion: 3,000 EIP-712 types, each an array of the next, with message {"x": []},
    get a 400 problem (typed-data-too-complex), never a RecursionError or a 500."""
    key = await new_evm_key(gw, f"controls-deep-{secrets.token_hex(3)}")
    types: dict[str, Any] = {f"T{i}": [{"name": "x", "type": f"T{i + 1}[]"}] for i in range(2_999)}
    types["T2999"] = [{"name": "x", "type": "uint256"}]
    document = {"types": {"EIP712Domain": DOMAIN_TYPE, **types}, "primaryType": "T0", "domain": usdc_domain(),
                "message": {"x": []}}
    await assert_problem(await sign_typed(gw, key, document), 400, "typed-data-too-complex")
    # A graph 17 levels deep (one past the bound) is refused the same way, with few types.
    deep: dict[str, Any] = {f"T{i}": [{"name": "x", "type": f"T{i + 1}[]"}] for i in range(17)}
    deep["T17"] = [{"name": "x", "type": "uint256"}]
    await assert_problem(await sign_typed(gw, key, {**document, "types": {"EIP712Domain": DOMAIN_TYPE, **deep}}),
                         400, "typed-data-too-complex")


# --- fees --------------------------------------------------------------------------------------------


def transaction(key: dict[str, Any], *, gas_limit: int = 21_000, max_fee: int = 20 * GWEI, value: int = 1,
                token_amount: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"key_id": key["key_id"], "chain_id": CHAIN_ID, "type": "eip1559", "gas_limit": gas_limit,
                            "max_fee_per_gas": str(max_fee), "max_priority_fee_per_gas": str(GWEI)}
    if token_amount is None:
        return {**body, "to": RECIPIENT, "value": str(value)}
    return {**body, "erc20": {"token": USDC, "method": "transfer", "to": RECIPIENT, "amount": str(token_amount)}}


async def sign_transaction(gw: Gateway, body: dict[str, Any]) -> Any:
    return await gw.client.post("/v1/evm/transactions", json=body,
                                headers={**gw.auth(Role.BACKEND), "Idempotency-Key": uuid.uuid4().hex})


async def test_fees_are_capped(gw: Gateway) -> None:
    """Unlimited gas fees: a 1-wei transfer at 1,000,000 gwei × 21,000 gas (21 ETH of fees) is refused by the
    chain's fee caps; so are a gas limit or a legacy gas price above them. A normal fee is signed."""
    key = await new_evm_key(gw, f"controls-fee-{secrets.token_hex(3)}")
    problem = await assert_problem(await sign_transaction(gw, transaction(key, max_fee=1_000_000 * GWEI)), 422,
                                   "evm-fee-cap-exceeded")
    assert {"fee-per-gas-above-cap", "total-fee-above-cap"} <= set(problem["reasons"])
    problem = await assert_problem(await sign_transaction(gw, transaction(key, gas_limit=5_000_000, max_fee=GWEI)),
                                   422, "evm-fee-cap-exceeded")
    assert problem["reasons"] == ["gas-limit-above-cap"]
    legacy = {k: v for k, v in transaction(key).items() if not k.startswith("max_")}
    await assert_problem(await sign_transaction(gw, {**legacy, "type": "legacy", "gas_price": str(10**15)}), 422,
                         "evm-fee-cap-exceeded")
    response = await sign_transaction(gw, transaction(key))
    assert response.status == 200, await response.text()
    document = await response.json()
    assert document["nonce"] == 0  # the refusals consumed no nonce
    assert Account.recover_transaction(document["raw_transaction"]) == key["address"]


async def test_fees_count_against_the_native_daily_cap(gw: Gateway) -> None:
    """Fees outside the native caps: the most a transaction can pay for gas counts against the native
    coin's daily cap, also when it moves a token — so fees cannot drain the address past the cap."""
    key = await new_evm_key(gw, f"controls-fee-daily-{secrets.token_hex(3)}")
    fee = 21_000 * 20 * GWEI  # 0.00042 ETH
    first = transaction(key, value=NATIVE_DAILY_CAP - fee - 10**14)  # value + fee: 10**14 below the cap
    response = await sign_transaction(gw, first)
    assert response.status == 200, await response.text()
    # A token transfer moves no ETH, but its fee (65,000 gas × 20 gwei) would pass the native daily cap.
    problem = await assert_problem(await sign_transaction(gw, transaction(key, gas_limit=65_000, token_amount=USD)),
                                   422, "evm-cap-exceeded")
    assert problem["reasons"] == ["native-daily-cap-exceeded"]
    # A zero-value transfer is the same: its fee alone passes the cap.
    problem = await assert_problem(await sign_transaction(gw, transaction(key, gas_limit=21_000, max_fee=5 * GWEI,
                                                                          value=0)), 422, "evm-cap-exceeded")
    assert problem["reasons"] == ["daily-cap-exceeded"]
    # A fee that fits what is left (10**14 wei) is signed.
    response = await sign_transaction(gw, transaction(key, gas_limit=21_000, max_fee=4 * GWEI, value=0))
    assert response.status == 200, await response.text()
    assert Account.recover_transaction((await response.json())["raw_transaction"]) == key["address"]
