"""Raw and batch signatures with ``raw`` keys, below the HTTP API: written once for both.

A raw signature changes nothing in the store but the audit log, so there is nothing to check and
record *before* the HSM is asked — the two-phase :class:`~gateway.operations.signed.SignedOperation`
would add a write transaction (and its fsync) to the hottest path and protect nothing. Its shape is
the one-phase *signed record*:

1. **check**: the key exists, has usage ``raw`` and may sign, *as this process last saw it* (a cached
   record: no store read before the HSM); each input fits the key's algorithm (a 32-byte digest for
   ECDSA, at most 64 KiB for Ed25519); at most :data:`MAX_BATCH` inputs;
2. **sign** through the HSM (a batch is shared between the signer workers);
3. **one store write**, in the audit log's group commit (:meth:`AuditLog.record_with`): the key's
   status checked again (:func:`~gateway.keys.signing_refusals_in`, one read for the group), then the
   audit entry (what was signed, the hash of the signatures) and the Idempotency-Key answer. A key
   disabled, retired or gone since step 1 — by this process or any other — turns the entry into that
   refusal, with the hash of the signature the HSM made under ``result.withheld``;
4. **answer**, only once that write has committed: no signature leaves without its audit entry, and
   none leaves after its key's disable or rotation committed. Reading the status before signing could
   not promise that: a disable committed between that read and the release would not stop it.

A retry with the same Idempotency-Key is answered from the recorded answer before any of this runs
(``gateway/api/idempotency.run``), so the HSM is not asked twice. If another process or instance
recorded an answer for the key first, the entry of the signature made here is written all the same
(the HSM made it) and this answer is not: :class:`~gateway.errors.IdempotencyRaced`, and the caller
replays the earlier answer — the signature made here never leaves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.audit.chain import AuditEntry, AuditLog
from gateway.errors import IdempotencyRaced, PayloadTooLarge, ValidationFailed
from gateway.keys import SIGNING_REFUSALS, KeyDirectory, KeyRecord, Usage
from gateway.ledger.store import Database, Tx
from gateway.operations import idempotency
from gateway.operations.idempotency import Answer, IdempotentRequest
from gateway.signing import Algorithm, Signer, der_from_raw

MAX_BATCH = 1000
"""Inputs per batch request (POST /v1/sign/batch); more is 413."""
ECDSA = (Algorithm.ECDSA_P256, Algorithm.ECDSA_SECP256K1)
ED25519_MAX_MESSAGE = 65536


@dataclass(frozen=True)
class RawRequest:
    """What a caller asked to sign: hex inputs for one key. ``batch``: POST /v1/sign/batch (a list of
    signatures in the answer), else one input and one signature (POST /v1/keys/{id}/sign)."""

    key_id: str
    inputs: Sequence[str]
    batch: bool = False


def signing_input(record: KeyRecord, hex_data: str) -> bytes:
    """The bytes the HSM signs for one hex input.

    Raises:
        ValidationFailed: an ECDSA input that is not a 32-byte digest.
        PayloadTooLarge: an Ed25519 message above 64 KiB.
    """
    data = bytes.fromhex(hex_data)
    if record.algorithm in ECDSA and len(data) != 32:
        raise ValidationFailed(f"an ECDSA digest is 32 bytes; got {len(data)}")
    if record.algorithm is Algorithm.ED25519 and len(data) > ED25519_MAX_MESSAGE:
        raise PayloadTooLarge("Ed25519 messages are limited to 64 KiB")
    return data


def signature_document(record: KeyRecord, signature: bytes) -> dict[str, str]:
    """One signature as answered: raw (r‖s or Ed25519), and DER for ECDSA."""
    document = {"signature": signature.hex()}
    if record.algorithm in ECDSA:
        document["der"] = der_from_raw(signature).hex()
    return document


class RawSigning:
    """Steps 1–4 of a raw or batch signature (see the module's docstring)."""

    def __init__(self, database: Database, keys: KeyDirectory, signer: Signer, audit: AuditLog) -> None:
        self.database = database
        self.keys = keys
        self.signer = signer
        self.audit = audit

    async def run(self, request: IdempotentRequest | None, raw: RawRequest, entry: AuditEntry) -> Answer:
        """Sign ``raw`` and answer once the audit entry (``entry``, completed here) and the answer are stored.

        Raises:
            PayloadTooLarge: more than :data:`MAX_BATCH` inputs, or an Ed25519 message above 64 KiB.
            KeyNotFound, KeyUsageNotAllowed, RawKeyNotExclusive, KeyRetired, KeyDisabled: no such key,
                not a ``raw`` key, or one that may no longer sign.
            ValidationFailed: an input that does not fit the key's algorithm.
            HsmUnavailable, HsmError: the HSM did not sign (nothing is written).
            StoreUnavailable: the audit entry was not written (the signature does not leave).
            IdempotencyRaced: another request with this Idempotency-Key recorded its answer first.
        """
        if raw.batch and len(raw.inputs) > MAX_BATCH:
            raise PayloadTooLarge(f"at most {MAX_BATCH} digests per batch; got {len(raw.inputs)}")
        record = await self.keys.to_sign(self.database, raw.key_id, Usage.RAW)
        items = [signing_input(record, text) for text in raw.inputs]
        if raw.batch:
            signatures = await self.signer.sign_many(record.key_id, record.algorithm.value, items)
            entry.payload_hash = hashlib.sha256(b"".join(items)).hexdigest()
            entry.result = {"count": len(signatures),
                            "signatures_sha256": hashlib.sha256(b"".join(signatures)).hexdigest()}
            answer = Answer(200, {"signatures": [signature.hex() for signature in signatures]})
        else:
            (item,) = items
            signature = await self.signer.sign(record.key_id, record.algorithm.value, item)
            entry.payload_hash = hashlib.sha256(item).hexdigest()
            entry.result = {"signature_sha256": hashlib.sha256(signature).hexdigest()}
            answer = Answer(200, signature_document(record, signature))
        entry.key_id = record.key_id

        def answer_in(tx: Tx) -> bool:
            return idempotency.answer_unless_present_in(tx, request, answer)

        try:
            _, recorded = await self.audit.record_with(entry, answer_in, signed_by=(record.key_id, Usage.RAW))
        except SIGNING_REFUSALS:
            self.keys.forget(record.key_id)  # its status changed: the next request reads it before signing
            raise
        if not recorded:
            assert request is not None
            raise IdempotencyRaced(f"Idempotency-Key {request.key!r} was answered by another request first")
        return answer
