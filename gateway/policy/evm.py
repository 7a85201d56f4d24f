"""EVM signing policy as pure functions: the chain registry and decoded intents in, a Decision out.

Rules are applied to what a transaction *does* — decoded from its fields and calldata — never to
a blind hash: a transaction whose calldata cannot be read (an unregistered contract, an unknown
method) is refused outright. The store reads the day's figures inside its transaction and writes
only what the decision allows, under the address's lock.

Caps and the approval threshold count base units of one asset: the chain's native coin (``value``
in wei) or one registered token. The daily cap sums every signed amount of the asset per signing
address and UTC day, whatever the method (transfer, approve, mint, burn): an approval is a promise
to move that much, and mint/burn are the issuer's own volume limits.

Fees are money too. Each chain caps the gas limit, the fee per gas and their product (the most a
transaction can burn), and that product counts against the native coin's per-transaction and daily
caps — added to the value of a native transfer, on its own beside a token transfer or a zero-value call.

EIP-712 documents are read the same way (:func:`read_typed_data`): an EIP-2612 ``Permit`` is an
``approve`` and an EIP-3009 ``TransferWithAuthorization``/``ReceiveWithAuthorization`` a ``transfer`` of
the token at the domain's ``verifyingContract``, meeting the same caps, lists and threshold as a
transaction; a type the gateway cannot decode is signed only where the config lists it, after approval.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

from gateway.errors import (
    EvmCapExceeded,
    EvmFeeCapExceeded,
    InvalidEvmTransaction,
    PolicyRefused,
    RecipientNotAllowed,
    TypedDataDomainNotAllowed,
    TypedDataNotAllowed,
    UnknownChain,
    UnknownContract,
    UnknownToken,
)
from gateway.policy.chains import EvmChainSettings, EvmSettings
from gateway.policy.limits import Decision
from gateway.schemes.evm.eip712 import TypedData
from gateway.schemes.evm.erc20 import Erc20Call, decode_erc20_calldata
from gateway.schemes.evm.transactions import Fees
from gateway.schemes.evm.values import UINT256_MAX, checksum, parse_address

NATIVE = "native"


@dataclass(frozen=True)
class Intent:
    """What one transaction does to one asset, decoded.

    Attributes:
        asset: ``native`` or the token's EIP-55 address.
        method: ``transfer`` for a plain value transfer; the ERC-20 method otherwise.
        recipient: EIP-55 recipient (transfer, mint) or spender (approve); None for burn.
        amount: base units (wei for native).
    """

    chain_id: int
    asset: str
    symbol: str
    decimals: int
    method: Literal["transfer", "approve", "mint", "burn"]
    recipient: str | None
    amount: int

    def document(self) -> dict[str, Any]:
        """JSON form shown to supervisors and stored with the transaction (amount as a decimal string)."""
        return {"chain_id": self.chain_id, "asset": self.asset, "symbol": self.symbol, "decimals": self.decimals,
                "method": self.method, "recipient": self.recipient, "amount": str(self.amount)}


def require_chain(evm: EvmSettings, chain_id: int) -> EvmChainSettings:
    """The registered chain. Raises UnknownChain."""
    chain = evm.chain(chain_id)
    if chain is None:
        known = ", ".join(str(c.chain_id) for c in evm.chains)
        raise UnknownChain(f"chain {chain_id} is not in the registry (known: {known})", ["unknown-chain"])
    return chain


def erc20_intent(chain: EvmChainSettings, token_address: bytes, call: Erc20Call) -> Intent:
    """The intent of an ERC-20 call to ``token_address``. Raises UnknownToken."""
    token = chain.token(checksum(token_address))
    if token is None:
        raise UnknownToken(f"token {checksum(token_address)} is not registered on chain {chain.chain_id}",
                           ["unknown-token"])
    recipient = checksum(call.to) if call.to is not None else None
    return Intent(chain.chain_id, token.address, token.symbol, token.decimals, call.method, recipient, call.amount)


def decode_intent(chain: EvmChainSettings, to: bytes, value: int, data: bytes) -> Intent:
    """What a raw {to, value, data} transaction does.

    Empty data is a native value transfer. Non-empty data must be an ERC-20 call (transfer, approve,
    mint, burn) to a registered token, carrying no value.

    Raises:
        UnknownContract: calldata to an unregistered contract, or a method this gateway cannot decode.
        InvalidEvmTransaction: value sent with an ERC-20 call, or malformed calldata.
    """
    if not data:
        return Intent(chain.chain_id, NATIVE, chain.native.symbol, chain.native.decimals, "transfer", checksum(to),
                      value)
    if chain.token(checksum(to)) is None:
        raise UnknownContract(f"calldata to {checksum(to)}, which is not a registered contract on chain "
                              f"{chain.chain_id}", ["unknown-contract"])
    call = decode_erc20_calldata(data)
    if call is None:
        raise UnknownContract(f"calldata selector 0x{data[:4].hex()} is not transfer, approve, mint or burn",
                              ["unknown-method"])
    if value:
        raise InvalidEvmTransaction("ERC-20 calls carry no value (the methods are not payable)")
    return erc20_intent(chain, to, call)


def _caps(chain: EvmChainSettings, asset: str) -> tuple[int | None, int | None, int | None]:
    """(per-transaction cap, daily cap, approval threshold) of an asset."""
    if asset == NATIVE:
        return chain.native.per_tx_cap, chain.native.daily_cap, chain.approval_threshold
    token = chain.token(asset)
    assert token is not None, "intents are built from registered tokens only"
    return token.per_tx_cap, token.daily_cap, token.approval_threshold


def check_recipient(chain: EvmChainSettings, recipient: str | None) -> Decision:
    """Deny list first, then the allow list (when it is not empty)."""
    if recipient is None:
        return Decision(True)
    if recipient in chain.recipient_denylist:
        return Decision(False, ("recipient-denied",))
    if chain.recipient_allowlist and recipient not in chain.recipient_allowlist:
        return Decision(False, ("recipient-not-allowlisted",))
    return Decision(True)


def check_fee_caps(chain: EvmChainSettings, fees: Fees) -> Decision:
    """Are the gas fields within the chain's fee caps (gas limit, fee per gas, their product)?"""
    caps = chain.fees
    reasons = []
    if fees.gas_limit > caps.max_gas_limit:
        reasons.append("gas-limit-above-cap")
    if fees.gas_price_cap > caps.max_fee_per_gas:
        reasons.append("fee-per-gas-above-cap")
    if fees.max_total > caps.max_total_fee:
        reasons.append("total-fee-above-cap")
    return Decision(not reasons, tuple(reasons))


