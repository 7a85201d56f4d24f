"""Key management operations shared by the HTTP API and the command line."""

from __future__ import annotations

from gateway.audit.chain import AuditEntry, append
from gateway.errors import AlreadyExists, ValidationFailed
from gateway.hsm.profile import HsmProfile
from gateway.keys import KeyRecord, Usage, check_usages, insert_key, label_taken, make_record, new_key_id
from gateway.ledger.store import Database, Tx
from gateway.signing import Algorithm, Signer


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

    Raises:
        ValidationFailed: the profile's HSM does not support the algorithm, or a usage does not fit it.
        AlreadyExists: the label is taken.
        HsmUnavailable / HsmError: from the HSM.
    """
    if algorithm not in profile.algorithms:
        raise ValidationFailed(
            f"the HSM profile {profile.name!r} does not support {algorithm.value} "
            f"(supported: {sorted(a.value for a in profile.algorithms)})"
        )
    check_usages(algorithm, usages)
    if await database.read(lambda tx: label_taken(tx, label)):
        raise AlreadyExists(f"a key labelled {label!r} exists")
    key_id = new_key_id()
    public_key = await signer.generate(key_id, label, algorithm.value)
    record = make_record(key_id, label, algorithm, usages, public_key, entry.actor)
    entry.key_id = key_id
    entry.result = {"key_id": key_id, "label": label, "algorithm": algorithm.value, "usage": sorted(usages)}

    def store(tx: Tx) -> None:
        insert_key(tx, record)
        append(tx, [entry])

    await database.write(store)
    return record
