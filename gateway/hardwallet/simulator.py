"""A software hard wallet that speaks the serial protocol: ``ecny-gateway device-sim``.

It stands in for a real device in development and tests. Its P-256 key is a `cryptography` key
kept in its state file (on a real device the key never leaves the secure element). It keeps what a
hard wallet keeps — certificate and pinned issuer key, vouchers loaded, offline balance, payment
counter and hash chain, the payments it made and received since the gateway's last
acknowledgement — and it can pay another simulated device (``pay`` on the payer, then ``receive``
with the result on the payee; the host carries the bytes across, as NFC would).

Value received offline is not spendable until the gateway has reconciled it (it goes to the
payee's wallet, not back onto the device): the offline balance is what was loaded less what was spent.

Misbehaviour, on purpose, for tests of the reconciliation rules (docs/spec.md §8): ``pay`` and ``load``
and ``receive`` accept ``misbehave``, one of :data:`MISBEHAVIOURS`.

    ecny-gateway device-sim --pty [--state FILE]      # prints the pseudo-terminal's path
    ecny-gateway device-sim --port /dev/ttyUSB0 [--state FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import select
import signal
import sys
import threading
import time
import tty
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.errors import DeviceProtocolError, DeviceRefused, FrameError, GatewayError, OfflineFormatError
from gateway.hardwallet.frames import DELIMITER, FrameDecoder, encode_frame
from gateway.hardwallet.link import Port, open_port
from gateway.hardwallet.protocol import (
    EXPORT_CHUNK_BYTES,
    OPERATIONS,
    PROTOCOL_VERSION,
    Request,
    answer_message,
    parse_request,
    refusal_message,
)
from gateway.schemes import offline

MAX_CHAIN = 16
"""Most endorsements a device takes in one argument, and keeps (the newest): a chain of hand-overs."""

MISBEHAVIOURS: dict[str, str] = {
    "reuse-counter": "pay: sign a second, different payment with the last counter (a double spend)",
    "skip-counter": "pay: jump the counter by two (a gap)",
    "break-chain": "pay: put a random hash in prev",
    "forge-signature": "pay: sign with a key that is not the certified one",
    "overspend": "pay: spend more than the offline balance",
    "exceed-cap": "pay: pay more than the certificate's per-payment cap",
    "too-many-payments": "pay: pay more times than the certificate allows between syncs",
    "expired-certificate": "pay: pay although the certificate has expired",
    "expired-voucher": "load: load a voucher after its expiry",
    "accept-anything": "receive: accept a payment without checking it",
}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class DeviceState:
    """Everything the device keeps (JSON in its state file; bytes as hex)."""

    device_id: str
    model: str
    private_key_pem: str
    certificate: str = ""
    issuer_key_pem: str = ""
    counter: int = 0
    prev: str = offline.GENESIS.hex()
    last_prev: str = offline.GENESIS.hex()  # prev of the last payment (what a reused counter repeats)
    loads: list[dict[str, int]] = field(default_factory=list)
    spent: int = 0
    payments: list[dict[str, Any]] = field(default_factory=list)  # {"counter", "envelope"} not yet acked
    receipts: list[dict[str, Any]] = field(default_factory=list)  # {"rx", "envelope"} not yet acked
    rx: int = 0
    seen: list[str] = field(default_factory=list)  # hashes of payments received (replay protection)
    acked_counter: int = 0
    acked_rx: int = 0
    statement: str = ""  # the signed final statement, once unloaded
    clock_offset_ms: int = 0
    endorsements: list[str] = field(default_factory=list)  # the chain from the first pinned key to the pinned one
    former_issuers: list[str] = field(default_factory=list)  # PEMs of the keys pinned before, oldest first

    @property
    def loaded(self) -> int:
        return sum(load["amount"] for load in self.loads)


class SimulatedDevice:
    """One simulated hard wallet. :meth:`handle` answers protocol requests; the methods named after
    the operations may also be called directly (in-process tests, benchmark generators)."""

    def __init__(self, state: DeviceState, path: Path | None = None) -> None:
        self.state = state
        self.path = path
        key = serialization.load_pem_private_key(state.private_key_pem.encode(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise DeviceProtocolError("the simulator's key must be a P-256 key")
        self._key: ec.EllipticCurvePrivateKey = key
        self.point = self._key.public_key().public_bytes(serialization.Encoding.X962,
                                                         serialization.PublicFormat.UncompressedPoint)
        self._certificate: offline.Certificate | None = None
        self._issuer: bytes | None = None
        if state.certificate:
            envelope = offline.open_envelope(bytes.fromhex(state.certificate))
            self._certificate = offline.parse_certificate(envelope.payload)
            self._issuer = offline.point_from_pem(state.issuer_key_pem)
        self._former = [offline.point_from_pem(pem) for pem in state.former_issuers]
        self._export: bytes | None = None

    @classmethod
    def create(cls, device_id: str | None = None, model: str = "ecny-sim-1",
               path: Path | None = None) -> SimulatedDevice:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
        device = cls(DeviceState(device_id or f"sim-{secrets.token_hex(6)}", model, pem), path)
        device.save()
        return device

    @classmethod
    def open(cls, path: Path, device_id: str | None = None, model: str = "ecny-sim-1") -> SimulatedDevice:
        """The device kept in ``path``, or a new one saved there."""
        if path.exists():
            try:
                state = DeviceState(**json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError) as exc:
                raise DeviceProtocolError(f"cannot read simulator state {path}: {exc}") from None
            return cls(state, path)
        return cls.create(device_id, model, path)

    def save(self) -> None:
        self._export = None
        if self.path is None:
            return
        temporary = self.path.with_suffix(self.path.suffix + ".tmp")
        temporary.write_text(json.dumps(asdict(self.state), indent=1), encoding="utf-8")
        os.chmod(temporary, 0o600)
        os.replace(temporary, self.path)

    # --- protocol ------------------------------------------------------------------------------

    def handle(self, message: Any) -> dict[str, Any] | None:
        """The answer to a request message; None for a message that is not a request (no id to answer)."""
        try:
            request = parse_request(message)
        except FrameError:
            return None
        try:
            if request.version != PROTOCOL_VERSION:
                raise DeviceRefused("", device_code="unsupported-version")
            result = self._dispatch(request)
        except DeviceRefused as refusal:
            code = str(refusal.extra.get("device_code", "refused"))
            return refusal_message(request.id, code, refusal.detail if refusal.detail != refusal.title else code)
        except GatewayError as error:  # malformed arguments (OfflineFormatError...) and the like
            return refusal_message(request.id, "bad-request", error.detail)
        return answer_message(request.id, result)

    def _dispatch(self, request: Request) -> dict[str, Any]:
        if request.op not in OPERATIONS:
            raise DeviceRefused(f"unknown operation {request.op[:32]!r}", device_code="unknown-op")
        arguments = request.arguments
        if request.op == "info":
            return self.info()
        if request.op == "certify":
            return self.certify(_bytes(arguments, "certificate"), _text(arguments, "issuer_key"),
                                _byte_list(arguments, "endorsements"))
        if request.op == "load":
            return self.load(_bytes(arguments, "voucher"), misbehave=_mode(arguments))
        if request.op == "export_log":
            return self.export_log(_int(arguments, "offset", 0))
        if request.op == "ack_log":
            return self.ack_log(_bytes(arguments, "ack"))
        if request.op == "unload":
            return self.unload()
        if request.op == "pay":
            ts = arguments.get("ts")
            return self.pay(_text(arguments, "payee"), _int(arguments, "amount"), misbehave=_mode(arguments),
                            ts=ts if isinstance(ts, int) and not isinstance(ts, bool) else None)
        if request.op == "receive":
            return self.receive(_bytes(arguments, "payment"), _bytes(arguments, "certificate"),
                                misbehave=_mode(arguments), endorsements=_byte_list(arguments, "endorsements"))
        return self.set_clock(_int(arguments, "offset_ms", None, signed=True))

    # --- operations ------------------------------------------------------------------------------

    def clock(self) -> int:
        return now_ms() + self.state.clock_offset_ms

    @property
    def balance(self) -> int:
        return self.state.loaded - self.state.spent

    def info(self) -> dict[str, Any]:
        certificate = self._certificate
        return {
            "device_id": self.state.device_id, "model": self.state.model,
            "public_key_pem": offline.pem_from_point(self.point), "certified": certificate is not None,
            "wallet_id": certificate.wallet_id if certificate else None,
            "certificate_exp": certificate.exp if certificate else None,
            "balance": self.balance, "loaded": self.state.loaded, "spent": self.state.spent,
            "counter": self.state.counter, "rx": self.state.rx, "pending_payments": len(self.state.payments),
            "pending_receipts": len(self.state.receipts), "unloaded": bool(self.state.statement),
            "protocol": PROTOCOL_VERSION, "simulator": True,
        }

    def certify(self, certificate: bytes, issuer_key_pem: str, endorsements: list[bytes] | None = None,
                ) -> dict[str, Any]:
        """Install a certificate and pin its issuer key. The first certificate is taken on trust (the
        device is provisioned in the bank); from then on another issuer's certificate is taken only with
        ``endorsements`` leading from the pinned key to it (:func:`gateway.schemes.offline.endorsed`): a
        certificate of the pinned issuer renews, and whoever holds the serial link cannot re-pin the
        device to a key of their own."""
        issuer = offline.point_from_pem(issuer_key_pem)
        message = offline.open_envelope(certificate)
        if not offline.verify_es256(message, issuer):
            raise DeviceRefused("the certificate's signature does not verify with the issuer key",
                                device_code="bad-certificate")
        parsed = offline.parse_certificate(message.payload)
        if parsed.device_id != self.state.device_id or parsed.pub != self.point:
            raise DeviceRefused("the certificate is for another device or key", device_code="bad-certificate")
        state = self.state
        if self._issuer is not None and issuer != self._issuer:
            path = offline.endorsement_path(self._issuer, list(endorsements or ()))
            if path is None or path[-1] != issuer:
                raise DeviceRefused("the certificate's issuer is not the key this device pins, and no endorsement "
                                    "by that key leads to it", device_code="issuer-not-endorsed")
            # The pin moves along the endorsements; the chain is kept to show payees still pinned on an
            # older key (pay), and the keys it moves through stay issuers of payers' certificates (receive).
            state.endorsements = (state.endorsements + [e.hex() for e in endorsements or ()])[-MAX_CHAIN:]
            for handed_over in path[:-1]:
                if handed_over not in self._former:
                    state.former_issuers.append(offline.pem_from_point(handed_over))
                    self._former.append(handed_over)
        state.certificate, state.issuer_key_pem = certificate.hex(), issuer_key_pem
        self._certificate, self._issuer = parsed, issuer
        self.save()
        return {"device_id": parsed.device_id, "wallet_id": parsed.wallet_id, "exp": parsed.exp}

    def _certified(self) -> tuple[offline.Certificate, bytes]:
        if self._certificate is None or self._issuer is None:
            raise DeviceRefused("the device has no certificate", device_code="not-certified")
        if self.state.statement:
            raise DeviceRefused("the device is unloaded and spends no more", device_code="unloaded")
        return self._certificate, self._issuer

    def load(self, voucher: bytes, misbehave: str | None = None) -> dict[str, Any]:
        certificate, issuer = self._certified()
        message = offline.open_envelope(voucher)
        if not offline.verify_es256(message, issuer):
            raise DeviceRefused("the voucher's signature does not verify", device_code="bad-voucher")
        parsed = offline.parse_voucher(message.payload)
        at = self.clock()
        if parsed.device_id != self.state.device_id:
            raise DeviceRefused("the voucher is for another device", device_code="bad-voucher")
        if any(load["load_seq"] >= parsed.load_seq for load in self.state.loads):
            raise DeviceRefused(f"voucher {parsed.load_seq} is not newer than those loaded", device_code="replayed")
        if at > parsed.exp and misbehave != "expired-voucher":
            raise DeviceRefused("the voucher has expired", device_code="voucher-expired")
        if self.balance + parsed.amount > certificate.caps.balance:
            raise DeviceRefused("the load would pass the offline balance cap", device_code="balance-cap")
        self.state.loads.append({"load_seq": parsed.load_seq, "amount": parsed.amount, "exp": parsed.exp, "at": at})
        self.save()
        return {"load_seq": parsed.load_seq, "balance": self.balance}

    def pay(self, payee: str, amount: int, misbehave: str | None = None, ts: int | None = None) -> dict[str, Any]:
        """Make and log a payment; returns ``payment`` (COSE_Sign1), and ``certificate`` and ``endorsements``
        (the chain from this device's first pinned key to its certificate's issuer) for the payee."""
        certificate, _ = self._certified()
        state = self.state
        ts = self.clock() if ts is None else ts
        if not offline.DEVICE_ID.match(payee) or payee == state.device_id:
            raise DeviceRefused("payee must be another device's id", device_code="bad-payee")
        if amount <= 0:
            raise DeviceRefused("amount must be positive", device_code="bad-amount")
        if amount > certificate.caps.per_payment and misbehave != "exceed-cap":
            raise DeviceRefused("amount above the per-payment cap", device_code="cap")
        if amount > self.balance and misbehave != "overspend":
            raise DeviceRefused("offline balance too low", device_code="insufficient-balance")
        if len(state.payments) >= certificate.caps.payments_per_sync and misbehave != "too-many-payments":
            raise DeviceRefused("sync before paying again", device_code="sync-required")
        if ts > certificate.exp and misbehave != "expired-certificate":
            raise DeviceRefused("the certificate has expired", device_code="certificate-expired")
        counter, prev = state.counter + 1, state.prev
        if misbehave == "reuse-counter" and state.counter > 0:
            counter, prev = state.counter, state.last_prev
        elif misbehave == "skip-counter":
            counter += 1
        elif misbehave == "break-chain":
            prev = secrets.token_hex(32)
        payload = offline.Payment(state.device_id, counter, payee, amount, ts, bytes.fromhex(prev)).payload()
        key = ec.generate_private_key(ec.SECP256R1()) if misbehave == "forge-signature" else self._key
        envelope = offline.device_sign1(key, state.device_id.encode(), payload)
        state.last_prev = prev
        state.counter = max(state.counter, counter)
        state.prev = offline.record_hash(payload).hex()
        state.spent += amount
        state.payments.append({"counter": counter, "envelope": envelope.hex()})
        self.save()
        return {"payment": envelope, "certificate": bytes.fromhex(state.certificate),
                "endorsements": [bytes.fromhex(e) for e in state.endorsements], "counter": counter,
                "hash": offline.record_hash(payload), "balance": self.balance}

    def receive(self, payment: bytes, certificate: bytes, misbehave: str | None = None,
                check: bool = True, endorsements: list[bytes] | None = None) -> dict[str, Any]:
        """Accept a payment made to this device, checking it as a payee device would.

        ``endorsements``: the payer's (:meth:`pay`), for a payer certified under a key this device's pinned
        key endorsed since. ``check=False`` (in-process only) skips the signature checks: benchmark
        generators use it.
        """
        if self._issuer is None:
            raise DeviceRefused("the device has no certificate", device_code="not-certified")
        message = offline.open_envelope(payment)
        parsed = offline.parse_payment(message.payload)
        digest = offline.record_hash(message.payload).hex()
        if misbehave != "accept-anything":
            if parsed.payee != self.state.device_id:
                raise DeviceRefused("the payment is for another device", device_code="bad-payee")
            if digest in self.state.seen:
                raise DeviceRefused("payment already received", device_code="replayed")
            if check:
                self._check_payer(message, parsed, certificate, list(endorsements or ()))
        self.state.rx += 1
        self.state.receipts.append({"rx": self.state.rx, "envelope": payment.hex()})
        self.state.seen.append(digest)
        self.save()
        return {"rx": self.state.rx, "hash": bytes.fromhex(digest)}

    def _check_payer(self, message: Any, parsed: offline.Payment, certificate: bytes,
                     endorsements: list[bytes]) -> None:
        envelope = offline.open_envelope(certificate)
        if not any(offline.verify_es256(envelope, issuer) for issuer in self._payer_issuers(endorsements)):
            raise DeviceRefused("the payer's certificate does not verify", device_code="bad-certificate")
        payer = offline.parse_certificate(envelope.payload)
        if payer.device_id != parsed.payer or parsed.ts > payer.exp or self.clock() > payer.exp:
            raise DeviceRefused("the payer's certificate does not cover this payment", device_code="bad-certificate")
        if parsed.amount > payer.caps.per_payment:
            raise DeviceRefused("amount above the payer's per-payment cap", device_code="cap")
        if not offline.verify_es256(message, payer.pub):
            raise DeviceRefused("the payment's signature does not verify", device_code="bad-signature")

    def _payer_issuers(self, endorsements: list[bytes]) -> list[bytes]:
        """The keys a payer's certificate may be signed by: the pinned one; the ones this device was pinned to
        or handed over through before (a payer not yet certified again after a rotation, or certified between
        two: keys this device trusted or saw endorse their successor, and was shown no reason to stop); and
        the key the payer's ``endorsements`` lead to from the pinned one, wherever the pinned key is in the
        payer's chain (a payer certified again first)."""
        assert self._issuer is not None
        issuers = [self._issuer, *self._former]
        for start in range(len(endorsements)):  # the payer's chain, from where the pinned key is in it
            path = offline.endorsement_path(self._issuer, endorsements[start:])
            if path is not None:
                issuers.append(path[-1])
                break
        return issuers

    def export(self) -> bytes:
        """The device-signed export of everything not yet acknowledged (cached until the state changes)."""
        if self._export is None:
            state = self.state
            log = offline.LogExport(
                device_id=state.device_id, ts=self.clock(), counter=state.counter, rx=state.rx,
                certificate=bytes.fromhex(state.certificate),
                payments=[bytes.fromhex(p["envelope"]) for p in state.payments],
                receipts=[bytes.fromhex(r["envelope"]) for r in state.receipts],
                loads=[offline.LoadRecord(**load) for load in state.loads],
            )
            self._export = offline.device_sign1(self._key, state.device_id.encode(), log.payload())
        return self._export

    def export_log(self, offset: int = 0) -> dict[str, Any]:
        if offset == 0:
            self._export = None  # a new export starts from offset 0
        blob = self.export()
        if offset > len(blob):
            raise DeviceRefused("offset past the end of the export", device_code="bad-offset")
        chunk = blob[offset:offset + EXPORT_CHUNK_BYTES]
        return {"chunk": chunk, "total": len(blob), "more": offset + len(chunk) < len(blob),
                "counter": self.state.counter, "rx": self.state.rx}

    def ack_log(self, ack: bytes) -> dict[str, Any]:
        if self._issuer is None:
            raise DeviceRefused("the device has no certificate", device_code="not-certified")
        message = offline.open_envelope(ack)
        if not offline.verify_es256(message, self._issuer):
            raise DeviceRefused("the acknowledgement's signature does not verify", device_code="bad-ack")
        parsed = offline.parse_ack(message.payload)
        if parsed.device_id != self.state.device_id:
            raise DeviceRefused("the acknowledgement is for another device", device_code="bad-ack")
        state = self.state
        state.payments = [p for p in state.payments if p["counter"] > parsed.counter]
        state.receipts = [r for r in state.receipts if r["rx"] > parsed.rx]
        state.acked_counter = max(state.acked_counter, parsed.counter)
        state.acked_rx = max(state.acked_rx, parsed.rx)
        self.save()
        return {"acked_counter": state.acked_counter, "acked_rx": state.acked_rx,
                "pending_payments": len(state.payments), "pending_receipts": len(state.receipts)}

    def unload(self) -> dict[str, Any]:
        """Sign the final statement and stop spending (asking again returns the same statement)."""
        state = self.state
        if not state.statement:
            self._certified()
            statement = offline.Statement(state.device_id, state.counter, bytes.fromhex(state.prev), state.rx,
                                          state.loaded, state.spent, self.balance, self.clock())
            state.statement = offline.device_sign1(self._key, state.device_id.encode(), statement.payload()).hex()
            self.save()
        return {"statement": bytes.fromhex(state.statement)}

    def set_clock(self, offset_ms: int) -> dict[str, Any]:
        self.state.clock_offset_ms = offset_ms
        self.save()
        return {"clock": self.clock()}


