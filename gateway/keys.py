"""Key records: what the gateway knows of each HSM key (id, label, algorithm, usages, public key),
and its lifecycle state (family, version, status).

The private key lives only in the token, found by CKA_ID = the key id's bytes. The record here
decides what a key may be used for; a request whose operation is not among the key's usages is
refused (403) before the HSM is asked.

Versions: a rotation makes a new key (new id, new CKA_ID, new COSE kid) in the same *family*. Every
version keeps its row, so its kid keeps resolving and its signatures keep verifying; only an
``active`` version signs (``retired``: superseded; ``disabled``: stopped by an administrator).
For the usages the gateway picks a key for itself (``ecny``, ``voucher``, ``audit``) exactly one key
is active per usage (table ``key_usage_active``): a new key of such a usage takes it over — a
rotation, never an ambiguity. The key it took it from keeps its status, but no path signs that usage
with it any more (unless a ``*.key_id`` setting pins its family): ``active_for`` says which usages a
key signs now.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from eth_hash.auto import keccak

from gateway import clock
from gateway.errors import (
    AlreadyExists,
    GatewayError,
    KeyDisabled,
    KeyNotFound,
    KeyRetired,
    KeyUsageNotAllowed,
    RawKeyNotExclusive,
    RawUsageNotExclusive,
    ValidationFailed,
    VerificationUnsupported,
)
from gateway.ledger.store import Tx
from gateway.schemes import cose
from gateway.schemes.evm.values import checksum
from gateway.signing import Algorithm, Signer, cryptography_public_key, signing_input, verify

if TYPE_CHECKING:  # an annotation only: key records (and gateway.operations through them) load no HSM code
    from gateway.hsm.profile import HsmProfile


class Usage(StrEnum):
    ECNY = "ecny"
    VOUCHER = "voucher"
    EVM = "evm"
    AUDIT = "audit"
    RAW = "raw"
    REPORT = "report"  # signed daily risk reports for a regulator (gateway.monitor.report)
    MESSAGE = "message"  # EIP-191 personal messages (personal_sign, eth_sign); secp256k1 only
    ATTEST = "attest"


class KeyStatus(StrEnum):
    ACTIVE = "active"  # signs (and verifies)
    RETIRED = "retired"  # superseded by a newer version or key of its usage: verifies only
    DISABLED = "disabled"  # stopped by an administrator: signs nothing; its signatures still verify


#: Usages the gateway picks the key for itself (transfer envelopes, device certificates and vouchers,
#: audit checkpoints, signed risk reports, trade-finance attestations and fingerprint batches): exactly one
#: active key each. ``evm`` and ``raw`` keys are named by the request.
SINGLE_ACTIVE_USAGES: frozenset[Usage] = frozenset({Usage.ECNY, Usage.VOUCHER, Usage.AUDIT, Usage.REPORT,
                                                    Usage.ATTEST})

#: Algorithms the gateway can generate and use (SM2 only on a GM HSM profile that lists it).
GENERATABLE = (Algorithm.ECDSA_P256, Algorithm.ECDSA_SECP256K1, Algorithm.ED25519, Algorithm.SM2)

#: Usages that make sense per algorithm: EVM and EIP-191 messages need secp256k1; COSE signing (envelopes,
#: vouchers, checkpoints, risk reports) needs P-256, Ed25519 or SM2.
_USAGES: dict[Algorithm, frozenset[Usage]] = {
    Algorithm.ECDSA_P256: frozenset({Usage.ECNY, Usage.VOUCHER, Usage.AUDIT, Usage.RAW, Usage.REPORT,
                                    Usage.ATTEST}),
    Algorithm.ED25519: frozenset({Usage.ECNY, Usage.VOUCHER, Usage.AUDIT, Usage.RAW, Usage.REPORT,
                                    Usage.ATTEST}),
    Algorithm.SM2: frozenset({Usage.ECNY, Usage.VOUCHER, Usage.AUDIT, Usage.RAW, Usage.REPORT,
                                    Usage.ATTEST}),
    Algorithm.ECDSA_SECP256K1: frozenset({Usage.EVM, Usage.RAW, Usage.MESSAGE}),
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
    family_id: str = ""
    """The key id of the family's first version ("" on a record not yet stored: its own id)."""
    version: int = 1
    status: KeyStatus = KeyStatus.ACTIVE
    status_changed_at: str | None = None
    origin: str = "generated"
    """``generated`` inside the HSM by the gateway, or ``adopted`` (an existing HSM key, by URI)."""
    active_for: frozenset[Usage] = frozenset()
    """The single-active usages this key is the active key of when it was read (``key_usage_active``)."""

    @property
    def family(self) -> str:
        return self.family_id or self.key_id

    def require_signing(self) -> None:
        """Raises KeyRetired or KeyDisabled unless this version may sign."""
        if self.status is KeyStatus.RETIRED:
            raise superseded(self.key_id, self.version, self.family)
        if self.status is KeyStatus.DISABLED:
            raise KeyDisabled(f"key {self.key_id} was disabled at {self.status_changed_at}; it signs nothing")

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
            "family_id": self.family,
            "version": self.version,
            "status": self.status.value,
            "status_changed_at": self.status_changed_at,
            "origin": self.origin,
            "active_for": sorted(u.value for u in self.active_for),
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


