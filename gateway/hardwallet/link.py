"""The host's side of the serial link to a hard wallet, over pyserial.

:func:`open_link` takes a device path (``/dev/ttyUSB0``, a pseudo-terminal such as ``/dev/pts/7``
printed by ``ecny-gateway device-sim --pty``) or any pyserial URL (``loop://``, ``socket://host:port``,
``rfc2217://…``). :class:`DeviceLink` sends one request at a time and waits for its answer;
everything it raises is a :class:`gateway.errors.DeviceProtocolError`:

- :class:`~gateway.errors.DeviceTimeout` — no answer with the request's id in time;
- :class:`~gateway.errors.DeviceRefused` — the device answered ``ok: false`` (``device_code``);
- :class:`~gateway.errors.DevicePortError` — the port cannot be opened, read or written;
- :class:`~gateway.errors.FrameError` — a request too large for a frame.

Bad frames on the way back (noise, torn frames, stale answers) are skipped: the decoder
resynchronises on the next 0x00 and the link keeps waiting until the timeout.

Blocking I/O: call it from a thread (``asyncio.to_thread``) in async code.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

try:
    import serial
except ImportError:  # pyserial is the `serial` extra: without it, opening a port says what to install
    serial = None

from gateway.errors import ConfigError, DevicePortError, DeviceProtocolError, DeviceRefused, DeviceTimeout, FrameError
from gateway.hardwallet.frames import DELIMITER, MAX_FRAME_BYTES, FrameDecoder, encode_frame
from gateway.hardwallet.protocol import (
    MAX_REQUEST_ID,
    parse_response,
    request_message,
    timeout_for,
)

MISSING_PYSERIAL = "hard wallets need pyserial; install the 'serial' extra: pip install 'ecny-gateway[serial]'"
DEFAULT_BAUDRATE = 115_200
READ_SLICE_S = 0.05
"""How long one read waits; a timeout is noticed within this much of its deadline."""


class Port(Protocol):
    """What the link needs of a port: pyserial's ``Serial`` (and URL handlers) has it."""

    def read(self, size: int = 1) -> bytes:
        """Up to ``size`` bytes; fewer (or none) when the port's read timeout passes first."""
        ...

    def write(self, data: bytes) -> int | None:
        """Write all of ``data``."""
        ...

    def close(self) -> None: ...


def open_port(path: str, baudrate: int = DEFAULT_BAUDRATE) -> Port:
    """Open a serial port or pyserial URL in raw 8N1 with a short read timeout.

    Raises:
        DevicePortError: the port does not exist, is busy, or the URL is not understood.
        ConfigError: pyserial (the ``serial`` extra) is not installed.
    """
    if serial is None:
        raise ConfigError(MISSING_PYSERIAL)
    try:
        port: Port = serial.serial_for_url(path, baudrate=baudrate, timeout=READ_SLICE_S, write_timeout=5.0)
    except (serial.SerialException, OSError, ValueError) as exc:
        raise DevicePortError(f"cannot open {path}: {exc}") from None
    return port


