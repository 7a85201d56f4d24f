"""Addresses and amounts as the API takes them: 0x-hex addresses (EIP-55 checksums) and decimal base units."""

from __future__ import annotations

import re
from typing import Any

from eth_hash.auto import keccak

from gateway.errors import InvalidAddress, InvalidEvmAmount

UINT256_MAX = 2**256 - 1

_HEX_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_DECIMAL = re.compile(r"^[0-9]+$")


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
