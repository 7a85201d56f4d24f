"""Offline formats (docs/spec.md §6, §8): what the gateway, hard wallets and their payees sign.

Every record is a COSE_Sign1 (:mod:`gateway.schemes.cose`) over a canonical CBOR map with a format
version ``v`` and a ``type``, so that a signature over one kind of record can never pass for another:

- ``certificate`` (HSM, ``voucher`` key): {device_id, wallet_id, pub: COSE_Key, tier,
  caps: {per_payment, balance, payments_per_sync}, iat, exp}
- ``voucher`` (HSM, ``voucher`` key): {device_id, load_seq, amount, iat, exp} — authorises the
  device to add ``amount`` to its offline balance once, before ``exp``
- ``payment`` (the payer device's own key): {payer, counter, payee, amount, ts, prev}, ``prev``
  being the hash of the payer's previous payment (:data:`GENESIS` before the first)
- ``export`` (device key): the device's log since its last acknowledgement
- ``unload`` (device key): the device's final statement
- ``ack`` (HSM, ``voucher`` key): the gateway has recorded the device's log up to a counter
- ``endorsement`` (HSM, the outgoing ``voucher`` key): {old: COSE_Key, new: COSE_Key, iat} — the voucher
  key a device pins names its successor; a certified device takes a certificate from another issuer
  only through a chain of these from the one it pins (:func:`endorsed`)

Times are milliseconds since the Unix epoch; amounts are integers in fen. The hash of a payment —
its identity, and what the next payment's ``prev`` names — is SHA-256 of the payment's payload
bytes (not of the whole COSE structure: an ECDSA signature is randomised, the payment is not).

Parsers take bytes from outside and raise :class:`gateway.errors.OfflineFormatError` — only that —
for anything that is not exactly the format. Pure: no I/O, no HTTP framework.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import cbor2
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from gateway.errors import OfflineFormatError
from gateway.schemes.cose import COSE_SIGN1_TAG, HEADER_ALG, HEADER_KID, assemble, protected_header, sig_structure
from gateway.signing import Algorithm, verify

FORMAT_VERSION = 1
GENESIS = bytes(32)
"""``prev`` of a device's first payment."""
HASH_BYTES = 32
ES256 = -7
MAX_UINT = 2**63 - 1
DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{2,63}$")
WALLET_ID = re.compile(r"^[0-9]{16}$")


def record_hash(payload: bytes) -> bytes:
    """SHA-256 of a record's payload bytes: a payment's identity and its successor's ``prev``."""
    return hashlib.sha256(payload).digest()


def encode(claims: dict[str, Any]) -> bytes:
    return cbor2.dumps(claims, canonical=True)


# --- keys ---------------------------------------------------------------------------------------


def cose_key(point: bytes) -> dict[int, Any]:
    """COSE_Key (RFC 9053 §7.1.1) of an uncompressed P-256 point: EC2, ES256, crv P-256, x, y."""
    return {1: 2, 3: ES256, -1: 1, -2: point[1:33], -3: point[33:65]}


def point_from_cose_key(key: Any) -> bytes:
    """The uncompressed point of a P-256 COSE_Key. Raises OfflineFormatError."""
    if not isinstance(key, dict) or key.get(1) != 2 or key.get(-1) != 1:
        raise OfflineFormatError("pub must be an EC2 P-256 COSE_Key")
    x, y = key.get(-2), key.get(-3)
    if not (isinstance(x, bytes) and isinstance(y, bytes) and len(x) == len(y) == 32):
        raise OfflineFormatError("pub has no 32-byte x and y")
    point = b"\x04" + x + y
    check_point(point)
    return point


def check_point(point: bytes) -> None:
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError:
        raise OfflineFormatError("not a point on P-256") from None