class DeviceLink:
    """Request/answer over one port. Thread-safe: concurrent calls are serialised."""

    def __init__(self, port: Port, *, timeout: float | None = None, max_frame: int = MAX_FRAME_BYTES) -> None:
        self.port = port
        self.timeout = timeout
        self.max_frame = max_frame
        self._decoder = FrameDecoder(max_frame)
        self._next_id = 1
        self._lock = threading.Lock()

    @property
    def dropped_frames(self) -> int:
        return self._decoder.dropped

    def call(self, op: str, timeout: float | None = None, **arguments: Any) -> dict[str, Any]:
        """Send ``op`` with ``arguments`` and return the answer's result fields.

        Args:
            op: the operation (see :data:`gateway.hardwallet.protocol.OPERATIONS`).
            timeout: seconds to wait for the answer; default: the link's, else the operation's.
        Raises:
            DeviceTimeout, DeviceRefused, DevicePortError, FrameError.
        """
        with self._lock:
            request_id = self._next_id
            self._next_id = self._next_id % MAX_REQUEST_ID + 1
            frame = encode_frame(request_message(request_id, op, arguments), self.max_frame)
            wait = timeout if timeout is not None else self.timeout if self.timeout is not None else timeout_for(op)
            self._write(DELIMITER + frame)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                for decoded in self._decoder.feed(self._read()):
                    if not decoded.ok:
                        continue  # noise or a torn frame: the decoder is back in step
                    try:
                        response = parse_response(decoded.message)
                    except FrameError:
                        continue  # not an answer (an echo on loop://, a request from a confused peer)
                    if response.id != request_id:
                        continue  # a stale answer to a request that timed out
                    if not response.ok:
                        raise DeviceRefused(f"device refused {op}: {response.error_code}: {response.error_message}",
                                            device_code=response.error_code)
                    return response.result
            raise DeviceTimeout(f"no answer to {op} within {wait:g} s")

    def _write(self, data: bytes) -> None:
        try:
            self.port.write(data)
        except (serial.SerialException, OSError) as exc:
            raise DevicePortError(f"serial write failed: {exc}") from None

    def _read(self) -> bytes:
        try:
            return bytes(self.port.read(4096))
        except (serial.SerialException, OSError) as exc:
            raise DevicePortError(f"serial read failed: {exc}") from None

    def close(self) -> None:
        try:
            self.port.close()
        except (serial.SerialException, OSError):
            pass

    # --- operations --------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return self.call("info")

    def certify(self, certificate: bytes, issuer_key_pem: str, endorsements: list[bytes] | None = None,
                ) -> dict[str, Any]:
        """Install a certificate; ``endorsements`` (oldest first) when its issuer is not the pinned one."""
        return self.call("certify", certificate=certificate, issuer_key=issuer_key_pem,
                         endorsements=list(endorsements or ()))

    def load(self, voucher: bytes, **simulator_options: Any) -> dict[str, Any]:
        return self.call("load", voucher=voucher, **simulator_options)

    def export_log(self, progress: Callable[[int, int], None] | None = None) -> bytes:
        """The device-signed log export (COSE_Sign1 bytes), read in chunks; ``progress(done, total)``."""
        chunks: list[bytes] = []
        offset = 0
        while True:
            answer = self.call("export_log", offset=offset)
            chunk, total = answer.get("chunk"), answer.get("total")
            if not isinstance(chunk, bytes) or not isinstance(total, int) or offset + len(chunk) > total:
                raise DeviceProtocolError("export_log answer is malformed")
            chunks.append(chunk)
            offset += len(chunk)
            if progress is not None:
                progress(offset, total)
            if offset >= total:
                return b"".join(chunks)
            if not chunk:
                raise DeviceProtocolError(f"export_log stalled at {offset} of {total} bytes")

    def ack_log(self, ack: bytes) -> dict[str, Any]:
        return self.call("ack_log", ack=ack)

    def unload(self) -> bytes:
        """The device's signed final statement; the device stops spending."""
        statement = self.call("unload").get("statement")
        if not isinstance(statement, bytes):
            raise DeviceProtocolError("unload answer has no statement")
        return statement

    def pay(self, payee: str, amount: int, **simulator_options: Any) -> dict[str, Any]:
        return self.call("pay", payee=payee, amount=amount, **simulator_options)

    def receive(self, payment: bytes, certificate: bytes, endorsements: list[bytes] | None = None,
                **simulator_options: Any) -> dict[str, Any]:
        """Hand another device's payment over (``pay``'s ``payment``, ``certificate`` and ``endorsements``)."""
        return self.call("receive", payment=payment, certificate=certificate, endorsements=list(endorsements or ()),
                         **simulator_options)

    def __enter__(self) -> DeviceLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_link(path: str, baudrate: int = DEFAULT_BAUDRATE, timeout: float | None = None) -> DeviceLink:
    """A link to the device at ``path`` (device path or pyserial URL). Raises DevicePortError."""
    return DeviceLink(open_port(path, baudrate), timeout=timeout)
