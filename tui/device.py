"""A thin adapter between the teller UI and a hard wallet on a serial port.

The screens see only :class:`DeviceSession` (async methods, typed results, one error type
:class:`DeviceError`) and :func:`list_ports`. Blocking pyserial I/O runs in a thread so the UI
never waits on the line.

The serial link itself is ``gateway.hardwallet.link`` (framing, request ids, timeouts and
resynchronisation live there, see docs/device-protocol.md); this module only moves its blocking
calls off the UI's event loop and turns its exceptions into :class:`DeviceError`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

Progress = Callable[[int, int], None]
T = TypeVar("T")


class DeviceError(Exception):
    """The port cannot be opened, the device does not answer, or it refused the operation."""


@dataclass(frozen=True)
class PortInfo:
    device: str
    description: str


@dataclass(frozen=True)
class DeviceInfo:
    device_id: str
    model: str
    public_key_pem: str
    wallet_id: str
    offline_balance_fen: int
    counter: int
    certified: bool
    raw: dict[str, Any] = field(repr=False, compare=False)


def list_ports() -> list[PortInfo]:
    """The system's serial ports (pyserial's ``list_ports``); empty if there are none or listing fails."""
    try:
        from serial.tools import list_ports as tools  # pyserial is optional for the teller: no ports without it
    except ImportError:
        return []
    try:
        return [PortInfo(p.device, p.description or "") for p in sorted(tools.comports(), key=lambda p: p.device)]
    except OSError:
        return []


class Link(Protocol):
    """What the adapter uses of ``gateway.hardwallet.link.DeviceLink`` (blocking calls)."""

    def info(self) -> dict[str, Any]: ...

    def certify(self, certificate: bytes, issuer_key_pem: str, endorsements: list[bytes] | None = None,
                ) -> dict[str, Any]: ...

    def load(self, voucher: bytes) -> dict[str, Any]: ...

    def export_log(self, progress: Progress | None = None) -> bytes: ...

    def ack_log(self, ack: bytes) -> dict[str, Any]: ...

    def unload(self) -> bytes: ...

    def close(self) -> None: ...


def _open_link(path: str) -> Link:
    # pyserial (through the link) loads only when a teller opens a hard wallet; without it the rest of the UI works.
    from gateway.hardwallet.link import open_link

    return open_link(path)


def _pem(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return str(value or "")


class DeviceSession:
    """One connected hard wallet, as the Hard wallets screen uses it. Every method runs in a thread."""

    def __init__(self, path: str, link: Link, timeout: float = 5.0) -> None:
        self.path = path
        self._link = link
        self.timeout = timeout

    @classmethod
    async def open(cls, path: str, timeout: float = 5.0) -> DeviceSession:
        try:
            link = await asyncio.to_thread(_open_link, path)
        except DeviceError:
            raise
        except Exception as error:  # a link module's own exception type: translate at this boundary
            raise DeviceError(f"cannot open {path}: {error}") from error
        return cls(path, link, timeout)

    async def _run(self, what: str, function: Callable[..., T], *arguments: Any) -> T:
        try:
            return await asyncio.to_thread(function, *arguments)
        except DeviceError:
            raise
        except Exception as error:  # gateway.errors.DeviceProtocolError and friends: translated here
            raise DeviceError(f"{what} failed: {getattr(error, 'detail', None) or error}") from error

    async def info(self) -> DeviceInfo:
        answer = await self._run("info", self._link.info)
        return DeviceInfo(
            device_id=str(answer.get("device_id", "")), model=str(answer.get("model", "")),
            public_key_pem=_pem(answer.get("public_key_pem")), wallet_id=str(answer.get("wallet_id") or ""),
            offline_balance_fen=int(answer.get("balance", 0) or 0), counter=int(answer.get("counter", 0) or 0),
            certified=bool(answer.get("certified")), raw=answer,
        )

    async def install_certificate(self, certificate: bytes, issuer_key_pem: str,
                                  endorsements: tuple[bytes, ...] = ()) -> None:
        await self._run("certify", self._link.certify, certificate, issuer_key_pem, list(endorsements))

    async def load(self, voucher: bytes) -> dict[str, Any]:
        return await self._run("load", self._link.load, voucher)

    async def export_log(self, progress: Progress | None = None) -> bytes:
        """The device-signed log export, read in chunks; ``progress(done, total)`` is called on the UI's loop."""
        loop = asyncio.get_running_loop()

        def report(done: int, total: int) -> None:
            if progress is not None:
                loop.call_soon_threadsafe(progress, done, total)

        return await self._run("export_log", self._link.export_log, report)

    async def ack_log(self, ack: bytes) -> None:
        await self._run("ack_log", self._link.ack_log, ack)

    async def unload(self) -> bytes:
        """The device signs a final statement and stops spending; returns the statement."""
        return await self._run("unload", self._link.unload)

    async def close(self) -> None:
        await asyncio.to_thread(self._link.close)