def _record(row: Any, active_for: frozenset[Usage] = frozenset()) -> KeyRecord:
    return KeyRecord(
        key_id=row["key_id"],
        label=row["label"],
        algorithm=Algorithm(row["algorithm"]),
        usages=frozenset(Usage(u) for u in row["usages"].split(",") if u),
        public_key=bytes(row["public_key"]),
        created_at=row["created_at"],
        created_by=row["created_by"],
        family_id=row["family_id"] or row["key_id"],  # a row written around the gateway may have none
        version=int(row["version"]),
        status=KeyStatus(row["status"]),
        status_changed_at=row["status_changed_at"],
        origin=row["origin"],
        active_for=active_for,
    )


def insert_key(tx: Tx, record: KeyRecord) -> dict[str, str | None]:
    """Store ``record`` and make it the active key of each of its single-active usages.

    Returns:
        usage → the key id it was taken over from (None where no key had it), for the audit entry.
    Raises:
        AlreadyExists: the label or the key id is taken.
    """
    if tx.fetchone("SELECT 1 FROM keys WHERE key_id = ?", (record.key_id,)):
        raise AlreadyExists(f"key {record.key_id} is registered already")
    if tx.fetchone("SELECT 1 FROM keys WHERE label = ?", (record.label,)):
        raise AlreadyExists(f"a key labelled {record.label!r} exists")
    tx.execute(
        "INSERT INTO keys (key_id, label, algorithm, usages, public_key, created_at, created_by, family_id, version, "
        "status, status_changed_at, origin) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            record.key_id,
            record.label,
            record.algorithm.value,
            ",".join(sorted(u.value for u in record.usages)),
            record.public_key,
            record.created_at,
            record.created_by,
            record.family,
            record.version,
            record.status.value,
            record.status_changed_at,
            record.origin,
        ),
    )
    return _take_over_usages(tx, record)


def _take_over_usages(tx: Tx, record: KeyRecord) -> dict[str, str | None]:
    """Point each single-active usage of ``record`` at it. The key it was taken from keeps its status:
    nothing signs that usage with it any more unless a setting pins it (retiring it would stop a
    gateway whose ``*.key_id`` names it — the outage this rule exists to prevent)."""
    taken: dict[str, str | None] = {}
    for usage in sorted(record.usages & SINGLE_ACTIVE_USAGES):
        tx.lock(f"key-usage:{usage.value}")
        row = tx.fetchone("SELECT key_id FROM key_usage_active WHERE usage = ?", (usage.value,))
        previous = None if row is None else str(row["key_id"])
        tx.execute(
            "INSERT INTO key_usage_active (usage, key_id, since) VALUES (?, ?, ?) "
            "ON CONFLICT (usage) DO UPDATE SET key_id = excluded.key_id, since = excluded.since",
            (usage.value, record.key_id, record.created_at),
        )
        taken[usage.value] = previous
    return taken


def set_status(tx: Tx, key_id: str, status: KeyStatus, only_from: KeyStatus | None = None) -> None:
    """Change a version's status (``only_from``: only if it is in that status now)."""
    if only_from is None:
        tx.execute("UPDATE keys SET status = ?, status_changed_at = ? WHERE key_id = ?",
                   (status.value, clock.now_iso(), key_id))
    else:
        tx.execute("UPDATE keys SET status = ?, status_changed_at = ? WHERE key_id = ? AND status = ?",
                   (status.value, clock.now_iso(), key_id, only_from.value))


def family_versions(tx: Tx, family_id: str) -> list[KeyRecord]:
    """Every version of a key family, oldest first."""
    return [_record(row) for row in tx.fetchall(
        "SELECT * FROM keys WHERE family_id = ? OR key_id = ? ORDER BY version", (family_id, family_id))]


