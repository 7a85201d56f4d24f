"""The EVM chain registry (``[[evm.chains]]``): the chains, native coins, tokens, caps, recipient lists,
fee caps and EIP-712 domains the EVM policy (:mod:`gateway.policy.evm`) reads.

These are the settings' own types — ``gateway.config`` puts :class:`EvmSettings` in its ``[evm]``
section — kept here, beside the policy, so that the policy needs nothing of the configuration loader.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from gateway.errors import InvalidAddress
from gateway.schemes.evm.values import checksum, parse_address


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


def _base_units(value: Any) -> Any:
    """EVM amounts in config: an integer, or a decimal string of base units (TOML integers stop at 2**63)."""
    if isinstance(value, bool | float):
        raise ValueError("an integer or a decimal string of base units, never a float")
    if isinstance(value, str):
        if not value.isascii() or not value.isdigit():
            raise ValueError("a decimal string of base units (digits only)")
        return int(value)
    return value


def _evm_address(value: Any) -> str:
    """An address in EIP-55 form; a mixed-case address with a wrong checksum is refused."""
    try:
        return checksum(parse_address(value))
    except InvalidAddress as exc:
        raise ValueError(exc.detail) from None


BaseUnits = Annotated[int, BeforeValidator(_base_units), Field(ge=0, le=2**256 - 1)]
EvmAddress = Annotated[str, BeforeValidator(_evm_address)]


class EvmTokenSettings(_Section):
    address: EvmAddress
    """Token contract address (a mixed-case address must pass its EIP-55 checksum)."""
    symbol: Annotated[str, Field(min_length=1, max_length=16)]
    """Ticker shown to supervisors and in ``GET /v1/evm/chains``."""
    decimals: Annotated[int, Field(ge=0, le=36)]
    """Decimals of the token; amounts in requests and here are always in base units."""
    per_tx_cap: BaseUnits | None = None
    """Largest amount one transaction may name (transfer, approve, mint, burn), in base units; none = no cap."""
    daily_cap: BaseUnits | None = None
    """Largest sum of amounts per signing address and UTC day, in base units; none = no cap."""
    approval_threshold: BaseUnits | None = None
    """Amounts above this wait for a supervisor's approval (maker-checker); none = never."""
    example: bool = False
    """Shipped as an example: check the address and caps before relying on it."""


class EvmNativeSettings(_Section):
    symbol: str = "ETH"
    """Ticker of the chain's native coin."""
    decimals: Annotated[int, Field(ge=0, le=36)] = 18
    """Decimals of the native coin (18 on every EVM chain shipped)."""
    per_tx_cap: BaseUnits | None = None
    """Largest ``value`` (wei) of one transaction; none = no cap."""
    daily_cap: BaseUnits | None = None
    """Largest sum of ``value`` (wei) per signing address and UTC day; none = no cap."""


class TypedDataDomainSettings(_Section):
    verifying_contract: EvmAddress
    """EIP-712 ``verifyingContract`` that may be signed for (with the chain's id as ``chainId``)."""
    name: str | None = None
    """When set, the domain's ``name`` must equal it."""
    version: str | None = None
    """When set, the domain's ``version`` must equal it."""
    primary_types: list[Annotated[str, Field(pattern=r"^[A-Za-z_$][A-Za-z0-9_$]*$", max_length=64)]] = []
    """EIP-712 ``primaryType`` names other than the standard authorisations that may be signed for this
    domain — each request always through a supervisor's approval, since the gateway cannot read what
    they do. ``Permit``, ``TransferWithAuthorization`` and ``ReceiveWithAuthorization`` are never listed:
    they are decoded and meet the token's caps. Empty (the default): nothing else is signed."""

    @field_validator("primary_types")
    @classmethod
    def _not_decoded(cls, names: list[str]) -> list[str]:
        decoded = sorted({"Permit", "TransferWithAuthorization", "ReceiveWithAuthorization", "EIP712Domain"}
                         & set(names))
        if decoded:
            raise ValueError(f"{', '.join(decoded)} cannot be listed: standard authorisations are decoded "
                             "and checked against the token's caps")
        return names


class EvmFeeSettings(_Section):
    """Caps on what one transaction may pay for gas, in wei. A request above any of them is refused
    (``evm-fee-cap-exceeded``); the fee also counts against the native coin's caps."""

    max_fee_per_gas: BaseUnits = 500 * 10**9
    """Largest ``max_fee_per_gas`` (EIP-1559) or ``gas_price`` (legacy), in wei: 500 gwei by default,
    above Ethereum's worst spikes of recent years."""
    max_gas_limit: Annotated[int, Field(ge=21_000, le=100_000_000)] = 1_000_000
    """Largest ``gas_limit``: an ERC-20 call needs under 100,000, a value transfer 21,000."""
    max_total_fee: BaseUnits = 10**17
    """Largest gas limit × fee per gas (the most the transaction can burn), in wei: 0.1 of the native
    coin by default."""


