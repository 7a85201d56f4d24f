"""Trade-finance attestations and the alliance feed (docs/trade-finance.md): parse and render only; the
work is gateway.attest."""

from __future__ import annotations

import base64
import binascii

from aiohttp import web

from gateway import clock
from gateway.api import idempotency
from gateway.api.attestation_models import (
    AllianceStatus,
    AttestationDocument,
    AttestationList,
    AttestationRequestBody,
    HitList,
    VerifyRequest,
    VerifyResult,
)
from gateway.api.call import Call
from gateway.api.codecs import json_response
from gateway.api.endpoints import Endpoint
from gateway.attest.attestations import AttestationRequest
from gateway.attest.documents import Party, identifier, normalise
from gateway.auth.roles import Permission
from gateway.errors import ValidationFailed

PAGE = 100
BATCH_MEDIA_TYPE = "application/cbor"


def _request(body: AttestationRequestBody) -> AttestationRequest:
    fields = body.fields
    normalised = normalise(
        body.document_type, Party(fields.issuer.name, fields.issuer.tax_id), fields.number, fields.issue_date,
        fields.amount_minor, fields.currency, Party(fields.seller.name, fields.seller.tax_id),
        Party(fields.buyer.name, fields.buyer.tax_id), fields.references, clock.now().date())
    return AttestationRequest(body.document_type, body.purpose, bytes.fromhex(body.document_sha256), normalised)


async def create(call: Call) -> web.Response:
    wanted = _request(call.body)
    entry = call.audit_entry("attestations.create", decision="allowed", payload_hash=call.payload_hash())
    return idempotency.render(await call.runtime.attestations.attest(call.idempotent, wanted, entry))


async def resume(call: Call, attestation_id: str) -> web.Response:
    return idempotency.render(await call.runtime.attestations.resume(attestation_id, call.idempotent))


def _attestation_id(call: Call) -> str:
    return call.request.match_info["attestation_id"][:64]


async def show(call: Call) -> web.Response:
    answer = await call.runtime.attestations.get(_attestation_id(call))
    return json_response(answer.document)


async def search(call: Call) -> web.Response:
    number = call.request.query.get("number", "").strip()
    issuer = call.request.query.get("issuer_tax_id", "").strip()
    limit = call.query_int("limit", PAGE, 0, 1000)
    found = await call.runtime.attestations.search(identifier(number) or None, identifier(issuer) or None, limit)
    return json_response({"attestations": found})


async def verify(call: Call) -> web.Response:
    body: VerifyRequest = call.body
    try:
        envelope = base64.b64decode(body.attestation, validate=True)
    except (binascii.Error, ValueError):
        raise ValidationFailed("attestation must be base64") from None
    return json_response(await call.runtime.attestations.verify(envelope))


async def hits(call: Call) -> web.Response:
    limit = call.query_int("limit", PAGE, 0, 1000)
    return json_response({"hits": await call.runtime.attestations.hits(limit)})


async def fingerprints(call: Call) -> web.Response:
    after = call.query_int("after", 0, 0, 10**18)
    limit = call.query_int("limit", 1000, 0, 10_000)
    nonce_text = call.request.query.get("nonce", "")
    try:
        nonce = bytes.fromhex(nonce_text)
    except ValueError:
        nonce = b""
    if not 16 <= len(nonce) <= 64:
        raise ValidationFailed("nonce must be 16–64 random bytes in hex (the puller's freshness challenge)")
    envelope = await call.runtime.attestations.publish(after, limit, nonce)
    return web.Response(body=envelope, content_type=BATCH_MEDIA_TYPE)


async def alliance_status(call: Call) -> web.Response:
    return json_response(await call.runtime.attestations.status())


ENDPOINTS = [
    Endpoint("POST", "/v1/attestations", create,
             "Attest a trade document: a COSE_Sign1 over its digest and normalised fields; a `finance` is refused "
             "when the document was financed before, here or at an alliance member", Permission.ATTESTATIONS_CREATE,
             "attestations", request_model=AttestationRequestBody, response_model=AttestationDocument,
             response_status=201, idempotency="optional", resume=resume, audited_action="attestations.create",
             responses={400: "Bad fields (invalid-trade-document, validation-failed)",
                        409: "already-financed: the member and time of the first financing",
                        503: "alliance-not-configured (member id or HMAC key missing)"}),
    Endpoint("GET", "/v1/attestations", search, "Search attestations by document number and issuer tax id",
             Permission.ATTESTATIONS_READ, "attestations", response_model=AttestationList,
             query=(("number", {"type": "string"}, "Document number (normalised as attested)"),
                    ("issuer_tax_id", {"type": "string"}, "Issuer's tax id"),
                    ("limit", {"type": "integer", "minimum": 0, "maximum": 1000}, "Most results (default 100)"))),
    Endpoint("GET", "/v1/attestations/hits", hits, "Refused second financings (already-financed), newest first",
             Permission.ATTESTATIONS_READ, "attestations", response_model=HitList,
             query=(("limit", {"type": "integer", "minimum": 0, "maximum": 1000}, "Most results (default 100)"),)),
    Endpoint("GET", "/v1/attestations/{attestation_id}", show, "One attestation", Permission.ATTESTATIONS_READ,
             "attestations", response_model=AttestationDocument,
             responses={404: "attestation-not-found"}),
    Endpoint("POST", "/v1/attestations/verify", verify,
             "Verify an attestation of this bank or of a configured alliance member", Permission.ATTESTATIONS_READ,
             "attestations", request_model=VerifyRequest, response_model=VerifyResult,
             responses={400: "Not base64, or not a COSE_Sign1 (invalid-cose)"}),
    Endpoint("GET", "/v1/alliance/fingerprints", fingerprints,
             "This bank's financed fingerprints after a seq: a COSE_Sign1-signed CBOR batch, no document data",
             Permission.ALLIANCE_FEED, "alliance", response_media=BATCH_MEDIA_TYPE,
             audited_action="alliance.fingerprints",
             query=(("after", {"type": "integer", "minimum": 0}, "The puller's cursor (last seq it stored)"),
                    ("nonce", {"type": "string", "pattern": "^([0-9a-f]{2}){16,64}$"},
                     "The puller's fresh random challenge, echoed in the signed batch"),
                    ("limit", {"type": "integer", "minimum": 0, "maximum": 10000}, "Most entries")),
             responses={503: "alliance-not-configured"}),
    Endpoint("GET", "/v1/alliance/status", alliance_status,
             "This bank's published head and each peer's cursor, last sync and lag", Permission.ATTESTATIONS_READ,
             "alliance", response_model=AllianceStatus),
]
