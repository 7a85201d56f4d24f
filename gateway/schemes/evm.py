"""EVM transactions, ERC-20 calldata and EIP-712 typed data — pure functions, no I/O.

What the gateway signs for stablecoins (docs/spec.md §6):

- **Transactions**: EIP-1559 (type 2 inside an EIP-2718 envelope) and legacy EIP-155, RLP-encoded
  with ``rlp``; the signing hash is keccak-256 (``eth-hash``) of the signing payload. The HSM signs
  that 32-byte hash with ``CKM_ECDSA`` on secp256k1 and returns raw r‖s.
- **Signatures**: about half of SoftHSM2's signatures are high-S; Ethereum accepts only low-S
  (EIP-2), so ``s`` becomes ``n - s`` when above ``n/2``. The recovery id (y parity) is found by
  public-key recovery (``coincurve``) against the key's known public key — never guessed.
- **ERC-20 calldata**, ABI-encoded with ``eth-abi``: ``transfer(address,uint256)``,
  ``approve(address,uint256)`` from the ERC-20 standard, and ``mint(address,uint256)`` and
  ``burn(uint256)``, which ERC-20 does not define: these are the signatures most fiat-backed
  stablecoins use (OpenZeppelin ``ERC20Burnable.burn``, the common ``mint(to, amount)`` of issuer
  contracts). A token whose issuer functions differ needs its own entry here.
- **EIP-712** typed data hashing, written here with ``eth-abi`` rather than imported from
  ``eth-account``: the gateway needs the hash only (no local key), ``eth-account`` would bring a
  large dependency tree (key files, KZG, BLS curves) into the signing service, and keeping our own
  strict encoder lets the tests use ``eth-account`` as an independent oracle. This encoder is
  stricter than ``eth-account``'s: every field must be present, no extra fields, ``bool`` must be a
  JSON boolean, bytes must be 0x-hex — what a human reviews is exactly what is signed. The type graph
  is the client's: it is walked with an explicit queue, never recursion, and bounded in struct count,
  fields, depth and type length (:data:`MAX_TYPED_STRUCTS` and friends), so no document costs more
  than a refusal (``typed-data-too-complex``).

Every malformed input raises a :class:`gateway.errors.GatewayError` subclass (400).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import rlp  # type: ignore[import-untyped]
from coincurve import PublicKey
from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_abi.exceptions import DecodingError, EncodingError
from eth_hash.auto import keccak
from rlp.sedes import CountableList, List, big_endian_int, binary  # type: ignore[import-untyped]

from gateway.errors import (
    InvalidAddress,
    InvalidEvmAmount,
    InvalidEvmTransaction,
    InvalidGasFields,
    InvalidTypedData,
    SignatureRecoveryFailed,
    TypedDataTooComplex,
)

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
HALF_N = SECP256K1_N // 2
UINT256_MAX = 2**256 - 1
MAX_NONCE = 2**63 - 1
"""EIP-2681 allows nonces up to 2**64 - 1; the store keeps them in a signed 64-bit column."""
MIN_GAS = 21_000
MAX_GAS = 100_000_000
MAX_DATA_BYTES = 128 * 1024

TxType = Literal["eip1559", "legacy"]
Erc20Method = Literal["transfer", "approve", "mint", "burn"]

_HEX_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_DECIMAL = re.compile(r"^[0-9]+$")


# --- addresses and quantities ----------------------------------------------------------------


def parse_address(text: str, field: str = "address") -> bytes:
    """The 20 bytes of a 0x-prefixed hex address.

    All-lowercase and all-uppercase addresses carry no checksum and are accepted; a mixed-case
    address must pass its EIP-55 checksum.

    Raises:
        InvalidAddress: malformed, or a wrong checksum.
    """
    if not isinstance(text, str) or not _HEX_ADDRESS.match(text):
        raise InvalidAddress(f"{field}: {str(text)[:50]!r} is not a 0x-prefixed 20-byte hex address")
    body = text[2:]
    if body != body.lower() and body != body.upper() and checksum(bytes.fromhex(body)) != text:
        raise InvalidAddress(f"{field}: {text} fails its EIP-55 checksum (mixed case must match it)")
    return bytes.fromhex(body)


def checksum(address: bytes) -> str:
    """EIP-55 form of a 20-byte address: each hex letter upper-cased where the keccak-256 of the
    lower-case hex has a nibble of 8 or more. (eth-utils' ``to_checksum_address`` gives the same,
    checked in tests, at 2.5× the cost: it is called several times per EVM request.)"""
    hex_address = address.hex()
    digest = keccak(hex_address.encode()).hex()
    return "0x" + "".join(c.upper() if d in "89abcdef" else c for c, d in zip(hex_address, digest[:40], strict=True))


def parse_amount(text: Any, field: str = "amount") -> int:
    """A non-negative integer below 2**256 given as a decimal string (wei or token base units).

    Raises:
        InvalidEvmAmount: a JSON number, a negative, fractional, hex or exponent form, or too large.
    """
    if not isinstance(text, str):
        raise InvalidEvmAmount(f"{field}: amounts are decimal strings of base units, e.g. \"1000000\"")
    if not _DECIMAL.match(text) or len(text) > 78:
        what = "negative" if text.startswith("-") else "fractional" if "." in text else "not a decimal integer"
        raise InvalidEvmAmount(f"{field}: {text[:40]!r} is {what}; give a non-negative integer in base units")
    value = int(text)
    if value > UINT256_MAX:
        raise InvalidEvmAmount(f"{field}: {text[:40]}… is larger than 2**256 - 1")
    return value


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


# --- transactions ----------------------------------------------------------------------------


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
class RecoverableSignature:
    """A low-S secp256k1 signature with its recovery id."""

    r: int
    s: int
    y_parity: int

    def rsv(self, v_offset: int = 27) -> bytes:
        """65 bytes r‖s‖v, as EIP-712 and ``personal_sign`` consumers expect (v = 27 or 28)."""
        return self.r.to_bytes(32, "big") + self.s.to_bytes(32, "big") + bytes([self.y_parity + v_offset])


def low_s(raw_signature: bytes) -> tuple[int, int]:
    """(r, s) from the HSM's raw r‖s, with s normalised to the lower half of the curve order (EIP-2).

    Raises:
        SignatureRecoveryFailed: not 64 bytes, or r/s out of range.
    """
    if len(raw_signature) != 64:
        raise SignatureRecoveryFailed(f"expected a 64-byte r‖s signature, got {len(raw_signature)} bytes")
    r = int.from_bytes(raw_signature[:32], "big")
    s = int.from_bytes(raw_signature[32:], "big")
    if not (0 < r < SECP256K1_N and 0 < s < SECP256K1_N):
        raise SignatureRecoveryFailed("signature r or s out of range")
    return r, (SECP256K1_N - s if s > HALF_N else s)


def recover_signature(digest: bytes, raw_signature: bytes, public_key: bytes) -> RecoverableSignature:
    """Normalise an HSM signature over ``digest`` to low-S and find its recovery id by recovering the
    public key with each candidate id and comparing with the key's known (uncompressed) point.

    Raises:
        SignatureRecoveryFailed: neither recovery id gives ``public_key`` (a wrong key or corrupt signature).
    """
    r, s = low_s(raw_signature)
    body = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    for y_parity in (0, 1):
        try:
            recovered = PublicKey.from_signature_and_message(body + bytes([y_parity]), digest, hasher=None)
        except Exception:  # coincurve raises a plain Exception for an unrecoverable id
            continue
        if recovered.format(compressed=False) == public_key:
            return RecoverableSignature(r, s, y_parity)
    raise SignatureRecoveryFailed("the HSM signature does not recover to the key's public key")


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


# --- ERC-20 ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Erc20Abi:
    name: Erc20Method
    signature: str
    types: tuple[str, ...]

    @property
    def selector(self) -> bytes:
        return bytes(keccak(self.signature.encode()))[:4]


ERC20_METHODS: dict[str, Erc20Abi] = {
    "transfer": Erc20Abi("transfer", "transfer(address,uint256)", ("address", "uint256")),
    "approve": Erc20Abi("approve", "approve(address,uint256)", ("address", "uint256")),
    "mint": Erc20Abi("mint", "mint(address,uint256)", ("address", "uint256")),
    "burn": Erc20Abi("burn", "burn(uint256)", ("uint256",)),
}
_BY_SELECTOR = {method.selector: method for method in ERC20_METHODS.values()}


@dataclass(frozen=True)
class Erc20Call:
    """A decoded ERC-20 call: ``to`` is the recipient (transfer, mint) or spender (approve); None for burn."""

    method: Erc20Method
    to: bytes | None
    amount: int


def erc20_calldata(call: Erc20Call) -> bytes:
    """ABI-encoded calldata: selector + arguments."""
    method = ERC20_METHODS[call.method]
    arguments: list[Any] = [call.amount] if call.to is None else ["0x" + call.to.hex(), call.amount]
    return method.selector + bytes(abi_encode(list(method.types), arguments))


def decode_erc20_calldata(data: bytes) -> Erc20Call | None:
    """The ERC-20 call ``data`` encodes, or None when the selector is none of ours.

    Raises:
        InvalidEvmTransaction: a known selector with arguments that do not decode exactly.
    """
    method = _BY_SELECTOR.get(data[:4])
    if method is None:
        return None
    try:
        values = abi_decode(list(method.types), data[4:], strict=True)
    except (DecodingError, ValueError) as exc:
        raise InvalidEvmTransaction(f"calldata for {method.signature} does not decode: {exc}") from exc
    if erc20_calldata(_call_of(method, values)) != data:  # trailing bytes or non-canonical padding
        raise InvalidEvmTransaction(f"calldata for {method.signature} is not canonical ABI encoding")
    return _call_of(method, values)


def _call_of(method: Erc20Abi, values: Sequence[Any]) -> Erc20Call:
    if method.name == "burn":
        return Erc20Call("burn", None, int(values[0]))
    return Erc20Call(method.name, bytes.fromhex(str(values[0])[2:]), int(values[1]))


# --- EIP-712 -----------------------------------------------------------------------------------

DOMAIN_FIELDS = {"name": "string", "version": "string", "chainId": "uint256", "verifyingContract": "address",
                 "salt": "bytes32"}
_ARRAY = re.compile(r"^(.+)\[([0-9]*)\]$")
_IDENTIFIER = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$]*$")
_INT_TYPE = re.compile(r"^(u?)int([0-9]*)$")
_BYTES_N = re.compile(r"^bytes([0-9]+)$")
MAX_TYPED_DEPTH = 16
"""Deepest nesting of structs and arrays, both in the type graph (the longest chain of references
from the primary type) and in a message. Real documents stay far below: EIP-2612/3009 are flat,
Permit2 batches and Seaport orders nest 3–4 levels; the bound keeps every walk short."""
MAX_TYPED_STRUCTS = 64
"""Most struct definitions in one document (``EIP712Domain`` included). Seaport, the largest common
schema, has under 10; without a bound a client chooses how much work each ``encodeType`` costs."""
MAX_TYPED_FIELDS = 64
"""Most fields in one struct definition (same reason)."""
MAX_TYPE_LENGTH = 128
"""Longest type string, e.g. ``uint8[2][]`` (array suffixes are parsed by a regular expression)."""


@dataclass(frozen=True)
class TypedData:
    """A checked EIP-712 document and its hashes."""

    primary_type: str
    domain: dict[str, Any]
    message: dict[str, Any]
    domain_separator: bytes
    message_hash: bytes
    types: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    """Every struct definition as (field name, type) pairs, in the document's order."""

    @property
    def digest(self) -> bytes:
        """``keccak256(0x19 0x01 ‖ domainSeparator ‖ hashStruct(message))``: what is signed."""
        return bytes(keccak(b"\x19\x01" + self.domain_separator + self.message_hash))


