"""EVM transactions: EIP-1559 (type 2 inside an EIP-2718 envelope) and legacy EIP-155.

RLP-encoded with ``rlp``; the signing hash is keccak-256 (``eth-hash``) of the signing payload. The HSM
signs that 32-byte hash with ``CKM_ECDSA`` on secp256k1 and returns raw r‖s, which
:func:`finish_transaction` turns into the raw signed transaction (:mod:`gateway.schemes.evm.signatures`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import rlp  # type: ignore[import-untyped]
from eth_hash.auto import keccak
from rlp.sedes import CountableList, List, big_endian_int, binary  # type: ignore[import-untyped]

from gateway.errors import InvalidEvmTransaction, InvalidGasFields
from gateway.schemes.evm.signatures import RecoverableSignature, recover_signature
from gateway.schemes.evm.values import checksum

MAX_NONCE = 2**63 - 1
"""EIP-2681 allows nonces up to 2**64 - 1; the store keeps them in a signed 64-bit column."""
MIN_GAS = 21_000
MAX_GAS = 100_000_000
MAX_DATA_BYTES = 128 * 1024

TxType = Literal["eip1559", "legacy"]


def parse_data(text: str | None) -> bytes:
    """Calldata from 0x-hex (empty when absent). Raises InvalidEvmTransaction."""
    if text is None or text in ("", "0x"):
        return b""
    if not text.startswith("0x") or len(text) % 2:
        raise InvalidEvmTransaction("data: 0x-prefixed hex with an even number of digits")
    try:
        data = bytes.fromhex(text[2:])
    except ValueError as exc:
        raise InvalidEvmTransaction("data: not hex") from exc
    if len(data) > MAX_DATA_BYTES:
        raise InvalidEvmTransaction(f"data: more than {MAX_DATA_BYTES} bytes")
    return data


@dataclass(frozen=True)
class Fees:
    """Gas fields of one transaction; which are set depends on the type."""

    gas_limit: int
    max_fee_per_gas: int | None = None
    max_priority_fee_per_gas: int | None = None
    gas_price: int | None = None

    @property
    def gas_price_cap(self) -> int:
        """The most wei one unit of gas can cost: ``max_fee_per_gas`` (EIP-1559) or ``gas_price`` (legacy)."""
        price = self.max_fee_per_gas if self.max_fee_per_gas is not None else self.gas_price
        assert price is not None, "check_fees sets one of them"
        return price

    @property
    def max_total(self) -> int:
        """The most wei the transaction can pay in fees: gas limit × the price cap."""
        return self.gas_limit * self.gas_price_cap


def check_fees(tx_type: TxType, gas_limit: int | None, max_fee: int | None, priority_fee: int | None,
               gas_price: int | None) -> Fees:
    """The gas fields of a ``tx_type`` transaction, checked for presence and consistency.

    Raises:
        InvalidGasFields: a field missing, one of the other type present, or values out of range.
    """
    if gas_limit is None:
        raise InvalidGasFields("gas_limit is required")
    if not MIN_GAS <= gas_limit <= MAX_GAS:
        raise InvalidGasFields(f"gas_limit must be between {MIN_GAS} and {MAX_GAS}")
    if tx_type == "eip1559":
        if gas_price is not None:
            raise InvalidGasFields("an eip1559 transaction takes max_fee_per_gas and max_priority_fee_per_gas, "
                                   "not gas_price")
        if max_fee is None or priority_fee is None:
            raise InvalidGasFields("an eip1559 transaction needs max_fee_per_gas and max_priority_fee_per_gas")
        if priority_fee > max_fee:
            raise InvalidGasFields("max_priority_fee_per_gas is above max_fee_per_gas")
        return Fees(gas_limit, max_fee_per_gas=max_fee, max_priority_fee_per_gas=priority_fee)
    if max_fee is not None or priority_fee is not None:
        raise InvalidGasFields("a legacy transaction takes gas_price, not max_fee_per_gas/max_priority_fee_per_gas")
    if gas_price is None:
        raise InvalidGasFields("a legacy transaction needs gas_price")
    return Fees(gas_limit, gas_price=gas_price)


# RLP layouts given to `rlp` explicitly rather than inferred from the values (half the cost, and
# the layout is stated): quantities are big-endian integers, `to` and `data` byte strings, the
# access list (always empty here) a list of [address, [storage keys]].
_ACCESS_LIST = CountableList(List([binary, CountableList(binary)]))
_EIP1559_UNSIGNED = List([big_endian_int] * 5 + [binary, big_endian_int, binary, _ACCESS_LIST])
_EIP1559_SIGNED = List([big_endian_int] * 5 + [binary, big_endian_int, binary, _ACCESS_LIST] + [big_endian_int] * 3)
_LEGACY = List([big_endian_int] * 3 + [binary, big_endian_int, binary] + [big_endian_int] * 3)


@dataclass(frozen=True)
class UnsignedTransaction:
    """Everything a transaction commits to but its signature. ``to`` is never empty: the gateway
    does not deploy contracts. Access lists are always empty."""

    tx_type: TxType
    chain_id: int
    nonce: int
    fees: Fees
    to: bytes
    value: int
    data: bytes

    def _fields(self) -> list[Any]:
        fees = self.fees
        if self.tx_type == "eip1559":
            return [self.chain_id, self.nonce, fees.max_priority_fee_per_gas, fees.max_fee_per_gas,
                    fees.gas_limit, self.to, self.value, self.data, []]
        return [self.nonce, fees.gas_price, fees.gas_limit, self.to, self.value, self.data]

    def signing_payload(self) -> bytes:
        """EIP-1559: ``0x02 || rlp([chain_id, nonce, …, access_list])``;
        EIP-155: ``rlp([nonce, gas_price, gas, to, value, data, chain_id, 0, 0])``."""
        if self.tx_type == "eip1559":
            return b"\x02" + bytes(rlp.encode(self._fields(), sedes=_EIP1559_UNSIGNED))
        return bytes(rlp.encode([*self._fields(), self.chain_id, 0, 0], sedes=_LEGACY))

    def signing_hash(self) -> bytes:
        """keccak-256 of the signing payload: the 32 bytes the HSM signs (computed once per transaction:
        recording, signing and assembling all need it)."""
        return self._signing_hash

    @functools.cached_property
    def _signing_hash(self) -> bytes:
        return bytes(keccak(self.signing_payload()))

    def assemble(self, y_parity: int, r: int, s: int) -> bytes:
        """The raw signed transaction: the EIP-2718 envelope for type 2, plain RLP for legacy."""
        if self.tx_type == "eip1559":
            return b"\x02" + bytes(rlp.encode([*self._fields(), y_parity, r, s], sedes=_EIP1559_SIGNED))
        return bytes(rlp.encode([*self._fields(), self.chain_id * 2 + 35 + y_parity, r, s], sedes=_LEGACY))

    def to_json(self) -> dict[str, Any]:
        """A JSON form (quantities as decimal strings) that :meth:`from_json` reads back exactly."""
        fees = self.fees
        document: dict[str, Any] = {
            "type": self.tx_type, "chain_id": self.chain_id, "nonce": self.nonce, "gas_limit": fees.gas_limit,
            "to": checksum(self.to), "value": str(self.value), "data": "0x" + self.data.hex(),
        }
        if self.tx_type == "eip1559":
            document["max_fee_per_gas"] = str(fees.max_fee_per_gas)
            document["max_priority_fee_per_gas"] = str(fees.max_priority_fee_per_gas)
        else:
            document["gas_price"] = str(fees.gas_price)
        return document

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> UnsignedTransaction:
        tx_type: TxType = "eip1559" if document["type"] == "eip1559" else "legacy"

        def quantity(name: str) -> int | None:
            return int(document[name]) if name in document else None

        fees = Fees(int(document["gas_limit"]), quantity("max_fee_per_gas"), quantity("max_priority_fee_per_gas"),
                    quantity("gas_price"))
        return cls(tx_type, int(document["chain_id"]), int(document["nonce"]), fees,
                   bytes.fromhex(document["to"][2:]), int(document["value"]), bytes.fromhex(document["data"][2:]))

@dataclass(frozen=True)
class SignedTransaction:
    raw: bytes
    tx_hash: bytes
    signature: RecoverableSignature


def finish_transaction(unsigned: UnsignedTransaction, raw_signature: bytes, public_key: bytes) -> SignedTransaction:
    """Turn the HSM's signature over :meth:`UnsignedTransaction.signing_hash` into the raw transaction.
    The transaction hash is keccak-256 of the raw bytes (envelope type byte included)."""
    signature = recover_signature(unsigned.signing_hash(), raw_signature, public_key)
    raw = unsigned.assemble(signature.y_parity, signature.r, signature.s)
    return SignedTransaction(raw, bytes(keccak(raw)), signature)