def spending(intent: Intent, fee: int = 0) -> dict[str, int]:
    """What signing spends per asset: the intent's amount, plus ``fee`` (the most the transaction can pay
    for gas, in wei) in the native coin — also when the value moved is a token, or nothing."""
    amounts = {intent.asset: intent.amount}
    if fee:
        amounts[NATIVE] = amounts.get(NATIVE, 0) + fee
    return amounts


def evaluate(chain: EvmChainSettings, intent: Intent, spent_today: Mapping[str, int], fee: int = 0) -> Decision:
    """May ``intent`` be signed, paying at most ``fee`` wei for gas, with ``spent_today`` (per asset)
    already signed by its address today?

    The intent's asset meets its caps (reasons ``per-tx-cap-exceeded``, ``daily-cap-exceeded``); the fee
    meets the native coin's, added to the value when the intent is native itself (reasons
    ``native-per-tx-cap-exceeded``, ``native-daily-cap-exceeded`` when the intent is a token). An
    approval of 2**256 - 1 (``unlimited-approval``) is beyond any cap.
    """
    reasons = list(check_recipient(chain, intent.recipient).reasons)
    if intent.method == "approve" and intent.amount == UINT256_MAX:
        reasons.append("unlimited-approval")
    for asset, amount in spending(intent, fee).items():
        prefix = "" if asset == intent.asset else "native-"
        per_tx, daily, _ = _caps(chain, asset)
        if per_tx is not None and amount > per_tx:
            reasons.append(prefix + "per-tx-cap-exceeded")
        if daily is not None and spent_today.get(asset, 0) + amount > daily:
            reasons.append(prefix + "daily-cap-exceeded")
    return Decision(not reasons, tuple(reasons))


def needs_approval(chain: EvmChainSettings, intent: Intent) -> bool:
    """Above the asset's approval threshold a supervisor must approve the exact transaction (the amount
    moved; the fee is bounded by the fee caps instead)."""
    _, _, threshold = _caps(chain, intent.asset)
    return threshold is not None and intent.amount > threshold


def refuse(decisions: Iterable[Decision], detail: str) -> None:
    """Raise the most specific refusal for the failed decisions (carrying every reason); return if none failed."""
    reasons = [reason for decision in decisions for reason in decision.reasons]
    if not reasons:
        return
    _raise(reasons, detail)


def _raise(reasons: list[str], detail: str) -> NoReturn:
    if any(r.endswith("-above-cap") for r in reasons):
        raise EvmFeeCapExceeded(detail, reasons)
    if any(r.endswith("-cap-exceeded") or r == "unlimited-approval" for r in reasons):
        raise EvmCapExceeded(detail, reasons)
    if any(r.startswith("recipient-") for r in reasons):
        raise RecipientNotAllowed(detail, reasons)
    if any(r.startswith("domain-") for r in reasons):
        raise TypedDataDomainNotAllowed(detail, reasons)
    if any(r.startswith("typed-data-") for r in reasons):
        raise TypedDataNotAllowed(detail, reasons)
    raise PolicyRefused(detail, reasons)


# --- EIP-712 ---------------------------------------------------------------------------------

_AUTHORIZATION = (("from", "address"), ("to", "address"), ("value", "uint256"), ("validAfter", "uint256"),
                  ("validBefore", "uint256"), ("nonce", "bytes32"))