def latest_version(tx: Tx, key_id: str) -> KeyRecord:
    """The newest version of the family ``key_id`` (any of its versions) belongs to. Raises KeyNotFound."""
    return family_versions(tx, get_key(tx, key_id).family)[-1]


def active_key_id(tx: Tx, usage: Usage) -> str | None:
    """The key that signs a single-active ``usage``, or None while there is none."""
    row = tx.fetchone("SELECT key_id FROM key_usage_active WHERE usage = ?", (usage.value,))
    return None if row is None else str(row["key_id"])


KEY_COLUMNS = ("key_id", "label", "algorithm", "usages", "public_key", "created_at", "created_by", "family_id",
               "version", "status", "status_changed_at", "origin")


def active_key_query(dialect: str) -> str:
    """One SELECT of the active key of a single-active usage (its one parameter), with ``active_for``: the
    usages it is active for. A statement of its own (:func:`active_key_in`), or a CTE that rides along
    with another statement (PostgreSQL's transfer: :meth:`gateway.wallets.accounts.Wallets.transfer_in`)."""
    together = "string_agg(o.usage, ',')" if dialect == "postgresql" else "group_concat(o.usage, ',')"
    return (f"SELECT {', '.join('k.' + column for column in KEY_COLUMNS)}, "
            f"(SELECT {together} FROM key_usage_active o WHERE o.key_id = k.key_id) AS active_for "
            "FROM key_usage_active a JOIN keys k ON k.key_id = a.key_id WHERE a.usage = ?")


def active_key_of(row: Any, prefix: str = "") -> KeyRecord | None:
    """The record of a row of :func:`active_key_query` (its columns named ``prefix`` + column), or None when
    the usage has no active key."""
    if row[prefix + "key_id"] is None:
        return None
    columns = {column: row[prefix + column] for column in (*KEY_COLUMNS, "active_for")}
    return _record(columns, frozenset(Usage(u) for u in (columns["active_for"] or "").split(",") if u))


def active_key_in(tx: Tx, usage: Usage) -> KeyRecord | None:
    """The active key of a single-active ``usage``, in one statement (one round trip inside a PostgreSQL
    transaction, where :func:`active_key_id` and :func:`get_key` take three)."""
    row = tx.fetchone(active_key_query(tx.dialect), (usage.value,))
    return None if row is None else active_key_of(row)


def active_usages(tx: Tx, key_id: str) -> list[str]:
    """The single-active usages ``key_id`` is the active key of."""
    return sorted(str(row["usage"]) for row in
                  tx.fetchall("SELECT usage FROM key_usage_active WHERE key_id = ?", (key_id,)))


def label_taken(tx: Tx, label: str) -> bool:
    return tx.fetchone("SELECT 1 FROM keys WHERE label = ?", (label,)) is not None


def get_key(tx: Tx, key_id: str) -> KeyRecord:
    row = tx.fetchone("SELECT * FROM keys WHERE key_id = ?", (key_id,))
    if row is None:
        raise KeyNotFound(f"no key {key_id}")
    return _record(row, frozenset(Usage(u) for u in active_usages(tx, key_id)))


SIGNING_REFUSALS = (KeyNotFound, KeyUsageNotAllowed, KeyRetired, KeyDisabled)
"""What a key that may not sign (any more) is refused with: gone, another usage, retired, disabled."""


def signing_refusals_in(tx: Tx, wanted: Sequence[tuple[str, Usage]]) -> list[GatewayError | None]:
    """For each (key id, usage) of ``wanted``: None if that key may sign for that usage as it stands in
    ``tx`` — the write transaction that releases what it signed — else the refusal (KeyNotFound,
    KeyUsageNotAllowed, RawKeyNotExclusive, KeyRetired, KeyDisabled). A disable or rotation is then either
    committed before this read (and refuses) or after the release: none slips between them. One read
    for all of them (a group commit's entries share it); on PostgreSQL their rows are locked (``FOR
    SHARE``) until ``tx`` ends, so a status change waits for the release; SQLite serializes writers."""
    ids = sorted({key_id for key_id, _ in wanted})
    if not ids:
        return []
    share = " FOR SHARE" if tx.dialect == "postgresql" else ""
    rows = tx.fetchall(f"SELECT * FROM keys WHERE key_id IN ({', '.join('?' * len(ids))}){share}", tuple(ids))
    records = {str(row["key_id"]): _record(row, frozenset()) for row in rows}
    refusals: list[GatewayError | None] = []
    for key_id, usage in wanted:
        record = records.get(key_id)
        try:
            if record is None:
                raise KeyNotFound(f"no key {key_id}")
            record.require(usage)
            record.require_signing()
        except SIGNING_REFUSALS as refusal:
            refusals.append(refusal)
        else:
            refusals.append(None)
    return refusals