class EvmChainSettings(_Section):
    chain_id: Annotated[int, Field(ge=1, le=2**53)]
    """EIP-155 chain id; requests name the chain by it."""
    name: Annotated[str, Field(min_length=1, max_length=64)]
    """Human name of the chain."""
    native: EvmNativeSettings = EvmNativeSettings()
    """The native coin and its caps."""
    approval_threshold: BaseUnits | None = None
    """Native ``value`` (wei) above which a transaction waits for a supervisor's approval; none = never."""
    tokens: list[EvmTokenSettings] = []
    """ERC-20 tokens the gateway may sign for; calldata to any other contract is refused."""
    recipient_allowlist: list[EvmAddress] = []
    """When not empty, recipients and spenders must be on it."""
    recipient_denylist: list[EvmAddress] = []
    """Recipients and spenders that are always refused."""
    typed_data_domains: list[TypedDataDomainSettings] = []
    """EIP-712 domains that ``POST /v1/evm/typed-data`` may sign for on this chain."""
    fees: EvmFeeSettings = EvmFeeSettings()
    """Gas caps of one transaction on this chain (defaults: 500 gwei per gas, 1,000,000 gas, 0.1 coin)."""
    example: bool = False
    """Shipped as an example entry."""

    def token(self, address: str) -> EvmTokenSettings | None:
        """The registered token at ``address`` (EIP-55 form), or None."""
        return next((token for token in self.tokens if token.address == address), None)


def _default_chains() -> list[EvmChainSettings]:
    mainnet_native = EvmNativeSettings(symbol="ETH", per_tx_cap=100 * 10**18, daily_cap=1_000 * 10**18)

    def usd6(address: str, symbol: str) -> EvmTokenSettings:  # a dollar stablecoin with 6 decimals, as an example
        return EvmTokenSettings(address=address, symbol=symbol, decimals=6, per_tx_cap=1_000_000 * 10**6,
                                daily_cap=10_000_000 * 10**6, approval_threshold=100_000 * 10**6, example=True)

    return [
        EvmChainSettings(
            chain_id=1, name="Ethereum", native=mainnet_native, approval_threshold=10 * 10**18,
            tokens=[usd6("0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48", "USDC"),
                    usd6("0xdAC17F958D2ee523a2206206994597C13D831ec7", "USDT")],
            # USDC implements EIP-2612 permit; USDT on Ethereum does not.
            typed_data_domains=[TypedDataDomainSettings(verifying_contract="0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48")]),
        EvmChainSettings(
            chain_id=11155111, name="Sepolia", native=EvmNativeSettings(symbol="ETH"), approval_threshold=10**20,
            tokens=[usd6("0x1c7D4B196Cb0C7B01d743Fbc6116a902379C7238", "USDC")],
            typed_data_domains=[TypedDataDomainSettings(verifying_contract="0x1c7D4B196Cb0C7B01d743Fbc6116a902379C7238")]),
        EvmChainSettings(
            chain_id=1030, name="Conflux eSpace",
            native=EvmNativeSettings(symbol="CFX", per_tx_cap=1_000_000 * 10**18, daily_cap=10_000_000 * 10**18),
            approval_threshold=100_000 * 10**18,
            tokens=[usd6("0xfe97E85d13ABD9c1c33384E796F10B73905637cE", "USDT")]),
        EvmChainSettings(chain_id=71, name="Conflux eSpace Testnet", native=EvmNativeSettings(symbol="CFX")),
    ]


class EvmSettings(_Section):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True,
                              validate_assignment=True)

    chains: list[EvmChainSettings] = Field(default_factory=_default_chains)
    """The chain registry (``[[evm.chains]]``): a request for a chain not listed is refused. Shipped:
    Ethereum (1), Sepolia (11155111), Conflux eSpace (1030) and its testnet (71); their tokens are examples."""

    @field_validator("chains")
    @classmethod
    def _unique_chains(cls, chains: list[EvmChainSettings]) -> list[EvmChainSettings]:
        ids = [chain.chain_id for chain in chains]
        if len(ids) != len(set(ids)):
            raise ValueError("each chain_id may appear once")
        return chains

    def chain(self, chain_id: int) -> EvmChainSettings | None:
        """The registered chain with ``chain_id``, or None."""
        return next((chain for chain in self.chains if chain.chain_id == chain_id), None)