def _types(document: Mapping[str, Any]) -> dict[str, list[tuple[str, str]]]:
    raw = document.get("types")
    if not isinstance(raw, dict) or not raw:
        raise InvalidTypedData("types: an object of struct definitions is required")
    if len(raw) > MAX_TYPED_STRUCTS:
        raise TypedDataTooComplex(f"types: {len(raw)} struct definitions; at most {MAX_TYPED_STRUCTS}")
    types: dict[str, list[tuple[str, str]]] = {}
    for name, fields in raw.items():
        if not _IDENTIFIER.match(name) or not isinstance(fields, list):
            raise InvalidTypedData(f"types.{str(name)[:40]}: a struct name with a list of fields")
        if _is_atomic(name):
            # A struct named like an atomic type would change how every field of that type is encoded.
            raise InvalidTypedData(f"types.{name}: a struct cannot take the name of an atomic type")
        if len(fields) > MAX_TYPED_FIELDS:
            raise TypedDataTooComplex(f"types.{name}: {len(fields)} fields; at most {MAX_TYPED_FIELDS}")
        seen: set[str] = set()
        parsed = []
        for item in fields:
            if (not isinstance(item, dict) or set(item) != {"name", "type"} or not isinstance(item["name"], str)
                    or not isinstance(item["type"], str) or not _IDENTIFIER.match(item["name"])
                    or len(item["type"]) > MAX_TYPE_LENGTH):
                raise InvalidTypedData(f"types.{name}: each field is {{\"name\", \"type\"}} "
                                       f"(a type of at most {MAX_TYPE_LENGTH} characters)")
            if item["name"] in seen:
                raise InvalidTypedData(f"types.{name}: field {item['name']!r} appears twice")
            seen.add(item["name"])
            parsed.append((item["name"], item["type"]))
        types[name] = parsed
    if "EIP712Domain" not in types:
        domain = document.get("domain")
        if not isinstance(domain, dict):
            raise InvalidTypedData("domain: an object is required")
        # As eth-account and eth_signTypedData_v4 do: the domain type follows from the fields present.
        types["EIP712Domain"] = [(name, kind) for name, kind in DOMAIN_FIELDS.items() if name in domain]
    for name, kind in types["EIP712Domain"]:
        if DOMAIN_FIELDS.get(name) != kind:
            raise InvalidTypedData(f"types.EIP712Domain: {name} {kind} is not an EIP-712 domain field")
    for name, fields in types.items():
        for field_name, kind in fields:
            _check_type(types, kind, f"types.{name}.{field_name}")
    return types


