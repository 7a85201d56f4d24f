"""Key lifecycle shared by the HTTP API and the command line: generate, rotate, disable, adopt.

Each change is recorded with its audit entry in one store transaction. A key of a single-active usage
(``ecny``, ``voucher``, ``audit``) takes that usage over when it is stored, whichever way it came
(generated, rotated or adopted): the usage always has exactly one active key (``gateway.keys``).

A generated or rotated key that takes the ``voucher`` usage over from an active key is *endorsed* by
it: the outgoing key signs the hand-over (:class:`gateway.schemes.offline.Endorsement`) while it may
still sign, and the endorsement is stored with the new key. Hard wallets pin the key that certified
them and move to another only along such endorsements. A disabled key endorses nothing (it may be
compromised), nor does an adopted key get an endorsement: devices certified under the key it replaces
are provisioned again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization

from gateway import clock
from gateway.audit.chain import AuditEntry, append
from gateway.errors import AlreadyExists, Conflict, KeyNotAdoptable, ValidationFailed
from gateway.hsm.profile import HsmProfile
from gateway.hsm.uri import Pkcs11Uri, Pkcs11UriError, format_uri
from gateway.hsm.uri import parse as parse_uri
from gateway.keys import (
    KeyRecord,
    KeyStatus,
    Usage,
    active_key_id,
    check_usages,
    family_versions,
    get_key,
    insert_key,
    label_taken,
    make_record,
    new_key_id,
    set_status,
    sign1_with_profile,
)
from gateway.ledger.journal import epoch_millis
from gateway.ledger.store import Database, Tx
from gateway.schemes import offline
from gateway.signing import Algorithm, Signer, cryptography_public_key

#: Bytes of a gateway key id, which is also the key's CKA_ID in the token.
KEY_ID_BYTES = 16


def _require_algorithm(profile: HsmProfile, algorithm: Algorithm) -> None:
    if algorithm not in profile.algorithms:
        raise ValidationFailed(
            f"the HSM profile {profile.name!r} does not support {algorithm.value} "
            f"(supported: {sorted(a.value for a in profile.algorithms)})"
        )


async def generate_key(
    database: Database,
    signer: Signer,
    profile: HsmProfile,
    label: str,
    algorithm: Algorithm,
    usages: frozenset[Usage],
    entry: AuditEntry,
) -> KeyRecord:
    """Generate a key pair inside the token and record it (with its audit entry) in one transaction.
    A usage of ``ecny``, ``voucher`` or ``audit`` moves to the new key (the audit entry's
    ``takes_over`` says from which key).

    Raises:
        ValidationFailed: the profile's HSM does not support the algorithm, or a usage does not fit it.
        AlreadyExists: the label is taken.
        HsmUnavailable / HsmError: from the HSM.
    """
    _require_algorithm(profile, algorithm)
    check_usages(algorithm, usages)
    if await database.read(lambda tx: label_taken(tx, label)):
        raise AlreadyExists(f"a key labelled {label!r} exists")
    key_id = new_key_id()
    public_key = await signer.generate(key_id, label, algorithm.value)
    record = make_record(key_id, label, algorithm, usages, public_key, entry.actor)
    entry.key_id = key_id
    entry.result = {"key_id": key_id, "label": label, "algorithm": algorithm.value, "usage": sorted(usages)}
    endorsement = await _endorsement_of(database, signer, profile, record)

    await database.write(lambda tx: _store_new(tx, record, entry, endorsement))
    return _signing_now(record, entry)


async def _endorsement_of(database: Database, signer: Signer, profile: HsmProfile,
                          record: KeyRecord) -> tuple[str, bytes] | None:
    """When ``record`` (made, not stored yet) takes the ``voucher`` usage over: the outgoing key's id and its
    endorsement of ``record`` (a COSE_Sign1 from the HSM), signed now, while it may still sign. None when
    there is no outgoing key that may sign (the first voucher key; a disabled or retired one)."""
    if Usage.VOUCHER not in record.usages or record.algorithm is not Algorithm.ECDSA_P256:
        return None

    def outgoing(tx: Tx) -> KeyRecord | None:
        key_id = active_key_id(tx, Usage.VOUCHER)
        return None if key_id is None else get_key(tx, key_id)

    old = await database.read(outgoing)
    if old is None or old.status is not KeyStatus.ACTIVE or old.algorithm is not Algorithm.ECDSA_P256:
        return None
    payload = offline.Endorsement(old.public_key, record.public_key, epoch_millis()).payload()
    return old.key_id, await sign1_with_profile(signer, profile, old, payload)


def _store_new(tx: Tx, record: KeyRecord, entry: AuditEntry, endorsement: tuple[str, bytes] | None = None) -> None:
    """Insert a new key and its audit entry; ``takes_over`` in the entry names the usages it took over. The
    endorsement is stored only if its signer is the key the ``voucher`` usage was taken over from here (not
    when another change of the usage committed meanwhile)."""
    taken = insert_key(tx, record)
    if taken:
        entry.result["takes_over"] = taken
    if endorsement is not None and taken.get(Usage.VOUCHER.value) == endorsement[0]:
        tx.execute("INSERT INTO issuer_endorsements (new_key_id, old_key_id, endorsement, created_at) "
                   "VALUES (?, ?, ?, ?)", (record.key_id, endorsement[0], endorsement[1], clock.now_iso()))
        entry.result["endorsed_by"] = endorsement[0]
    append(tx, [entry])


def _signing_now(record: KeyRecord, entry: AuditEntry) -> KeyRecord:
    """``record`` with the usages it took over (recorded in ``entry``) as ``active_for``."""
    return replace(record, active_for=frozenset(Usage(u) for u in entry.result.get("takes_over", {})))


def version_label(family_label: str, version: int) -> str:
    """The label of version ``version`` of a family whose first version is labelled ``family_label``."""
    return family_label if version == 1 else f"{family_label}.v{version}"


async def rotate_key(database: Database, signer: Signer, profile: HsmProfile, key_id: str,
                     entry: AuditEntry) -> KeyRecord:
    """Make the next version of ``key_id``'s family (any version of it may be named) inside the HSM —
    same algorithm, usages and label family — and make it the active one: the family's older active
    versions become ``retired`` (verify only) and its single-active usages move to it.

    Raises:
        KeyNotFound: no such key.
        ValidationFailed: the profile no longer supports the family's algorithm.
        AlreadyExists: the next version's label is taken.
        Conflict: another rotation of the family was stored first.
        HsmUnavailable / HsmError: from the HSM.
    """

    def family_of(tx: Tx) -> list[KeyRecord]:
        return family_versions(tx, get_key(tx, key_id).family)

    versions = await database.read(family_of)
    first, latest = versions[0], versions[-1]
    _require_algorithm(profile, latest.algorithm)
    version = latest.version + 1
    label = version_label(first.label, version)
    if await database.read(lambda tx: label_taken(tx, label)):
        raise AlreadyExists(f"a key labelled {label!r} exists")
    new_id = new_key_id()
    public_key = await signer.generate(new_id, label, latest.algorithm.value)
    record = make_record(new_id, label, latest.algorithm, latest.usages, public_key, entry.actor,
                         family_id=latest.family, version=version)
    entry.key_id = new_id
    entry.result = {"key_id": new_id, "family_id": latest.family, "version": version,
                    "previous_key_id": latest.key_id, "label": label, "usage": sorted(latest.usages)}
    endorsement = await _endorsement_of(database, signer, profile, record)

    def store(tx: Tx) -> None:
        tx.lock(f"key-family:{latest.family}")
        now_latest = family_versions(tx, latest.family)[-1]
        if now_latest.key_id != latest.key_id:
            raise Conflict(f"key family {latest.family} was rotated meanwhile (to {now_latest.key_id}); "
                           f"the HSM key {new_id} made for this rotation is unused")
        retired = []
        for older in family_versions(tx, latest.family):
            if older.status is KeyStatus.ACTIVE:
                set_status(tx, older.key_id, KeyStatus.RETIRED, only_from=KeyStatus.ACTIVE)
                retired.append(older.key_id)
        entry.result["retired"] = retired
        _store_new(tx, record, entry, endorsement)

    await database.write(store)
    return _signing_now(record, entry)


async def disable_key(database: Database, key_id: str, entry: AuditEntry) -> KeyRecord:
    """Stop one key version: it signs nothing from now on, in every process (signing reads the status
    from the store). Its signatures still verify and its kid still resolves: what it signed before
    stays checkable. A single-active usage it was the key of stays pointed at it, so signing for that
    usage is refused (``key-disabled``) until the key is rotated or a new key of the usage is made —
    never silently moved to some other key. Disabling a disabled key changes nothing (no entry).

    Raises:
        KeyNotFound: no such key.
    """

    def store(tx: Tx) -> KeyRecord:
        tx.lock(f"key:{key_id}")
        record = get_key(tx, key_id)
        if record.status is KeyStatus.DISABLED:
            return record
        set_status(tx, key_id, KeyStatus.DISABLED)
        entry.key_id = key_id
        entry.result = {"key_id": key_id, "family_id": record.family, "version": record.version,
                        "previous_status": record.status.value}
        append(tx, [entry])
        return get_key(tx, key_id)

    result: KeyRecord = await database.write(store)
    return result


# --- adoption of keys made elsewhere (a key ceremony) ---------------------------------------------


class KeyInspector(Protocol):
    """Reads what the token says of an existing private key (``gateway.hsm.pool.SignerPool``)."""

    async def describe_key(self, id_hex: str | None, label: str | None) -> dict[str, Any]:
        """Facts of the one private key with CKA_ID ``id_hex`` and/or CKA_LABEL ``label``: ``id``, ``label``,
        ``key_type``, ``curve_oid``, ``sensitive``, ``extractable``, ``private``, ``sign``, ``public_key``,
        ``mechanisms`` (the slot's) and ``token`` (its identity under RFC 7512 attribute names).

        Raises:
            KeyNotFound / AmbiguousKey: no / several private keys match.
        """
        ...


@dataclass(frozen=True)
class AdoptionRequest:
    """What ``keys adopt`` was asked: the key's URI and the usages to give it."""

    uri: str
    usages: frozenset[Usage]


def adoption_uri(text: str) -> Pkcs11Uri:
    """Parse and check an adoption URI: it names one private key (``id`` and/or ``object``) and carries no
    PIN (a ``pin-value`` on a command line is a secret in ``argv``).

    Raises:
        ValidationFailed: a malformed URI, ``pin-value``, an unknown path attribute, no ``id``/``object``,
            a ``type`` other than ``private``.
    """
    try:
        uri = parse_uri(text)
        uri.refuse_pin_value("--uri")
        uri.refuse_unknown_path("--uri")
    except Pkcs11UriError as exc:
        raise ValidationFailed(str(exc)) from None
    if uri.object_id is None and uri.object_label is None:
        raise ValidationFailed("--uri: name the key with id= (its CKA_ID) and/or object= (its CKA_LABEL)")
    if uri.object_type not in (None, "private"):
        raise ValidationFailed(f"--uri: type={uri.object_type} cannot be adopted; a signing key is type=private")
    return uri


def _algorithm_of(profile: HsmProfile, facts: dict[str, Any]) -> Algorithm | None:
    """The profile's algorithm with the key's CKA_KEY_TYPE and curve, or None."""
    for algorithm, section in profile.algorithms.items():
        if section.key_type_value == facts["key_type"] and section.curve_oid == facts["curve_oid"]:
            return algorithm
    return None


def adoption_refusals(profile: HsmProfile, uri: Pkcs11Uri, facts: dict[str, Any]) -> list[str]:
    """Why the key ``facts`` describes cannot be adopted (empty: it can). Pure, for the CLI and tests."""
    refusals = []
    for name, value in uri.token_attributes().items():
        have = facts["token"].get(name)
        if name == "library-version" and have is not None and "." not in value:
            have = have.split(".")[0]
        if have != value:
            refusals.append(f"the URI says {name}={value!r} but the gateway's token has {have!r}")
    if facts.get("private") is not True:
        refusals.append("CKA_PRIVATE is not true: the key can be read without logging in")
    if facts.get("sensitive") is not True:
        refusals.append("CKA_SENSITIVE is not true: the private value can be read out of the token")
    if facts.get("extractable") is not False:
        refusals.append("CKA_EXTRACTABLE is not false: the key can be wrapped and taken out of the token")
    if facts.get("sign") is False:
        refusals.append("CKA_SIGN is false: the key cannot sign")
    if len(bytes.fromhex(facts["id"])) != KEY_ID_BYTES:
        refusals.append(f"its CKA_ID is {len(bytes.fromhex(facts['id']))} bytes; the gateway names keys by a "
                        f"{KEY_ID_BYTES}-byte CKA_ID (give it one, e.g. pkcs11-tool --set-id, then adopt it)")
    if facts.get("public_key") is None:
        refusals.append("the token has no public key object with the same CKA_ID")
    return refusals


def _normalised_public_key(algorithm: Algorithm, point: bytes) -> bytes | None:
    """The public key as the gateway stores it (an uncompressed SEC1 point; Ed25519's 32 bytes), from what
    the token holds (a compressed point is possible); None if it is no key of ``algorithm``. SM2 points
    are kept as they are (no SM2 support in `cryptography`)."""
    try:
        key = cryptography_public_key(algorithm, point)
    except ValueError:
        return None
    if key is None:
        return point if len(point) == 65 and point[0] == 0x04 else None
    if algorithm is Algorithm.ED25519:
        return point
    encoded: bytes = key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return encoded


async def adopt_key(database: Database, inspector: KeyInspector, profile: HsmProfile, request: AdoptionRequest,
                    entry: AuditEntry) -> KeyRecord:
    """Register an existing HSM key (made in a ceremony, say) after checking in the token that it is
    private, sensitive and not extractable, signs with a mechanism the token offers, and is on the
    gateway's token. Nothing in the token is changed.

    Raises:
        ValidationFailed: a bad URI (:func:`adoption_uri`) or usages that do not fit the key.
        KeyNotFound / AmbiguousKey: no / several private keys match the URI.
        KeyNotAdoptable: the key fails a check (the message lists every reason).
        AlreadyExists: the key or its label is registered already.
    """
    uri = adoption_uri(request.uri)
    facts = await inspector.describe_key(None if uri.object_id is None else uri.object_id.hex(), uri.object_label)
    refusals = adoption_refusals(profile, uri, facts)
    algorithm = _algorithm_of(profile, facts)
    if algorithm is None:
        refusals.append(f"its key type 0x{facts['key_type']:x} on curve {facts['curve_oid']} is none of the "
                        f"algorithms the HSM profile {profile.name!r} drives "
                        f"({sorted(a.value for a in profile.algorithms)})")
    else:
        mechanism = profile.algorithms[algorithm].sign_mechanism_value
        if mechanism not in facts["mechanisms"]:
            refusals.append(f"the token does not offer the signing mechanism 0x{mechanism:x} the profile gives "
                            f"{algorithm.value}")
    public_key = None
    if algorithm is not None and facts.get("public_key") is not None:
        public_key = _normalised_public_key(algorithm, facts["public_key"])
        if public_key is None:
            refusals.append(f"its public key object does not hold a {algorithm.value} public key")
    if refusals:
        raise KeyNotAdoptable("cannot adopt the key: " + "; ".join(refusals))
    assert algorithm is not None and public_key is not None
    check_usages(algorithm, request.usages)
    record = make_record(facts["id"], facts["label"] or f"adopted-{facts['id'][:8]}", algorithm, request.usages,
                         public_key, entry.actor, origin="adopted")
    entry.key_id = record.key_id
    located = Pkcs11Uri(path=uri.path, object_id=uri.object_id)  # the query (PIN source, module) stays out
    entry.result = {"key_id": record.key_id, "label": record.label, "algorithm": algorithm.value,
                    "usage": sorted(u.value for u in request.usages), "uri": format_uri(located),
                    "attributes": {name: facts.get(name) for name in ("private", "sensitive", "extractable",
                                                                     "always_sensitive", "never_extractable")}}

    await database.write(lambda tx: _store_new(tx, record, entry))
    return _signing_now(record, entry)