def _bytes(arguments: dict[str, Any], name: str) -> bytes:
    value = arguments.get(name)
    if not isinstance(value, bytes):
        raise OfflineFormatError(f"{name} must be a byte string")
    return value


def _byte_list(arguments: dict[str, Any], name: str) -> list[bytes]:
    """An optional array of byte strings (at most :data:`MAX_CHAIN`: a chain of hand-overs, not a payload)."""
    value = arguments.get(name, [])
    if (not isinstance(value, list | tuple) or len(value) > MAX_CHAIN
            or not all(isinstance(item, bytes) for item in value)):
        raise OfflineFormatError(f"{name} must be an array of at most {MAX_CHAIN} byte strings")
    return list(value)


def _text(arguments: dict[str, Any], name: str) -> str:
    value = arguments.get(name)
    if not isinstance(value, str) or len(value) > 8192:
        raise OfflineFormatError(f"{name} must be text")
    return value


def _int(arguments: dict[str, Any], name: str, default: int | None = None, signed: bool = False) -> int:
    value = arguments.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or abs(value) > offline.MAX_UINT or (
            value < 0 and not signed):
        raise OfflineFormatError(f"{name} must be an integer")
    return value


def _mode(arguments: dict[str, Any]) -> str | None:
    mode = arguments.get("misbehave")
    if mode is not None and mode not in MISBEHAVIOURS:
        raise OfflineFormatError(f"misbehave must be one of {sorted(MISBEHAVIOURS)}")
    return mode