def signing_keys_with_usage(tx: Tx, usage: Usage) -> list[KeyRecord]:
    """The keys of ``usage`` that may sign now (status active), oldest first: retired and disabled
    versions are never offered (``eth_accounts``) nor chosen by address."""
    return [key for key in list_keys(tx) if usage in key.usages and key.status is KeyStatus.ACTIVE]


def list_keys(tx: Tx) -> list[KeyRecord]:
    active: dict[str, set[Usage]] = {}
    for pointer in tx.fetchall("SELECT usage, key_id FROM key_usage_active"):
        active.setdefault(str(pointer["key_id"]), set()).add(Usage(pointer["usage"]))
    return [_record(row, frozenset(active.get(row["key_id"], ())))
            for row in tx.fetchall("SELECT * FROM keys ORDER BY created_at, key_id")]


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


def key_for_usage(tx: Tx, usage: Usage, configured: str | None, setting: str) -> KeyRecord:
    """The key that signs ``usage`` for the institution: the newest version of the configured key's
    family, else the usage's one active key (a second key of a usage takes it over: never "the first
    of several", never an ambiguity).

    Raises:
        KeyNotFound: none configured and no key has the usage yet (or the configured one is unknown).
        KeyUsageNotAllowed: the configured key does not have the usage.
        KeyDisabled: the key that would sign was disabled (rotate it, or generate a key of the usage).
    """
    if configured:
        key = latest_version(tx, configured)
        key.require(usage)
    else:
        active = active_key_in(tx, usage)
        if active is None:
            raise no_key_for(usage)
        key = active
    return may_sign_for(key, usage, setting)


def may_sign_for(key: KeyRecord, usage: Usage, setting: str) -> KeyRecord:
    """``key``, when it may sign for ``usage`` now.

    Raises:
        KeyDisabled: it was disabled (rotate it, or generate a key of the usage); KeyRetired and the rest
            of :meth:`KeyRecord.require_signing`.
    """
    refusal = signing_refusal(usage, setting, key.key_id, key.status, key.status_changed_at, key.version, key.family)
    if refusal is not None:
        raise refusal
    return key


def signing_refusal(usage: Usage, setting: str, key_id: str, status: KeyStatus, status_changed_at: str | None,
                    version: int, family: str) -> GatewayError | None:
    """Why a key in this state may not sign for ``usage`` (:func:`may_sign_for`), or None when it may; from
    its fields alone, for a check that ran in the database (PostgreSQL's transfer)."""
    if status is KeyStatus.DISABLED:
        return KeyDisabled(f"the {usage.value} key {key_id} was disabled at {status_changed_at}: rotate it "
                           f"or generate a new {usage.value} key ({setting} pins a key family)")
    if status is KeyStatus.RETIRED:
        return superseded(key_id, version, family)
    return None


def superseded(key_id: str, version: int, family: str) -> KeyRetired:
    """A retired version was asked to sign."""
    return KeyRetired(f"key {key_id} (version {version} of {family}) was superseded; "
                      "it only verifies: sign with the family's active version")


def no_key_for(usage: Usage) -> KeyNotFound:
    """No key has ``usage`` (and none is configured)."""
    return KeyNotFound(f"no key with usage {usage.value!r}; generate one")


def make_record(
    key_id: str, label: str, algorithm: Algorithm, usages: frozenset[Usage], public_key: bytes, actor: str,
    family_id: str = "", version: int = 1, origin: str = "generated",
) -> KeyRecord:
    return KeyRecord(key_id, label, algorithm, usages, public_key, clock.now_iso(), actor,
                     family_id=family_id or key_id, version=version, origin=origin)


# --- public keys (verification is in gateway.signing, with `cryptography`, never the HSM) ------------


def public_key_pem(algorithm: Algorithm, public_key: bytes) -> str:
    """SubjectPublicKeyInfo PEM; for SM2 (no support in `cryptography`) a hex point in a PEM-like block."""
    key = cryptography_public_key(algorithm, public_key)
    if key is None:
        body = public_key.hex()
        return f"-----BEGIN SM2 PUBLIC KEY POINT-----\n{body}\n-----END SM2 PUBLIC KEY POINT-----\n"
    pem: bytes = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem.decode()