def _base_type(kind: str) -> str:
    while (match := _ARRAY.match(kind)) is not None:
        kind = match.group(1)
    return kind


def _is_atomic(base: str) -> bool:
    """Is ``base`` (no array suffix) one of EIP-712's atomic or dynamic types?"""
    if base in ("address", "bool", "string", "bytes"):
        return True
    if (match := _INT_TYPE.match(base)) is not None:
        bits = int(match.group(2) or 256)
        return bits % 8 == 0 and 8 <= bits <= 256 and (match.group(2) == "" or not match.group(2).startswith("0"))
    return (match := _BYTES_N.match(base)) is not None and 1 <= int(match.group(1)) <= 32


def _check_type(types: Mapping[str, Any], kind: str, where: str) -> None:
    if kind.count("[") > MAX_TYPED_DEPTH:
        raise TypedDataTooComplex(f"{where}: more than {MAX_TYPED_DEPTH} array dimensions")
    base = _base_type(kind)
    if base in types or _is_atomic(base):
        return
    raise InvalidTypedData(f"{where}: unknown type {kind!r}")


def dependencies(types: Mapping[str, Sequence[tuple[str, str]]], name: str) -> dict[str, int]:
    """Every struct reachable from ``name`` (itself included), each with its depth: the fewest
    references from ``name`` to it (``name`` is 0).

    Breadth-first with an explicit queue, never recursion: the graph is the client's, and a chain of
    thousands of types must cost a refusal, not the interpreter's stack.

    Raises:
        TypedDataTooComplex: a struct deeper than :data:`MAX_TYPED_DEPTH`.
    """
    depths = {name: 0}
    queue = [name]
    for current in queue:  # the list grows while it is read: a FIFO queue without pops
        for _, kind in types[current]:
            base = _base_type(kind)
            if base in types and base not in depths:
                if depths[current] + 1 > MAX_TYPED_DEPTH:
                    raise TypedDataTooComplex(f"types.{name}: structs nested more than {MAX_TYPED_DEPTH} levels "
                                              f"(through {current})")
                depths[base] = depths[current] + 1
                queue.append(base)
    return depths


