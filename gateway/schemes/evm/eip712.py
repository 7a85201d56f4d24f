"""EIP-712 typed data hashing — pure functions, no I/O.

Written here with ``eth-abi`` rather than imported from ``eth-account``: the gateway needs the hash only
(no local key), ``eth-account`` would bring a large dependency tree (key files, KZG, BLS curves) into the
signing service, and keeping our own strict encoder lets the tests use ``eth-account`` as an independent
oracle. This encoder is stricter than ``eth-account``'s: every field must be present, no extra fields,
``bool`` must be a JSON boolean, bytes must be 0x-hex — what a human reviews is exactly what is signed.
The type graph is the client's: it is walked with an explicit queue, never recursion, and bounded in
struct count, fields, depth and type length (:data:`MAX_TYPED_STRUCTS` and friends), so no document
costs more than a refusal (``typed-data-too-complex``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from eth_abi.abi import encode as abi_encode
from eth_abi.exceptions import EncodingError
from eth_hash.auto import keccak

from gateway.errors import InvalidTypedData, TypedDataTooComplex
from gateway.schemes.evm.values import parse_address

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
