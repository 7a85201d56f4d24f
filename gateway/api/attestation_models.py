"""Bodies of the attestation and alliance endpoints. Strict: a float amount, an unknown field or type, a
digest of the wrong length and a missing field are 400 before anything is computed or stored."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, Strict, StringConstraints

from gateway.attest.documents import MAX_AMOUNT_MINOR, DocumentType, Purpose

Name = Annotated[str, StringConstraints(min_length=1, max_length=200)]
TaxId = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PartyFields(_Body):
    name: Name
    tax_id: TaxId


class DocumentFieldsBody(_Body):
    issuer: PartyFields
    number: Annotated[str, StringConstraints(min_length=1, max_length=80)]
    issue_date: Annotated[str, StringConstraints(pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")]
    amount_minor: Annotated[int, Field(gt=0, le=MAX_AMOUNT_MINOR,
                                       description="Amount in integer minor units of currency (fen, cents)")]
    currency: Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]
    seller: PartyFields
    buyer: PartyFields
    references: Annotated[list[Annotated[str, StringConstraints(min_length=1, max_length=80)]],
                          Field(max_length=20)] = []


class AttestationRequestBody(_Body):
    document_type: Annotated[DocumentType, Strict(False)]
    document_sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{64}$")]
    fields: DocumentFieldsBody
    purpose: Annotated[Purpose, Strict(False)]


class AttestationDocument(_Body):
    attestation_id: str
    document_type: str
    purpose: str
    member_id: str
    document_sha256: str
    fields: dict[str, Any]
    fingerprint: str | None = Field(description="HMAC-SHA256 under the alliance key (finance only), hex")
    kid: str
    created_by: str
    created_at: str
    status: str = Field(description="signed, or unsigned (recorded, signature pending after a crash)")
    attestation: str | None = Field(description="base64 tagged COSE_Sign1 over the CBOR claims")


class AttestationList(_Body):
    attestations: list[AttestationDocument]


class VerifyRequest(_Body):
    attestation: Annotated[str, StringConstraints(min_length=1, max_length=65536)] = Field(
        description="base64 COSE_Sign1, as issued")


class VerifyResult(_Body):
    valid: bool
    reason: str = Field(description="empty when valid; else unknown-member, unknown-key, not-an-attestation, "
                                    "alg-mismatch or bad-signature")
    issuer: str | None
    claims: dict[str, Any] | None
    key: dict[str, Any] | None


class HitDocument(_Body):
    hit_id: str
    ts: str
    fingerprint: str
    document_type: str
    document_number: str
    issuer_tax_id: str
    financed_by: str
    financed_at: str
    requested_by: str


class HitList(_Body):
    hits: list[HitDocument]


class PeerStatus(_Body):
    member_id: str
    url: str
    cursor: int
    head: int
    last_sync_at: str
    lag_seconds: float | None
    last_error: str
    last_error_at: str


class AllianceStatus(_Body):
    member_id: str | None
    published_head: int
    sync_interval_seconds: float
    peers: list[PeerStatus]
