"""Bodies of the EVM endpoints. Strict: wei and token amounts are decimal strings (a JSON number, a
float or a negative is a 400), gas_limit and nonce are integers."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, StringConstraints

from gateway.schemes.evm.transactions import MAX_NONCE

KeyId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
ChainId = Annotated[int, Field(ge=1, le=2**53, description="EIP-155 chain id of a chain in the registry")]
BaseUnits = Annotated[str, StringConstraints(max_length=100), Field(
    description="Decimal string of a non-negative integer in base units (wei for the native coin)",
    examples=["1000000"])]
AddressText = Annotated[str, StringConstraints(max_length=64), Field(
    description="0x-prefixed hex address; mixed case must pass its EIP-55 checksum")]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Erc20Intent(_Body):
    token: AddressText = Field(description="A token registered for the chain")
    method: Literal["transfer", "approve", "mint", "burn"] = Field(
        description="transfer(address,uint256), approve(address,uint256), mint(address,uint256), burn(uint256)")
    to: AddressText | None = Field(default=None, description="Recipient (transfer, mint) or spender (approve); "
                                                             "absent for burn")
    amount: BaseUnits


class EvmTransactionRequest(_Body):
    key_id: KeyId = Field(description="A secp256k1 key with usage `evm`")
    chain_id: ChainId
    type: Literal["eip1559", "legacy"] = Field(description="EIP-1559 (type 2) or legacy EIP-155")
    nonce: Annotated[int, Field(ge=0, le=MAX_NONCE)] | None = Field(
        default=None, description="Omit to let the gateway allocate the next nonce (recommended)")
    gas_limit: int | None = Field(default=None, description="Required; 21,000 to 100,000,000")
    max_fee_per_gas: BaseUnits | None = Field(default=None, description="eip1559 only (wei)")
    max_priority_fee_per_gas: BaseUnits | None = Field(default=None, description="eip1559 only (wei)")
    gas_price: BaseUnits | None = Field(default=None, description="legacy only (wei)")
    to: AddressText | None = Field(default=None, description="Raw transaction: recipient or registered contract")
    value: BaseUnits | None = Field(default=None, description="Raw transaction: wei (default 0)")
    data: Annotated[str, StringConstraints(max_length=262_146)] | None = Field(
        default=None, description="Raw transaction: 0x-hex calldata, only to a registered token and only a "
                                  "method the gateway decodes")
    erc20: Erc20Intent | None = Field(default=None, description="Instead of to/value/data: an ERC-20 call")


class EvmTransactionDocument(_Body):
    status: Literal["signed", "pending_approval", "unsigned", "rejected", "expired", "failed", "superseded"]
    transaction_id: str
    chain_id: int
    type: str
    from_: str = Field(alias="from", description="EIP-55 address of the signing key")
    nonce: int
    signing_hash: str = Field(description="0x-hex keccak-256 the HSM signs (the approval is bound to it)")
    transaction: dict[str, Any] = Field(description="Every signed field; quantities as decimal strings")
    intent: dict[str, Any] = Field(description="What the transaction does, decoded: asset, method, recipient, amount")
    approval_id: str | None = None
    raw_transaction: str | None = Field(default=None, description="0x-hex signed transaction, ready to broadcast")
    tx_hash: str | None = Field(default=None, description="0x-hex keccak-256 of raw_transaction")


class TypedDataRequest(_Body):
    key_id: KeyId
    chain_id: ChainId
    typed_data: dict[str, Any] = Field(description="eth_signTypedData_v4 document: types, primaryType, domain, "
                                                   "message; the domain must be on the chain's allow list")


class TypedDataSignature(_Body):
    status: Literal["signed", "pending_approval", "unsigned", "rejected", "failed"] = Field(
        description="signed (200); pending_approval (202) until a supervisor decides")
    request_id: str
    chain_id: int
    primary_type: str
    verifying_contract: str
    signature: str | None = Field(description="0x-hex r‖s‖v (65 bytes, v = 27 or 28, low-S); null until signed")
    r: str | None
    s: str | None
    v: int | None
    digest: str = Field(description="0x-hex EIP-712 digest that is signed")
    domain_separator: str
    message_hash: str
    signer: str = Field(description="EIP-55 address of the key")
    intent: dict[str, Any] | None = Field(
        default=None, description="The decoded EIP-2612 permit (approve) or EIP-3009 authorisation (transfer); "
                                  "null for a type listed in the chain's config")
    approval_id: str | None = None


class NonceRequest(_Body):
    next_nonce: Annotated[int, Field(ge=0, le=MAX_NONCE)]


class NonceDocument(_Body):
    chain_id: int
    address: str
    next_nonce: int
    previous_next_nonce: int
    superseded: list[str] = Field(description="Transactions at or above next_nonce that will never be signed "
                                              "or are to be replaced")


class NativeDocument(_Body):
    symbol: str
    decimals: int
    per_tx_cap: str | None
    daily_cap: str | None


class TokenDocument(_Body):
    address: str
    symbol: str
    decimals: int
    per_tx_cap: str | None
    daily_cap: str | None
    approval_threshold: str | None
    example: bool


class DomainDocument(_Body):
    verifying_contract: str
    name: str | None
    version: str | None
    primary_types: list[str] = Field(description="Types signed for this domain, always after approval, "
                                                 "besides the decoded Permit and EIP-3009 authorisations")


class FeeCapsDocument(_Body):
    max_fee_per_gas: str = Field(description="wei")
    max_gas_limit: int
    max_total_fee: str = Field(description="wei: gas limit × fee per gas")


class ChainDocument(_Body):
    chain_id: int
    name: str
    native: NativeDocument
    approval_threshold: str | None = Field(description="Native value (wei) above which approval is needed")
    tokens: list[TokenDocument]
    recipient_allowlist: list[str]
    recipient_denylist: list[str]
    typed_data_domains: list[DomainDocument]
    fees: FeeCapsDocument
    example: bool


class ChainList(RootModel[list[ChainDocument]]):
    pass


class RpcResponseObject(BaseModel):
    """A JSON-RPC 2.0 response object: ``result``, or ``error`` {code, message, data: the problem}."""

    jsonrpc: Literal["2.0"]
    id: str | int | None
    result: Any = None
    error: dict[str, Any] | None = None


class RpcAnswer(RootModel[RpcResponseObject | list[RpcResponseObject]]):
    """The answer of ``POST /v1/evm/rpc``: one response object, or an array of them for a batch."""