def point_from_pem(pem: str) -> bytes:
    """The uncompressed point of a PEM P-256 public key. Raises OfflineFormatError."""
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, TypeError, UnicodeError) as exc:
        raise OfflineFormatError(f"public_key_pem is not a PEM public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise OfflineFormatError("public_key_pem must be a P-256 (secp256r1) key")
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def pem_from_point(point: bytes) -> str:
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    pem: bytes = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem.decode()


# --- COSE for device keys (software here; a secure element on a real device) --------------------


def device_sign1(private_key: ec.EllipticCurvePrivateKey, kid: bytes, payload: bytes) -> bytes:
    """A tagged ES256 COSE_Sign1 over ``payload`` with a `cryptography` private key."""
    protected = protected_header(ES256, kid)
    der = private_key.sign(sig_structure(protected, payload), ec.ECDSA(hashes.SHA256()))
    r, s = utils.decode_dss_signature(der)
    return assemble(protected, payload, r.to_bytes(32, "big") + s.to_bytes(32, "big"))


_MAPS = (dict, cbor2.frozendict)


@functools.lru_cache(maxsize=4096)
def _protected(protected: bytes) -> tuple[int, bytes]:
    """(alg, kid) of a protected header; cached: every record a device signs has the same one."""
    try:
        header = cbor2.loads(protected)
    except Exception:  # cbor2 raises several types on garbage
        raise OfflineFormatError("protected header is not CBOR") from None
    if not isinstance(header, Mapping):
        raise OfflineFormatError("protected header must be a map")
    alg, kid = header.get(HEADER_ALG), header.get(HEADER_KID, b"")
    if not isinstance(alg, int) or isinstance(alg, bool) or not isinstance(kid, bytes):
        raise OfflineFormatError("protected header needs an integer alg and a byte-string kid")
    return alg, kid


class Envelope(NamedTuple):
    """A COSE_Sign1 taken apart (what :class:`gateway.schemes.cose.Sign1` holds, as a cheap tuple)."""

    protected: bytes
    alg: int
    kid: bytes
    payload: bytes
    signature: bytes

    def to_be_signed(self) -> bytes:
        """SHA-256 of the Sig_structure: what an ES256 signature signs."""
        return hashlib.sha256(sig_structure(self.protected, self.payload)).digest()


def open_envelope(envelope: Any) -> Envelope:
    """Take a (tagged or untagged) COSE_Sign1 apart. Raises OfflineFormatError, nothing else.

    Written here rather than with :func:`gateway.schemes.cose.parse` because cbor2 6 decodes the
    array inside the tag as a tuple holding a ``frozendict``, and because this runs once per payment.
    """
    if not isinstance(envelope, bytes):
        raise OfflineFormatError("a signed record must be a byte string")
    try:
        item = cbor2.loads(envelope)
    except Exception:  # cbor2 raises several types on garbage
        raise OfflineFormatError("signed record is not CBOR") from None
    if isinstance(item, cbor2.CBORTag):
        if item.tag != COSE_SIGN1_TAG:
            raise OfflineFormatError(f"CBOR tag {item.tag} is not COSE_Sign1 (18)")
        item = item.value
    if not isinstance(item, list | tuple) or len(item) != 4:
        raise OfflineFormatError("COSE_Sign1 must be an array of 4 items")
    protected, unprotected, payload, signature = item
    if not (type(protected) is bytes and type(payload) is bytes and type(signature) is bytes
            and (type(unprotected) in _MAPS or isinstance(unprotected, Mapping))):
        raise OfflineFormatError("COSE_Sign1 items have the wrong types")
    alg, kid = _protected(protected)
    return Envelope(protected, alg, kid, payload, signature)


def verify_es256(message: Envelope, point: bytes) -> bool:
    """True if ``message`` is ES256 and its signature verifies with the P-256 ``point``."""
    if message.alg != ES256 or len(message.signature) != 64:
        return False
    return verify(Algorithm.ECDSA_P256, point, message.to_be_signed(), message.signature)


# --- field checks -------------------------------------------------------------------------------


def claims_of(payload: bytes, kind: str) -> dict[str, Any]:
    """Decode a payload and check its version and type. Raises OfflineFormatError."""
    try:
        claims = cbor2.loads(payload)
    except Exception as exc:  # cbor2 raises several types on garbage
        raise OfflineFormatError(f"{kind} payload is not CBOR: {exc}") from None
    if not isinstance(claims, dict):
        raise OfflineFormatError(f"{kind} payload must be a map")
    if claims.get("v") != FORMAT_VERSION or claims.get("type") != kind:
        raise OfflineFormatError(f"not a version-{FORMAT_VERSION} {kind}")
    return claims


def uint(claims: dict[str, Any], key: str, minimum: int = 0) -> int:
    value = claims.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= MAX_UINT:
        raise OfflineFormatError(f"{key} must be an integer from {minimum} to 2**63-1")
    return value


def text(claims: dict[str, Any], key: str, pattern: re.Pattern[str] = DEVICE_ID) -> str:
    value = claims.get(key)
    if not isinstance(value, str) or not pattern.match(value):
        raise OfflineFormatError(f"{key} is missing or malformed")
    return value


def digest(claims: dict[str, Any], key: str) -> bytes:
    value = claims.get(key)
    if not isinstance(value, bytes) or len(value) != HASH_BYTES:
        raise OfflineFormatError(f"{key} must be a {HASH_BYTES}-byte hash")
    return value


def byte_list(claims: dict[str, Any], key: str) -> list[bytes]:
    value = claims.get(key)
    if not isinstance(value, list | tuple) or not all(isinstance(item, bytes) for item in value):
        raise OfflineFormatError(f"{key} must be an array of byte strings")
    return list(value)


# --- records ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Caps:
    """A device's offline limits, fixed in its certificate."""

    per_payment: int
    balance: int
    payments_per_sync: int

    def claims(self) -> dict[str, int]:
        return {"per_payment": self.per_payment, "balance": self.balance, "payments_per_sync": self.payments_per_sync}


@dataclass(frozen=True)
class Certificate:
    device_id: str
    wallet_id: str
    pub: bytes  # uncompressed P-256 point
    tier: int
    caps: Caps
    iat: int
    exp: int

    def payload(self) -> bytes:
        return encode({"v": FORMAT_VERSION, "type": "certificate", "device_id": self.device_id,
                       "wallet_id": self.wallet_id, "pub": cose_key(self.pub), "tier": self.tier,
                       "caps": self.caps.claims(), "iat": self.iat, "exp": self.exp})


def parse_certificate(payload: bytes) -> Certificate:
    claims = claims_of(payload, "certificate")
    caps = claims.get("caps")
    if not isinstance(caps, dict):
        raise OfflineFormatError("caps must be a map")
    return Certificate(
        device_id=text(claims, "device_id"), wallet_id=text(claims, "wallet_id", WALLET_ID),
        pub=point_from_cose_key(claims.get("pub")), tier=uint(claims, "tier", 1),
        caps=Caps(uint(caps, "per_payment"), uint(caps, "balance"), uint(caps, "payments_per_sync")),
        iat=uint(claims, "iat"), exp=uint(claims, "exp"),
    )


@dataclass(frozen=True)
class Voucher:
    device_id: str
    load_seq: int
    amount: int
    iat: int
    exp: int

    def claims(self) -> dict[str, Any]:
        return {"v": FORMAT_VERSION, "type": "voucher", "device_id": self.device_id, "load_seq": self.load_seq,
                "amount": self.amount, "iat": self.iat, "exp": self.exp}

    def payload(self) -> bytes:
        return encode(self.claims())


def parse_voucher(payload: bytes) -> Voucher:
    claims = claims_of(payload, "voucher")
    return Voucher(text(claims, "device_id"), uint(claims, "load_seq", 1), uint(claims, "amount", 1),
                   uint(claims, "iat"), uint(claims, "exp"))


@dataclass(frozen=True)
class Endorsement:
    """The voucher key's hand-over, signed by the outgoing key ``old``: ``new`` issues from now on."""

    old: bytes  # uncompressed P-256 points
    new: bytes
    iat: int

    def payload(self) -> bytes:
        return encode({"v": FORMAT_VERSION, "type": "endorsement", "old": cose_key(self.old),
                       "new": cose_key(self.new), "iat": self.iat})


def parse_endorsement(payload: bytes) -> Endorsement:
    claims = claims_of(payload, "endorsement")
    return Endorsement(point_from_cose_key(claims.get("old")), point_from_cose_key(claims.get("new")),
                       uint(claims, "iat"))


def endorsement_path(pinned: bytes, endorsements: list[bytes]) -> list[bytes] | None:
    """The keys ``endorsements`` (COSE_Sign1 envelopes, oldest first) lead through from the ``pinned`` issuer
    key, ``pinned`` first and the key reached last; each endorsement must be signed by the key reached so
    far and name it as ``old``. None when one is not, or is malformed: such a chain leads nowhere."""
    path = [pinned]
    for envelope in endorsements:
        try:
            message = open_envelope(envelope)
            endorsement = parse_endorsement(message.payload)
        except OfflineFormatError:
            return None
        if endorsement.old != path[-1] or not verify_es256(message, path[-1]):
            return None
        path.append(endorsement.new)
    return path


def endorsed(pinned: bytes, issuer: bytes, endorsements: list[bytes]) -> bool:
    """Whether ``endorsements`` lead from the ``pinned`` issuer key to ``issuer`` (:func:`endorsement_path`)."""
    path = endorsement_path(pinned, endorsements)
    return path is not None and path[-1] == issuer


class Payment(NamedTuple):
    """An offline payment's claims (a tuple: reconciliation makes one per payment, so it must be cheap)."""

    payer: str
    counter: int
    payee: str
    amount: int
    ts: int
    prev: bytes

    def payload(self) -> bytes:
        return encode({"v": FORMAT_VERSION, "type": "payment", "payer": self.payer, "counter": self.counter,
                       "payee": self.payee, "amount": self.amount, "ts": self.ts, "prev": self.prev})


def parse_payment(payload: bytes) -> Payment:
    """The claims of a payment's payload. Raises OfflineFormatError. Written out (rather than with the
    field helpers above) because reconciliation calls it once per payment record."""
    try:
        claims = cbor2.loads(payload)
    except Exception:  # cbor2 raises several types on garbage
        raise OfflineFormatError("payment payload is not CBOR") from None
    if type(claims) is not dict:
        raise OfflineFormatError("payment payload must be a map")
    try:
        version, kind, payer, counter = claims["v"], claims["type"], claims["payer"], claims["counter"]
        payee, amount, ts, prev = claims["payee"], claims["amount"], claims["ts"], claims["prev"]
    except KeyError as exc:
        raise OfflineFormatError(f"payment has no {exc.args[0]}") from None
    if version != FORMAT_VERSION or kind != "payment":
        raise OfflineFormatError(f"not a version-{FORMAT_VERSION} payment")
    if type(payer) is not str or type(payee) is not str or not DEVICE_ID.match(payer) or not DEVICE_ID.match(payee):
        raise OfflineFormatError("payer and payee must be device ids")
    if type(counter) is not int or type(amount) is not int or type(ts) is not int \
            or not (1 <= counter <= MAX_UINT and 1 <= amount <= MAX_UINT and 0 <= ts <= MAX_UINT):
        raise OfflineFormatError("counter, amount and ts must be integers in range")
    if type(prev) is not bytes or len(prev) != HASH_BYTES:
        raise OfflineFormatError(f"prev must be a {HASH_BYTES}-byte hash")
    return Payment(payer, counter, payee, amount, ts, prev)


@dataclass(frozen=True)
class LoadRecord:
    """A voucher as the device loaded it: ``at`` is the device's clock when it did."""

    load_seq: int
    amount: int
    exp: int
    at: int


@dataclass(frozen=True)
class LogExport:
    device_id: str
    ts: int
    counter: int  # the device's last payment counter (0: none yet)
    rx: int  # the device's last receipt number
    certificate: bytes
    payments: list[bytes]  # COSE_Sign1 payments the device made since its last ack, in order
    receipts: list[bytes]  # COSE_Sign1 payments it received since its last ack, in order
    loads: list[LoadRecord]

    def payload(self) -> bytes:
        return encode({"v": FORMAT_VERSION, "type": "export", "device_id": self.device_id, "ts": self.ts,
                       "counter": self.counter, "rx": self.rx, "certificate": self.certificate,
                       "payments": self.payments, "receipts": self.receipts,
                       "loads": [{"load_seq": r.load_seq, "amount": r.amount, "exp": r.exp, "at": r.at}
                                 for r in self.loads]})


def parse_export(payload: bytes) -> LogExport:
    claims = claims_of(payload, "export")
    certificate = claims.get("certificate")
    if not isinstance(certificate, bytes):
        raise OfflineFormatError("certificate must be a byte string")
    loads_value = claims.get("loads")
    if not isinstance(loads_value, list | tuple) or not all(isinstance(item, dict) for item in loads_value):
        raise OfflineFormatError("loads must be an array of maps")
    loads = [LoadRecord(uint(item, "load_seq", 1), uint(item, "amount", 1), uint(item, "exp"), uint(item, "at"))
             for item in loads_value]
    return LogExport(text(claims, "device_id"), uint(claims, "ts"), uint(claims, "counter"), uint(claims, "rx"),
                     certificate, byte_list(claims, "payments"), byte_list(claims, "receipts"), loads)


@dataclass(frozen=True)
class Statement:
    """A device's final statement at unload: it has stopped spending."""

    device_id: str
    counter: int
    last: bytes  # hash of its last payment (GENESIS if none)
    rx: int
    loaded: int
    spent: int
    remaining: int
    ts: int

    def payload(self) -> bytes:
        return encode({"v": FORMAT_VERSION, "type": "unload", "device_id": self.device_id, "counter": self.counter,
                       "last": self.last, "rx": self.rx, "loaded": self.loaded, "spent": self.spent,
                       "remaining": self.remaining, "ts": self.ts})


def parse_statement(payload: bytes) -> Statement:
    claims = claims_of(payload, "unload")
    return Statement(text(claims, "device_id"), uint(claims, "counter"), digest(claims, "last"), uint(claims, "rx"),
                     uint(claims, "loaded"), uint(claims, "spent"), uint(claims, "remaining"), uint(claims, "ts"))


@dataclass(frozen=True)
class Ack:
    """The gateway recorded the device's export: it may forget payments up to ``counter`` and
    receipts up to ``rx``."""

    device_id: str
    counter: int
    rx: int
    export: bytes  # hash of the export's payload
    ts: int

    def payload(self) -> bytes:
        return encode({"v": FORMAT_VERSION, "type": "ack", "device_id": self.device_id, "counter": self.counter,
                       "rx": self.rx, "export": self.export, "ts": self.ts})


def parse_ack(payload: bytes) -> Ack:
    claims = claims_of(payload, "ack")
    return Ack(text(claims, "device_id"), uint(claims, "counter"), uint(claims, "rx"), digest(claims, "export"),
               uint(claims, "ts"))
