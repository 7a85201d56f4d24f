"""The attestation flow: a document's fields in, a signed COSE_Sign1 attestation out — and, for a
``finance`` attestation, the alliance's double-financing check.

Order of work (the signed operation, gateway/operations/signed.py, with one addition):

0. the fingerprint: HMAC-SHA256 of the identifying fields under the alliance key, *in the HSM*. It is a
   deterministic function of the request (no decision, nothing recorded), so computing it before the
   transaction changes nothing that a crash could leave half done;
1. check and record, in one transaction: under the feed lock, the first financing of the fingerprint known
   here (this bank's own, or a peer's as synced). None: the attestation row (claims fixed, no signature),
   its place in the published feed, the audit entry and the Idempotency-Key reference. One: the refusal
   is *recorded* instead — a hit row, an audit entry, a risk signal — and the transaction commits before
   409 ``already-financed`` is raised: a refusal that rolled back would leave no trace of the attempt.
   The UNIQUE fingerprint column is the backstop should two transactions ever pass the lock;
2. commit; 3. sign (the ``attest`` key, no lock held); 4. store the envelope and the final answer.

:meth:`SignedOperation.run` cannot carry step 1's "commit, then refuse", so step 1 is written here and
steps 3–4 (and replays, reads of unsigned work) are the signed operation's ``finish``/``resume``.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import cbor2

from gateway import clock
from gateway.attest import records
from gateway.attest.batches import BatchEntry, MemberKey, batch_payload, member_key
from gateway.attest.documents import (
    ATTESTATION_TYPE,
    DocumentFields,
    DocumentType,
    Purpose,
    claims,
    claims_json,
    fingerprint_input,
)
from gateway.audit.chain import AuditEntry, append
from gateway.config import AllianceSettings
from gateway.errors import AllianceNotConfigured, AlreadyFinanced, AmbiguousKey, GatewayError, KeyNotFound
from gateway.hsm.profile import HsmProfile
from gateway.keys import KeyDirectory, KeyRecord, Usage, key_for_usage, public_key_pem, sign1_with_profile
from gateway.ledger.store import Database, Row, Tx
from gateway.operations import idempotency
from gateway.operations.idempotency import Answer, IdempotentRequest
from gateway.operations.signed import SignedOperation, Stored, ToSign
from gateway.risk.signals import record_signal_in
from gateway.schemes import cose
from gateway.signing import Signer

SIGNAL_ALREADY_FINANCED = "attestation.already_financed"


class Mac(Protocol):
    """HMAC-SHA256 under a secret key that stays in the HSM (:class:`gateway.hsm.pool.SignerPool`)."""

    async def hmac_sha256(self, label: str, items: Sequence[bytes]) -> list[bytes]:
        """One tag per item. Raises KeyNotFound / AmbiguousKey for no / several keys with ``label``."""
        ...


@dataclass(frozen=True)
class AttestationRequest:
    """A request as parsed and normalised (gateway.attest.documents)."""

    document_type: DocumentType
    purpose: Purpose
    document_sha256: bytes
    fields: DocumentFields


@dataclass(frozen=True)
class Recorded:
    """An attestation as stored: what the signing step needs (claims fixed at step 1)."""

    row: Row
    key: KeyRecord

    @property
    def attestation_id(self) -> str:
        return str(self.row["attestation_id"])

    @property
    def envelope(self) -> bytes | None:
        value = self.row["envelope"]
        return None if value is None else bytes(value)


def ms(iso_time: str) -> int:
    return int(datetime.fromisoformat(iso_time.replace("Z", "+00:00")).timestamp() * 1000)


def iso_from_ms(value: int) -> str:
    return clock.iso(datetime.fromtimestamp(value / 1000, UTC))


def attestation_document(row: Row, envelope: bytes | None) -> dict[str, Any]:
    """The attestation document of the HTTP API (``attestation``: base64 tagged COSE_Sign1)."""
    payload = claims_json(cbor2.loads(bytes(row["claims"])))
    return {
        "attestation_id": row["attestation_id"], "document_type": row["document_type"], "purpose": row["purpose"],
        "member_id": payload.get("member"), "document_sha256": row["document_sha256"],
        "fields": payload.get("fields"), "fingerprint": row["fingerprint"], "kid": row["key_id"],
        "created_by": row["created_by"], "created_at": row["created_at"],
        "status": "signed" if envelope is not None else "unsigned",
        "attestation": None if envelope is None else base64.b64encode(envelope).decode(),
    }


class AttestationSigning:
    """The signing step of an attestation (gateway.operations.signed.SigningStep)."""

    def __init__(self, database: Database, signer: Signer, profile: HsmProfile, keys: KeyDirectory) -> None:
        self.database, self.signer, self.profile, self.keys = database, signer, profile, keys

    async def load(self, reference: str) -> Recorded:
        row = await self.database.read(lambda tx: records.get_attestation(tx, reference))
        return Recorded(row, await self.keys.get(self.database, str(row["key_id"])))

    def answered(self, subject: Recorded) -> Answer | None:
        envelope = subject.envelope
        return None if envelope is None else Answer(201, attestation_document(subject.row, envelope))

    async def sign(self, subject: Recorded) -> bytes:
        return await sign1_with_profile(self.signer, self.profile, subject.key, bytes(subject.row["claims"]))

    def store_in(self, tx: Tx, subject: Recorded, signature: bytes) -> Stored:
        return Stored(Answer(201, attestation_document(subject.row, signature)),
                      *records.store_envelope(tx, subject.attestation_id, signature))


class Attestations:
    """Attest documents, check double financing, verify attestations, publish this bank's fingerprints."""

    def __init__(self, database: Database, signer: Signer, mac: Mac, profile: HsmProfile,
                 settings: AllianceSettings, keys: KeyDirectory) -> None:
        self.database = database
        self.signer = signer
        self.mac = mac
        self.profile = profile
        self.settings = settings
        self.keys = keys
        self.signed = SignedOperation(database, AttestationSigning(database, signer, profile, keys))

    # --- configuration --------------------------------------------------------------------------

    def member_id(self) -> str:
        """This bank's member id. Raises AllianceNotConfigured when ``[alliance] member_id`` is unset."""
        if not self.settings.member_id:
            raise AllianceNotConfigured("set [alliance] member_id to attest documents or publish fingerprints")
        return self.settings.member_id

    def peer_keys(self) -> dict[str, MemberKey]:
        return {peer.member_id: member_key(peer.member_id, peer.public_key_pem) for peer in self.settings.peers}

    def _attest_key(self, tx: Tx) -> KeyRecord:
        return key_for_usage(tx, Usage.ATTEST, self.settings.key_id, "alliance.key_id")

    async def fingerprint(self, document_type: DocumentType, fields: DocumentFields) -> str:
        """The alliance fingerprint (hex) of a document's identifying fields, computed in the HSM.

        Raises:
            AllianceNotConfigured: the HSM holds no (or more than one) alliance key with the configured label.
        """
        try:
            tags = await self.mac.hmac_sha256(self.settings.hmac_key_label, [fingerprint_input(document_type, fields)])
        except (KeyNotFound, AmbiguousKey) as exc:
            raise AllianceNotConfigured(
                f"the alliance HMAC key {self.settings.hmac_key_label!r} is not usable in the HSM ({exc.detail}); "
                "import it with `ecny-gateway alliance import-key`") from None
        return tags[0].hex()

    # --- attest -----------------------------------------------------------------------------------

    async def attest(self, request: IdempotentRequest | None, wanted: AttestationRequest,
                     entry: AuditEntry) -> Answer:
        """Steps 0–4 (see the module docstring).

        Raises:
            AlreadyFinanced: a ``finance`` of a fingerprint financed before (the refusal is committed).
            AllianceNotConfigured, KeyNotFound (no ``attest`` key), AmbiguousKey; HSM and store errors.
        """
        member = self.member_id()
        fingerprint = None
        if wanted.purpose is Purpose.FINANCE:
            fingerprint = await self.fingerprint(wanted.document_type, wanted.fields)
        attestation_id = secrets.token_hex(16)
        now = clock.now()

        def check_and_record(tx: Tx) -> ToSign[Recorded] | AlreadyFinanced:
            key = self._attest_key(tx)
            publication_seq = None
            if fingerprint is not None:
                publication_seq = records.next_publication_seq(tx)  # the feed lock: one finance at a time
                first = records.first_financing(tx, fingerprint, member)
                if first is not None:
                    return self._refuse_in(tx, wanted, fingerprint, first, entry)
            payload = claims(attestation_id, wanted.document_type, wanted.purpose, wanted.document_sha256,
                             wanted.fields, member, int(now.timestamp() * 1000))
            new = records.NewAttestation(
                attestation_id, wanted.document_type.value, wanted.purpose.value, wanted.fields.number,
                wanted.fields.issuer.tax_id, wanted.document_sha256.hex(), wanted.fields.amount_minor,
                wanted.fields.currency, wanted.fields.as_json(), fingerprint, publication_seq, key.key_id, payload,
                entry.actor, clock.iso(now))
            records.insert_attestation(tx, new)
            entry.key_id = key.key_id
            entry.result = {"attestation_id": attestation_id, "document_type": new.document_type,
                            "purpose": new.purpose, "fingerprint": fingerprint, "publication_seq": publication_seq}
            append(tx, [entry])
            idempotency.refer_in(tx, request, attestation_id)
            row = records.get_attestation(tx, attestation_id)
            return ToSign(attestation_id, Recorded(row, key))

        outcome = await self.database.write(check_and_record)  # steps 1 and 2
        if isinstance(outcome, GatewayError):
            raise outcome
        return await self.signed.finish(outcome.reference, outcome.subject, request)

    def _refuse_in(self, tx: Tx, wanted: AttestationRequest, fingerprint: str, first: records.Financing,
                   entry: AuditEntry) -> AlreadyFinanced:
        """Record a second financing (hit row, audit entry, risk signal) in ``tx``; the error to raise after
        commit."""
        fields = wanted.fields
        records.record_hit(tx, secrets.token_hex(16), fingerprint, wanted.document_type.value, fields.number,
                           fields.issuer.tax_id, first, entry.actor)
        entry.decision = "refused"
        entry.reasons = ["already-financed"]
        entry.result = {"status": 409, "fingerprint": fingerprint, "document_type": wanted.document_type.value,
                        "number": fields.number, "issuer_tax_id": fields.issuer.tax_id,
                        "financed_by": first.member_id, "financed_at": first.financed_at}
        append(tx, [entry])
        record_signal_in(tx, SIGNAL_ALREADY_FINANCED, fields.issuer.tax_id, None, actor=entry.actor,
                         counterparty=first.member_id, fingerprint=fingerprint,
                         document_type=wanted.document_type.value, number=fields.number,
                         amount_minor=str(fields.amount_minor), currency=fields.currency,
                         financed_by=first.member_id, financed_at=first.financed_at, requested_by=entry.actor)
        return AlreadyFinanced(
            f"{wanted.document_type.value} {fields.number} of {fields.issuer.tax_id} was financed by member "
            f"{first.member_id} at {first.financed_at}", member=first.member_id, financed_at=first.financed_at)

    async def resume(self, attestation_id: str, request: IdempotentRequest | None) -> Answer:
        """A replay meeting a reference record: sign the recorded claims now, as the first request would have."""
        return await self.signed.resume(attestation_id, request)

    async def get(self, attestation_id: str) -> Answer:
        """The attestation document; one recorded but not yet signed (a crash) is signed first."""
        return await self.signed.reference(attestation_id)

    async def search(self, number: str | None, issuer_tax_id: str | None, limit: int) -> list[dict[str, Any]]:
        rows = await self.database.read(lambda tx: records.search(tx, number, issuer_tax_id, limit))
        return [attestation_document(row, None if row["envelope"] is None else bytes(row["envelope"]))
                for row in rows]

    async def hits(self, limit: int) -> list[dict[str, Any]]:
        rows = await self.database.read(lambda tx: records.hits(tx, limit))
        return [dict(row) for row in rows]

    # --- verify -----------------------------------------------------------------------------------

    async def verify(self, envelope: bytes) -> dict[str, Any]:
        """Check an attestation of this bank or of a configured peer.

        Returns ``{valid, reason, issuer, claims, key}``; ``reason`` names what failed (``unknown-member``,
        ``unknown-key``, ``not-an-attestation``, ``alg-mismatch``, ``bad-signature``), empty when valid.

        Raises:
            CoseError: not a COSE_Sign1 at all (400 ``invalid-cose``).
        """
        message = cose.parse(envelope)
        try:
            payload = message.claims()
        except Exception:  # cbor2 raises several types on garbage
            payload = None
        result: dict[str, Any] = {"valid": False, "reason": "", "issuer": None, "claims": None, "key": None}
        if not isinstance(payload, Mapping) or payload.get("type") != ATTESTATION_TYPE:
            result["reason"] = "not-an-attestation"
            return result
        member = payload.get("member")
        result["issuer"], result["claims"] = member, claims_json(payload)
        key = await self._verification_key(member, message.kid)
        if key is None:
            result["reason"] = "unknown-member" if member != self.settings.member_id else "unknown-key"
            return result
        result["key"] = {"member_id": key.member_id, "kid": message.kid.decode(errors="replace"),
                         "algorithm": key.algorithm.value, "public_key_pem": key.pem}
        if message.alg != cose.cose_alg(key.algorithm, self.profile.cose_alg(key.algorithm)):
            result["reason"] = "alg-mismatch"
        elif not cose.verify_sign1(message, key.algorithm, key.public_key):
            result["reason"] = "bad-signature"
        else:
            result["valid"] = True
        return result

    async def _verification_key(self, member: Any, kid: bytes) -> MemberKey | None:
        if isinstance(member, str) and member in {peer.member_id for peer in self.settings.peers}:
            return self.peer_keys()[member]
        if member != self.settings.member_id or not self.settings.member_id:
            return None
        try:
            record = await self.keys.get(self.database, kid.decode())
        except (KeyNotFound, UnicodeDecodeError):
            return None
        if Usage.ATTEST not in record.usages:
            return None
        return MemberKey(self.settings.member_id, record.algorithm, record.public_key,
                         public_key_pem(record.algorithm, record.public_key))

    # --- publish ----------------------------------------------------------------------------------

    async def publish(self, after: int, limit: int, nonce: bytes) -> bytes:
        """A signed batch of this bank's financed fingerprints after ``after`` (gateway.attest.batches)."""
        member = self.member_id()
        size = min(limit, self.settings.batch_limit)

        def read(tx: Tx) -> tuple[list[Row], int, KeyRecord]:
            rows, head = records.feed(tx, after, size)
            return rows, head, self._attest_key(tx)

        rows, head, key = await self.database.read(read)
        entries = [BatchEntry(int(row["publication_seq"]), bytes.fromhex(str(row["fingerprint"])),
                              ms(str(row["created_at"]))) for row in rows]
        payload = batch_payload(member, after, nonce, int(clock.now().timestamp() * 1000), head, entries)
        return await sign1_with_profile(self.signer, self.profile, key, payload)

    # --- status -----------------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """This bank's published head and each peer's cursor, head, last sync and lag (seconds, None: never)."""

        def read(tx: Tx) -> tuple[int, list[Row]]:
            _rows, head = records.feed(tx, 0, 0)
            return head, records.peer_states(tx)

        head, states = await self.database.read(read)
        by_member = {str(row["member_id"]): row for row in states}
        now = clock.now().timestamp()
        peers = []
        for peer in self.settings.peers:
            row = by_member.get(peer.member_id)
            last = str(row["last_sync_at"]) if row is not None else ""
            peers.append({
                "member_id": peer.member_id, "url": peer.url,
                "cursor": int(row["feed_cursor"]) if row is not None else 0,
                "head": int(row["head"]) if row is not None else 0, "last_sync_at": last,
                "lag_seconds": round(now - ms(last) / 1000, 3) if last else None,
                "last_error": str(row["last_error"]) if row is not None else "",
                "last_error_at": str(row["last_error_at"]) if row is not None else "",
            })
        return {"member_id": self.settings.member_id, "published_head": head,
                "sync_interval_seconds": self.settings.sync_interval_seconds, "peers": peers}
