"""EVM signing policy as pure functions: the chain registry and decoded intents in, a Decision out.

Rules are applied to what a transaction *does* — decoded from its fields and calldata — never to
a blind hash: a transaction whose calldata cannot be read (an unregistered contract, an unknown
method) is refused outright. The store reads the day's figures inside its transaction and writes
only what the decision allows, under the address's lock.

Caps and the approval threshold count base units of one asset: the chain's native coin (``value``
in wei) or one registered token. The daily cap sums every signed amount of the asset per signing
address and UTC day, whatever the method (transfer, approve, mint, burn): an approval is a promise
to move that much, and mint/burn are the issuer's own volume limits.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

from gateway.config import EvmChainSettings, EvmSettings
from gateway.errors import (
    EvmCapExceeded,
    InvalidEvmTransaction,
    PolicyRefused,
    RecipientNotAllowed,
    TypedDataDomainNotAllowed,
    UnknownChain,
    UnknownContract,
    UnknownToken,
)
from gateway.policy.limits import Decision
from gateway.schemes.evm import Erc20Call, TypedData, checksum, decode_erc20_calldata, parse_address

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


def evaluate(chain: EvmChainSettings, intent: Intent, spent_today: int) -> Decision:
    """May ``intent`` be signed, with ``spent_today`` already signed for its asset and address today?"""
    reasons = list(check_recipient(chain, intent.recipient).reasons)
    per_tx, daily, _ = _caps(chain, intent.asset)
    if per_tx is not None and intent.amount > per_tx:
        reasons.append("per-tx-cap-exceeded")
    if daily is not None and spent_today + intent.amount > daily:
        reasons.append("daily-cap-exceeded")
    return Decision(not reasons, tuple(reasons))


def needs_approval(chain: EvmChainSettings, intent: Intent) -> bool:
    """Above the asset's approval threshold a supervisor must approve the exact transaction."""
    _, _, threshold = _caps(chain, intent.asset)
    return threshold is not None and intent.amount > threshold


def refuse(decisions: Iterable[Decision], detail: str) -> None:
    """Raise the most specific refusal for the failed decisions (carrying every reason); return if none failed."""
    reasons = [reason for decision in decisions for reason in decision.reasons]
    if not reasons:
        return
    _raise(reasons, detail)


def _raise(reasons: list[str], detail: str) -> NoReturn:
    if any(r.endswith("-cap-exceeded") for r in reasons):
        raise EvmCapExceeded(detail, reasons)
    if any(r.startswith("recipient-") for r in reasons):
        raise RecipientNotAllowed(detail, reasons)
    if any(r.startswith("domain-") for r in reasons):
        raise TypedDataDomainNotAllowed(detail, reasons)
    raise PolicyRefused(detail, reasons)


# --- EIP-712 ---------------------------------------------------------------------------------


def check_typed_data(chain: EvmChainSettings, typed: TypedData, signer: str) -> tuple[Decision, Intent | None]:
    """May ``signer`` sign ``typed`` on ``chain``?

    The domain must carry ``chainId`` = the chain and a ``verifyingContract`` on the chain's
    allow list (with its name/version when the entry fixes them). An EIP-2612 ``Permit`` for a
    registered token is also read as an ``approve`` intent: owner = the signer, spender checked
    against the recipient lists, value against the token's per-transaction cap.
    """
    domain = typed.domain
    reasons: list[str] = []
    if domain.get("chainId") is None or _as_int(domain.get("chainId")) != chain.chain_id:
        reasons.append("domain-chain-mismatch")
    contract = domain.get("verifyingContract")
    address = checksum(parse_address(contract, "domain.verifyingContract")) if isinstance(contract, str) else None
    if address is None or not any(_domain_matches(entry.verifying_contract, entry.name, entry.version, address,
                                                  domain) for entry in chain.typed_data_domains):
        reasons.append("domain-not-allowlisted")
    intent = None
    if not reasons and typed.primary_type == "Permit" and address is not None and chain.token(address) is not None:
        message = typed.message
        owner = message.get("owner")
        spender = message.get("spender")
        if not isinstance(owner, str) or checksum(parse_address(owner, "message.owner")) != signer:
            reasons.append("permit-owner-not-signer")
        if isinstance(spender, str):
            call = Erc20Call("approve", parse_address(spender, "message.spender"), _as_int(message.get("value")))
            intent = erc20_intent(chain, parse_address(address), call)
            per_tx, _, _ = _caps(chain, intent.asset)
            reasons += check_recipient(chain, intent.recipient).reasons
            if per_tx is not None and intent.amount > per_tx:
                reasons.append("per-tx-cap-exceeded")
    return Decision(not reasons, tuple(reasons)), intent


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
