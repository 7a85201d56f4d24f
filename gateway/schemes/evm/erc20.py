"""ERC-20 calldata, ABI-encoded with ``eth-abi``.

``transfer(address,uint256)`` and ``approve(address,uint256)`` from the ERC-20 standard, and
``mint(address,uint256)`` and ``burn(uint256)``, which ERC-20 does not define: these are the signatures
most fiat-backed stablecoins use (OpenZeppelin ``ERC20Burnable.burn``, the common ``mint(to, amount)`` of
issuer contracts). A token whose issuer functions differ needs its own entry here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_abi.exceptions import DecodingError
from eth_hash.auto import keccak

from gateway.errors import InvalidEvmTransaction

Erc20Method = Literal["transfer", "approve", "mint", "burn"]


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