# --- serving a port ------------------------------------------------------------------------------


class PtyPort:
    """The device's end (master) of a new pseudo-terminal; clients open :attr:`path` (the slave)."""

    def __init__(self) -> None:
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)  # no echo, no line discipline: bytes pass as they are
        self.path = os.ttyname(self._slave)

    def read(self, size: int = 1) -> bytes:
        ready, _, _ = select.select([self._master], [], [], 0.05)
        if not ready:
            return b""
        try:
            return os.read(self._master, size)
        except OSError:
            return b""

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            written = os.write(self._master, view)
            view = view[written:]
        return len(data)

    def close(self) -> None:
        for fd in (self._master, self._slave):
            try:
                os.close(fd)
            except OSError:
                pass


def serve(port: Port, device: SimulatedDevice, stop: threading.Event) -> None:
    """Answer requests on ``port`` until ``stop`` is set. Bad frames are skipped (the decoder resyncs)."""
    decoder = FrameDecoder()
    while not stop.is_set():
        data = port.read(4096)
        if not data:
            continue
        for frame in decoder.feed(data):
            if not frame.ok:
                continue
            answer = device.handle(frame.message)
            if answer is not None:
                port.write(DELIMITER + encode_frame(answer))


def start_in_thread(device: SimulatedDevice, port: Port | None = None) -> tuple[str, threading.Event, threading.Thread]:
    """Serve ``device`` on a new pseudo-terminal (or ``port``) in a daemon thread, for tests.
    Returns (path to open, stop event, thread)."""
    pty_port = PtyPort() if port is None else None
    serving: Port = pty_port if pty_port is not None else port  # type: ignore[assignment]
    stop = threading.Event()

    def run() -> None:
        try:
            serve(serving, device, stop)
        finally:
            if pty_port is not None:
                pty_port.close()

    thread = threading.Thread(target=run, name=f"device-sim-{device.state.device_id}", daemon=True)
    thread.start()
    return (pty_port.path if pty_port is not None else ""), stop, thread


