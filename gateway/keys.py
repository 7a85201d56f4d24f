"""Key records: what the gateway knows of each HSM key (id, label, algorithm, usages, public key).

The private key lives only in the token, found by CKA_ID = the key id's bytes. The record here
decides what a key may be used for; a request whose operation is not among the key's usages is
refused (403) before the HSM is asked.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import structlog
from cryptography.hazmat.primitives import serialization
from eth_hash.auto import keccak

from gateway import clock
from gateway.errors import (
    AlreadyExists,
    AmbiguousKey,
    KeyNotFound,
    KeyUsageNotAllowed,
    RawKeyNotExclusive,
    RawUsageNotExclusive,
    ValidationFailed,
)
from gateway.ledger.store import Tx
from gateway.schemes import cose
from gateway.schemes.evm.values import checksum
from gateway.signing import Algorithm, Signer, cryptography_public_key

if TYPE_CHECKING:  # an annotation only: key records (and gateway.operations through them) load no HSM code
    from gateway.hsm.profile import HsmProfile


class Usage(StrEnum):
    ECNY = "ecny"
    VOUCHER = "voucher"
    EVM = "evm"
    AUDIT = "audit"
    RAW = "raw"


#: Algorithms the gateway can generate and use (SM2 only on a GM HSM profile that lists it).
GENERATABLE = (Algorithm.ECDSA_P256, Algorithm.ECDSA_SECP256K1, Algorithm.ED25519, Algorithm.SM2)

#: Usages that make sense per algorithm: EVM needs secp256k1; COSE signing needs P-256, Ed25519 or SM2.
_USAGES: dict[Algorithm, frozenset[Usage]] = {
    Algorithm.ECDSA_P256: frozenset({Usage.ECNY, Usage.VOUCHER, Usage.AUDIT, Usage.RAW}),
    Algorithm.ED25519: frozenset({Usage.ECNY, Usage.VOUCHER, Usage.AUDIT, Usage.RAW}),
    Algorithm.SM2: frozenset({Usage.ECNY, Usage.VOUCHER, Usage.AUDIT, Usage.RAW}),
    Algorithm.ECDSA_SECP256K1: frozenset({Usage.EVM, Usage.RAW}),
}


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    label: str
    algorithm: Algorithm
    usages: frozenset[Usage]
    public_key: bytes
    created_at: str
    created_by: str

    @property
    def raw_not_exclusive(self) -> bool:
        """The record lists ``raw`` next to another usage: no create path makes such a key, so the
        key table was written around the gateway (or before ``raw`` became exclusive)."""
        return Usage.RAW in self.usages and len(self.usages) > 1

    def require(self, usage: Usage) -> None:
        """Raises KeyUsageNotAllowed unless the key has ``usage``; for ``raw``, unless ``raw`` is its
        only usage (RawKeyNotExclusive): a digest signed raw with an ``ecny``, ``voucher``, ``audit``
        or ``evm`` key would be a forged envelope, voucher, checkpoint or transaction."""
        if usage not in self.usages:
            raise KeyUsageNotAllowed(
                f"key {self.key_id} has usages {sorted(self.usages)}; this operation needs {usage.value!r}"
            )
        if usage is Usage.RAW and self.raw_not_exclusive:
            raise RawKeyNotExclusive(
                f"key {self.key_id} lists raw next to {sorted(u.value for u in self.usages - {Usage.RAW})}; "
                "raw signing needs a key whose only usage is raw"
            )

    def document(self) -> dict[str, Any]:
        """The key document of the HTTP API."""
        doc: dict[str, Any] = {
            "key_id": self.key_id,
            "label": self.label,
            "algorithm": self.algorithm.value,
            "usage": sorted(u.value for u in self.usages),
            "public_key_pem": public_key_pem(self.algorithm, self.public_key),
            "created_at": self.created_at,
        }
        if self.algorithm is Algorithm.ECDSA_SECP256K1:
            doc["address"] = evm_address(self.public_key)
        return doc


def new_key_id() -> str:
    return secrets.token_hex(16)


def allowed_usages(algorithm: str) -> set[str]:
    """The usages a key of ``algorithm`` may have."""
    return {usage.value for usage in _USAGES[Algorithm(algorithm)]}


def check_usages(algorithm: Algorithm, usages: frozenset[Usage]) -> None:
    """Raises ValidationFailed for no usage or one that does not fit ``algorithm``, and
    RawUsageNotExclusive for ``raw`` next to another usage."""
    if not usages:
        raise ValidationFailed("a key needs at least one usage")
    if Usage.RAW in usages and len(usages) > 1:
        raise RawUsageNotExclusive(
            f"usage raw signs any digest, so it cannot be combined with "
            f"{sorted(u.value for u in usages - {Usage.RAW})}: generate a separate raw key"
        )
    unfit = usages - _USAGES[algorithm]
    if unfit:
        raise ValidationFailed(
            f"usages {sorted(u.value for u in unfit)} do not fit a {algorithm.value} key "
            f"(allowed: {sorted(u.value for u in _USAGES[algorithm])})"
        )


def _record(row: Any) -> KeyRecord:
    return KeyRecord(
        key_id=row["key_id"],
        label=row["label"],
        algorithm=Algorithm(row["algorithm"]),
        usages=frozenset(Usage(u) for u in row["usages"].split(",") if u),
        public_key=bytes(row["public_key"]),
        created_at=row["created_at"],
        created_by=row["created_by"],
    )


def insert_key(tx: Tx, record: KeyRecord) -> None:
    if tx.fetchone("SELECT 1 FROM keys WHERE label = ?", (record.label,)):
        raise AlreadyExists(f"a key labelled {record.label!r} exists")
    tx.execute(
        "INSERT INTO keys (key_id, label, algorithm, usages, public_key, created_at, created_by) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            record.key_id,
            record.label,
            record.algorithm.value,
            ",".join(sorted(u.value for u in record.usages)),
            record.public_key,
            record.created_at,
            record.created_by,
        ),
    )


def label_taken(tx: Tx, label: str) -> bool:
    return tx.fetchone("SELECT 1 FROM keys WHERE label = ?", (label,)) is not None


def get_key(tx: Tx, key_id: str) -> KeyRecord:
    row = tx.fetchone("SELECT * FROM keys WHERE key_id = ?", (key_id,))
    if row is None:
        raise KeyNotFound(f"no key {key_id}")
    return _record(row)


def list_keys(tx: Tx) -> list[KeyRecord]:
    return [_record(row) for row in tx.fetchall("SELECT * FROM keys ORDER BY created_at, key_id")]


def raw_not_exclusive_keys(tx: Tx) -> list[KeyRecord]:
    """Keys whose record lists ``raw`` next to another usage (see :attr:`KeyRecord.raw_not_exclusive`)."""
    return [key for key in list_keys(tx) if key.raw_not_exclusive]


def flag_raw_not_exclusive(record: KeyRecord) -> None:
    """Log, at error level, a key whose record lists ``raw`` next to another usage. It is refused
    for raw signing; the error asks a person to find out who wrote the key table, and to rotate the
    key if it ever signed raw digests (any of them may be a forged envelope, voucher, checkpoint or
    transaction)."""
    structlog.get_logger("gateway.keys").error(
        "key lists raw next to another usage: refused for raw signing; the key table may have been "
        "rewritten outside the gateway",
        key_id=record.key_id, label=record.label, usages=sorted(u.value for u in record.usages),
    )


def keys_with_usage(tx: Tx, usage: Usage) -> list[KeyRecord]:
    return [key for key in list_keys(tx) if usage in key.usages]


def key_for_usage(tx: Tx, usage: Usage, configured: str | None, setting: str) -> KeyRecord:
    """The key that does ``usage`` for the institution: the configured key id, else the one key with
    that usage — never "the first of several".

    Raises:
        KeyNotFound: none configured and none with the usage (or the configured one is unknown).
        AmbiguousKey: none configured and several have the usage; ``setting`` names the key to set.
        KeyUsageNotAllowed: the configured key does not have the usage.
    """
    if configured:
        key = get_key(tx, configured)
        key.require(usage)
        return key
    candidates = keys_with_usage(tx, usage)
    if not candidates:
        raise KeyNotFound(f"no key with usage {usage.value!r}; generate one")
    if len(candidates) > 1:
        raise AmbiguousKey(f"{len(candidates)} keys have usage {usage.value!r}; set {setting} to choose one")
    return candidates[0]


def make_record(
    key_id: str, label: str, algorithm: Algorithm, usages: frozenset[Usage], public_key: bytes, actor: str
) -> KeyRecord:
    return KeyRecord(key_id, label, algorithm, usages, public_key, clock.now_iso(), actor)


# --- public keys (verification is in gateway.signing, with `cryptography`, never the HSM) ------------


def public_key_pem(algorithm: Algorithm, public_key: bytes) -> str:
    """SubjectPublicKeyInfo PEM; for SM2 (no support in `cryptography`) a hex point in a PEM-like block."""
    key = cryptography_public_key(algorithm, public_key)
    if key is None:
        body = public_key.hex()
        return f"-----BEGIN SM2 PUBLIC KEY POINT-----\n{body}\n-----END SM2 PUBLIC KEY POINT-----\n"
    pem: bytes = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem.decode()


def evm_address(public_key: bytes) -> str:
    """EIP-55 address of an uncompressed secp256k1 point."""
    return checksum(keccak(public_key[1:])[-20:])


async def sign1_with_profile(signer: Signer, profile: HsmProfile, key: KeyRecord, payload: bytes) -> bytes:
    """A tagged COSE_Sign1 over ``payload`` signed by ``key`` in the HSM, with the COSE algorithm number
    ``profile`` gives the key's algorithm (:func:`gateway.schemes.cose.sign1` takes only the number)."""
    alg = cose.cose_alg(key.algorithm, profile.cose_alg(key.algorithm))
    return await cose.sign1(signer, alg, key.key_id, key.algorithm, payload)


class KeyDirectory:
    """Key records cached in memory. Records never change once written (no endpoint edits or deletes
    them), so a record read once stays true; only misses reach the store."""

    def __init__(self) -> None:
        self._records: dict[str, KeyRecord] = {}

    async def get(self, database: Any, key_id: str) -> KeyRecord:
        """The record of ``key_id``. Raises KeyNotFound."""
        record = self._records.get(key_id)
        if record is None:
            record = await database.read(lambda tx: get_key(tx, key_id))
            if record.raw_not_exclusive:
                flag_raw_not_exclusive(record)
            self._records[key_id] = record
        return record