def encode_type(types: Mapping[str, Sequence[tuple[str, str]]], name: str) -> str:
    """``Name(type field,…)`` followed by the referenced structs in alphabetical order.

    Raises:
        TypedDataTooComplex: the graph below ``name`` is deeper than :data:`MAX_TYPED_DEPTH`.
    """
    others = sorted(set(dependencies(types, name)) - {name})
    return "".join(f"{struct}({','.join(f'{kind} {field}' for field, kind in types[struct])})"
                   for struct in [name, *others])


def _integer(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise InvalidTypedData(f"{where}: a boolean is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            if re.fullmatch(r"-?0x[0-9a-fA-F]+", text):
                return int(text, 16)
            if re.fullmatch(r"-?[0-9]+", text):
                return int(text, 10)
        except ValueError:
            pass
    raise InvalidTypedData(f"{where}: an integer (JSON number, decimal or 0x-hex string) is required")


def _hex_bytes(value: Any, where: str) -> bytes:
    if isinstance(value, str) and value.startswith("0x") and len(value) % 2 == 0:
        try:
            return bytes.fromhex(value[2:])
        except ValueError:
            pass
    raise InvalidTypedData(f"{where}: 0x-prefixed hex bytes are required")


def _encode_value(types: Mapping[str, list[tuple[str, str]]], kind: str, value: Any, where: str,
                  depth: int) -> bytes:
    """The 32-byte ``encodeData`` member for one value."""
    if depth > MAX_TYPED_DEPTH:
        raise TypedDataTooComplex(f"{where}: nested more than {MAX_TYPED_DEPTH} levels")
    if kind in types:
        return hash_struct(types, kind, value, where, depth + 1)
    if (match := _ARRAY.match(kind)) is not None:
        item_kind, length = match.group(1), match.group(2)
        if not isinstance(value, list):
            raise InvalidTypedData(f"{where}: an array is required")
        if length and len(value) != int(length):
            raise InvalidTypedData(f"{where}: exactly {length} items are required")
        return bytes(keccak(b"".join(_encode_value(types, item_kind, item, f"{where}[{i}]", depth + 1)
                                     for i, item in enumerate(value))))
    if kind == "string":
        if not isinstance(value, str):
            raise InvalidTypedData(f"{where}: a string is required")
        return bytes(keccak(value.encode("utf-8")))
    if kind == "bytes":
        return bytes(keccak(_hex_bytes(value, where)))
    if kind == "bool":
        if not isinstance(value, bool):
            raise InvalidTypedData(f"{where}: true or false is required")
        return bytes(abi_encode(["bool"], [value]))
    if kind == "address":
        if not isinstance(value, str):
            raise InvalidTypedData(f"{where}: an address string is required")
        return bytes(12) + parse_address(value, where)
    if (match := _BYTES_N.match(kind)) is not None:
        data = _hex_bytes(value, where)
        if len(data) != int(match.group(1)):
            raise InvalidTypedData(f"{where}: exactly {match.group(1)} bytes are required")
        return data.ljust(32, b"\x00")
    number = _integer(value, where)
    try:
        return bytes(abi_encode([kind], [number]))
    except (EncodingError, ValueError, OverflowError) as exc:
        raise InvalidTypedData(f"{where}: {number} does not fit {kind}") from exc


def hash_struct(types: Mapping[str, list[tuple[str, str]]], name: str, value: Any, where: str = "message",
                depth: int = 0) -> bytes:
    """``keccak256(typeHash ‖ encodeData(value))``, with every field required and no extra ones."""
    if not isinstance(value, dict):
        raise InvalidTypedData(f"{where}: an object of type {name} is required")
    fields = types[name]
    missing = [field for field, _ in fields if field not in value]
    extra = sorted(set(value) - {field for field, _ in fields})
    if missing or extra:
        raise InvalidTypedData(f"{where}: missing fields {missing}, fields not in {name}: {extra}")
    encoded = bytes(keccak(encode_type(types, name).encode()))
    for field_name, kind in fields:
        encoded += _encode_value(types, kind, value[field_name], f"{where}.{field_name}", depth)
    return bytes(keccak(encoded))


def parse_typed_data(document: Mapping[str, Any]) -> TypedData:
    """Check an ``eth_signTypedData_v4`` document ({types, primaryType, domain, message}) and hash it.

    Raises:
        InvalidTypedData: anything not conforming to EIP-712 (as this module reads it, strictly).
    """
    if not isinstance(document, Mapping):
        raise InvalidTypedData("typed_data must be an object")
    extra = set(document) - {"types", "primaryType", "domain", "message"}
    if extra:
        raise InvalidTypedData(f"typed_data: unexpected members {sorted(extra)}")
    types = _types(document)
    primary = document.get("primaryType")
    if not isinstance(primary, str) or primary not in types or primary == "EIP712Domain":
        raise InvalidTypedData("primaryType must name a struct in types (not EIP712Domain)")
    domain, message = document.get("domain"), document.get("message")
    if not isinstance(domain, dict) or not isinstance(message, dict):
        raise InvalidTypedData("domain and message must be objects")
    separator = hash_struct(types, "EIP712Domain", domain, "domain")
    return TypedData(primary, dict(domain), dict(message), separator, hash_struct(types, primary, message),
                     {name: tuple(fields) for name, fields in types.items()})