STANDARD_AUTHORISATIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "Permit": (("owner", "address"), ("spender", "address"), ("value", "uint256"), ("nonce", "uint256"),
               ("deadline", "uint256")),
    "TransferWithAuthorization": _AUTHORIZATION,
    "ReceiveWithAuthorization": _AUTHORIZATION,
}
"""The struct each decoded ``primaryType`` must have, field for field (EIP-2612, EIP-3009): a document
that renames, reorders, adds or retypes a field hashes to another type and is not what the token's
contract verifies — it is refused, never read as the standard one."""


@dataclass(frozen=True)
class TypedDataReading:
    """What an EIP-712 document the policy may consider asks for.

    Attributes:
        intent: the decoded standard authorisation (Permit → approve, EIP-3009 → transfer), which meets
            the token's caps, daily cap, recipient lists and approval threshold like a transaction.
        listed: a ``primaryType`` the chain's config lists for the domain; signed only after approval.
    """

    primary_type: str
    verifying_contract: str
    intent: Intent | None
    listed: bool = False


def read_typed_data(chain: EvmChainSettings, typed: TypedData, signer: str) -> TypedDataReading:
    """Read ``typed`` for ``signer`` on ``chain``, or refuse it.

    The domain must carry ``chainId`` = the chain and a ``verifyingContract`` on the chain's allow list
    (with its name/version when the entry fixes them). Then, by ``primaryType``:

    - ``Permit`` (EIP-2612): an ``approve`` of the token at ``verifyingContract`` — owner = the signer,
      spender = the recipient, value = the amount;
    - ``TransferWithAuthorization`` / ``ReceiveWithAuthorization`` (EIP-3009): a ``transfer`` — from =
      the signer, to = the recipient, value = the amount;

      each only with the exact standard struct and a ``verifyingContract`` that is a registered token;
    - a type listed in the domain entry's ``primary_types``: read as is, always for approval;
    - anything else is refused.

    Raises:
        TypedDataDomainNotAllowed, TypedDataNotAllowed, PolicyRefused (owner/from is not the signer),
        InvalidAddress.
    """
    domain = typed.domain
    reasons: list[str] = []
    if domain.get("chainId") is None or _as_int(domain.get("chainId")) != chain.chain_id:
        reasons.append("domain-chain-mismatch")
    contract = domain.get("verifyingContract")
    address = checksum(parse_address(contract, "domain.verifyingContract")) if isinstance(contract, str) else None
    entries = [entry for entry in chain.typed_data_domains if address is not None
               and _domain_matches(entry.verifying_contract, entry.name, entry.version, address, domain)]
    if not entries:
        reasons.append("domain-not-allowlisted")
    detail = f"EIP-712 {typed.primary_type[:64]} on chain {chain.chain_id} refused"
    refuse([Decision(not reasons, tuple(reasons))], detail)
    assert address is not None
    primary = typed.primary_type
    standard = STANDARD_AUTHORISATIONS.get(primary)
    if standard is None:
        if any(primary in entry.primary_types for entry in entries):
            return TypedDataReading(primary, address, None, listed=True)
        refuse([Decision(False, ("typed-data-type-not-listed",))],
               f"{detail}: {primary[:64]} is neither a standard authorisation the gateway decodes nor listed "
               "for this domain")
    assert standard is not None
    if typed.types.get(primary) != standard:
        refuse([Decision(False, ("typed-data-nonstandard-struct",))],
               f"{detail}: its struct is not the standard {primary}"
               f"({','.join(f'{kind} {name}' for name, kind in standard)})")
    if chain.token(address) is None:
        refuse([Decision(False, ("typed-data-contract-not-a-token",))],
               f"{detail}: verifyingContract {address} is not a registered token, so its caps are unknown")
    message = typed.message
    holder, counterparty = ("owner", "spender") if primary == "Permit" else ("from", "to")
    if checksum(parse_address(message[holder], f"message.{holder}")) != signer:
        refuse([Decision(False, (f"{primary.lower()}-{holder}-not-signer",))],
               f"{detail}: message.{holder} is not the signing key's address {signer}")
    method: Literal["approve", "transfer"] = "approve" if primary == "Permit" else "transfer"
    call = Erc20Call(method, parse_address(message[counterparty], f"message.{counterparty}"),
                     _as_int(message["value"]))
    return TypedDataReading(primary, address, erc20_intent(chain, parse_address(address), call))


def _domain_matches(contract: str, name: str | None, version: str | None, address: str,
                    domain: Mapping[str, Any]) -> bool:
    return (contract == address and (name is None or domain.get("name") == name)
            and (version is None or domain.get("version") == version))


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        return -1
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("0x") and len(text) > 2 and all(c in "0123456789abcdefABCDEF" for c in text[2:]):
            return int(text, 16)
        if text.isascii() and text.isdigit():
            return int(text)
    return -1