def verify_with_key(record: KeyRecord, data: bytes, is_message: bool, signature: bytes) -> bool:
    """Check ``signature`` over ``data`` with the stored public key, in software (never the HSM), for
    any version and status.

    ``data`` is a digest (``is_message`` False) or a message the gateway hashes the way it signs
    messages (SHA-256 for P-256, Keccak-256 for secp256k1; Ed25519 signs the message itself, so for it
    both mean the signed bytes). An ECDSA signature is raw r‖s (64 bytes), r‖s‖v (65, EVM) or DER.

    Raises:
        VerificationUnsupported: SM2 (no software implementation here).
        ValidationFailed: an ECDSA digest that is not 32 bytes.
    """
    if record.algorithm is Algorithm.SM2:
        raise VerificationUnsupported("SM2 signatures cannot be verified in software here; verify them with "
                                      "an SM2 implementation and the key's public point")
    try:
        cryptography_public_key(record.algorithm, record.public_key)
    except ValueError:  # a key table row written around the gateway: nothing verifies against it
        return False
    if record.algorithm is Algorithm.ED25519:
        return verify(record.algorithm, record.public_key, data, signature)
    digest = signing_input(record.algorithm, data) if is_message else data
    if len(digest) != 32:
        raise ValidationFailed(f"an ECDSA digest is 32 bytes; got {len(digest)} (send the message as 'message')")
    raw = _raw_ecdsa(signature)
    return raw is not None and verify(record.algorithm, record.public_key, digest, raw)


def _raw_ecdsa(signature: bytes) -> bytes | None:
    """r‖s of a raw, r‖s‖v or DER ECDSA signature; None if it is none of them."""
    if len(signature) == 64:
        return signature
    if len(signature) == 65:
        return signature[:64]
    try:
        r, s = decode_dss_signature(signature)
    except ValueError:
        return None
    if not (0 <= r < 2**256 and 0 <= s < 2**256):
        return None
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def evm_address(public_key: bytes) -> str:
    """EIP-55 address of an uncompressed secp256k1 point."""
    return checksum(keccak(public_key[1:])[-20:])


async def sign1_with_profile(signer: Signer, profile: HsmProfile, key: KeyRecord, payload: bytes) -> bytes:
    """A tagged COSE_Sign1 over ``payload`` signed by ``key`` in the HSM, with the COSE algorithm number
    ``profile`` gives the key's algorithm (:func:`gateway.schemes.cose.sign1` takes only the number)."""
    alg = cose.cose_alg(key.algorithm, profile.cose_alg(key.algorithm))
    return await cose.sign1(signer, alg, key.key_id, key.algorithm, payload)


class KeyDirectory:
    """Key records cached in memory, for what never changes once written: id, algorithm, usages and
    public key — enough to resolve a kid and verify. The status changes (rotation, disable), and
    another process may change it: :meth:`for_signing` reads it fresh from the store every time;
    :meth:`to_sign` trusts the cache and leaves the check to the releasing transaction."""

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

    async def to_sign(self, database: Any, key_id: str, usage: Usage) -> KeyRecord:
        """The record of ``key_id`` as cached (read on a miss), checked for ``usage`` and for signing
        *as cached*: a status changed since is caught by :func:`signing_refusals_in`, which the caller
        must run in the transaction that releases the signature. For a signature whose release is a
        write anyway (a raw signature's audit entry), this saves a read before the HSM is asked.

        Raises:
            KeyNotFound, KeyUsageNotAllowed, RawKeyNotExclusive, KeyRetired, KeyDisabled.
        """
        record = await self.get(database, key_id)
        record.require(usage)
        record.require_signing()
        return record

    def forget(self, key_id: str) -> None:
        """Drop ``key_id``'s cached record: the next look-up reads it (its status changed)."""
        self._records.pop(key_id, None)

    async def for_signing(self, database: Any, key_id: str, usage: Usage) -> KeyRecord:
        """The record of ``key_id`` read fresh, checked for ``usage`` and for signing.

        Raises:
            KeyNotFound, KeyUsageNotAllowed, RawKeyNotExclusive, KeyRetired, KeyDisabled.
        """
        record: KeyRecord = await database.read(lambda tx: get_key(tx, key_id))
        if record.raw_not_exclusive and key_id not in self._records:
            flag_raw_not_exclusive(record)
        self._records[key_id] = record
        record.require(usage)
        record.require_signing()
        return record