# --- command line --------------------------------------------------------------------------------


def add_command(commands: Any) -> None:
    """Add ``device-sim`` to the ``ecny-gateway`` subcommands."""
    sim = commands.add_parser("device-sim", help="a software hard wallet on a serial port (development, tests)")
    where = sim.add_mutually_exclusive_group(required=True)
    where.add_argument("--pty", action="store_true", help="open a pseudo-terminal and print its path")
    where.add_argument("--port", metavar="DEV", help="serial device or pyserial URL to serve on")
    sim.add_argument("--state", type=Path, help="state file (key, certificate, log); default: in memory")
    sim.add_argument("--device-id", help="id of a new device (default: sim-<random>)")
    sim.add_argument("--model", default="ecny-sim-1", help="model name a new device reports")
    sim.add_argument("--baudrate", type=int, default=115_200)
    sim.set_defaults(run=run_command)


def run_command(args: argparse.Namespace) -> int:
    if args.state is not None:
        device = SimulatedDevice.open(args.state, args.device_id, args.model)
    else:
        device = SimulatedDevice.create(args.device_id, args.model)
    port: Port
    if args.pty:
        pty_port = PtyPort()
        port, path = pty_port, pty_port.path
    else:
        port, path = open_port(args.port, args.baudrate), args.port
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"device-sim {device.state.device_id} on {path}", flush=True)
    print(json.dumps({"device_id": device.state.device_id, "path": path,
                      "public_key_pem": offline.pem_from_point(device.point)}), file=sys.stderr, flush=True)
    try:
        serve(port, device, stop)
    except KeyboardInterrupt:
        pass
    finally:
        port.close()
    return 0
