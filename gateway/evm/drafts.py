"""EVM transaction requests, parsed and decoded into a :class:`~gateway.evm.transactions.Draft`.

One reading for every way a transaction reaches the gateway (``POST /v1/evm/transactions`` today): the
fields arrive as text, as a client sent them, and leave as a draft whose intent policy has decoded. No
store access happens here.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import InvalidEvmTransaction
from gateway.evm.transactions import Draft
from gateway.keys import KeyRecord
from gateway.policy.chains import EvmChainSettings
from gateway.policy.evm import decode_intent, erc20_intent
from gateway.schemes.evm.erc20 import Erc20Call, Erc20Method, erc20_calldata
from gateway.schemes.evm.transactions import TxType, UnsignedTransaction, check_fees, parse_data
from gateway.schemes.evm.values import parse_address, parse_amount


@dataclass(frozen=True)
class Erc20Fields:
    """An ERC-20 call as requested: ``amount`` in base units, as decimal text."""

    token: str
    method: Erc20Method
    to: str | None
    amount: str


@dataclass(frozen=True)
class TransactionFields:
    """A transaction as requested. Quantities are decimal strings (wei); ``data`` is 0x-hex. Either
    ``erc20`` or ``to``/``value``/``data``."""

    type: TxType
    nonce: int | None
    gas_limit: int | None
    max_fee_per_gas: str | None
    max_priority_fee_per_gas: str | None
    gas_price: str | None
    to: str | None
    value: str | None
    data: str | None
    erc20: Erc20Fields | None


def _optional_amount(text: str | None, field: str) -> int | None:
    return None if text is None else parse_amount(text, field)


def draft_of(body: TransactionFields, key: KeyRecord, chain: EvmChainSettings) -> Draft:
    """Parse and decode a request into a draft transaction (no store access).

    Raises:
        InvalidAddress, InvalidEvmAmount, InvalidGasFields, InvalidEvmTransaction (400);
        UnknownToken, UnknownContract (422).
    """
    fees = check_fees(body.type, body.gas_limit, _optional_amount(body.max_fee_per_gas, "max_fee_per_gas"),
                      _optional_amount(body.max_priority_fee_per_gas, "max_priority_fee_per_gas"),
                      _optional_amount(body.gas_price, "gas_price"))
    raw_fields = (body.to, body.value, body.data)
    if body.erc20 is not None:
        if any(field is not None for field in raw_fields):
            raise InvalidEvmTransaction("give either erc20 or to/value/data, not both")
        intent_body = body.erc20
        token = parse_address(intent_body.token, "erc20.token")
        amount = parse_amount(intent_body.amount, "erc20.amount")
        if intent_body.method == "burn":
            if intent_body.to is not None:
                raise InvalidEvmTransaction("erc20.to: burn takes no recipient")
            recipient = None
        elif intent_body.to is None:
            raise InvalidEvmTransaction(f"erc20.to is required for {intent_body.method}")
        else:
            recipient = parse_address(intent_body.to, "erc20.to")
        erc20_call = Erc20Call(intent_body.method, recipient, amount)
        intent = erc20_intent(chain, token, erc20_call)
        to, value, data = token, 0, erc20_calldata(erc20_call)
    else:
        if body.to is None:
            raise InvalidEvmTransaction("to is required (or an erc20 intent); contract creation is not signed")
        to = parse_address(body.to, "to")
        value = parse_amount(body.value or "0", "value")
        data = parse_data(body.data)
        intent = decode_intent(chain, to, value, data)
    unsigned = UnsignedTransaction(body.type, chain.chain_id, 0, fees, to, value, data)
    return Draft(key, chain, unsigned, intent, body.nonce)
