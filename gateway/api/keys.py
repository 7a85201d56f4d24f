"""Keys: generate inside the HSM, list, show, rotate, disable, verify, public keys as JWK or COSE_Key,
and sign digests with ``raw`` keys."""

from __future__ import annotations

import hashlib

from aiohttp import web

from gateway.api.call import Call
from gateway.api.codecs import json_response
from gateway.api.endpoints import Endpoint
from gateway.api.models import (
    BatchSignRequest,
    BatchSignResponse,
    KeyCreateRequest,
    KeyDocument,
    KeyList,
    KeyVerifyRequest,
    KeyVerifyResponse,
    PublicKeyDocument,
    SignRequest,
    SignResponse,
)
from gateway.auth.roles import Permission
from gateway.errors import KeyNotFound, PayloadTooLarge, ValidationFailed
from gateway.key_lifecycle import disable_key, generate_key, rotate_key
from gateway.keys import KeyRecord, Usage, get_key, list_keys, public_key_pem, verify_with_key
from gateway.schemes.public_keys import cose_key, jwk
from gateway.signing import Algorithm, der_from_raw

MAX_BATCH = 1000
ECDSA = (Algorithm.ECDSA_P256, Algorithm.ECDSA_SECP256K1)


def _key_id(call: Call) -> str:
    key_id = call.request.match_info["key_id"]
    if len(key_id) != 32 or any(c not in "0123456789abcdef" for c in key_id):
        raise KeyNotFound(f"no key {key_id[:40]!r}: key ids are 32 lower-case hex digits")
    return key_id


async def create_key(call: Call) -> web.Response:
    body: KeyCreateRequest = call.body
    entry = call.audit_entry("keys.create", decision="allowed", payload_hash=call.payload_hash())
    record = await generate_key(
        call.runtime.database, call.runtime.signer, call.runtime.profile,
        body.label, body.algorithm, frozenset(body.usage), entry,
    )
    return json_response(record.document(), status=201)


async def list_all(call: Call) -> web.Response:
    records = await call.runtime.database.read(list_keys)
    return json_response({"keys": [record.document() for record in records]})


async def show(call: Call) -> web.Response:
    key_id = _key_id(call)
    record = await call.runtime.database.read(lambda tx: get_key(tx, key_id))  # fresh: the status changes
    return json_response(record.document())


async def rotate(call: Call) -> web.Response:
    entry = call.audit_entry("keys.rotate", decision="allowed")
    runtime = call.runtime
    record = await rotate_key(runtime.database, runtime.signer, runtime.profile, _key_id(call), entry)
    return json_response(record.document(), status=201)


async def disable(call: Call) -> web.Response:
    entry = call.audit_entry("keys.disable", decision="allowed")
    record = await disable_key(call.runtime.database, _key_id(call), entry)
    return json_response(record.document())


async def verify(call: Call) -> web.Response:
    body: KeyVerifyRequest = call.body
    if (body.digest is None) == (body.message is None):
        raise ValidationFailed("give exactly one of digest and message")
    key_id = _key_id(call)
    record = await call.runtime.database.read(lambda tx: get_key(tx, key_id))
    data = bytes.fromhex(body.message if body.message is not None else body.digest or "")
    valid = verify_with_key(record, data, body.message is not None, bytes.fromhex(body.signature))
    return json_response({"valid": valid, "key_id": record.key_id, "family_id": record.family,
                          "version": record.version, "status": record.status.value,
                          "algorithm": record.algorithm.value})


PUBLIC_FORMATS = ("jwk", "cose", "pem")


async def public(call: Call) -> web.Response:
    wanted = call.request.query.get("format", "jwk")
    if wanted not in PUBLIC_FORMATS:
        raise ValidationFailed(f"format: one of {list(PUBLIC_FORMATS)}")
    record = await call.runtime.keys.get(call.runtime.database, _key_id(call))
    document: dict[str, object] = {"key_id": record.key_id, "format": wanted}
    if wanted == "jwk":
        document["jwk"] = jwk(record.algorithm, record.public_key, record.key_id)
    elif wanted == "cose":
        document["cose_key"] = cose_key(record.algorithm, record.public_key, record.key_id.encode(),
                                        call.runtime.profile.cose_alg(record.algorithm)).hex()
    else:
        document["public_key_pem"] = public_key_pem(record.algorithm, record.public_key)
    return json_response(document)


def _signing_input(record: KeyRecord, hex_data: str) -> bytes:
    data = bytes.fromhex(hex_data)
    if record.algorithm in ECDSA and len(data) != 32:
        raise ValidationFailed(f"an ECDSA digest is 32 bytes; got {len(data)}")
    if record.algorithm is Algorithm.ED25519 and len(data) > 65536:
        raise PayloadTooLarge("Ed25519 messages are limited to 64 KiB")
    return data


def _signature_document(record: KeyRecord, signature: bytes) -> dict[str, str]:
    document = {"signature": signature.hex()}
    if record.algorithm in ECDSA:
        document["der"] = der_from_raw(signature).hex()
    return document


async def sign(call: Call) -> web.Response:
    runtime = call.runtime
    record = await runtime.keys.for_signing(runtime.database, _key_id(call), Usage.RAW)
    body: SignRequest = call.body
    data = _signing_input(record, body.digest)
    signature = await runtime.signer_for(Usage.RAW).sign(record.key_id, record.algorithm.value, data)
    await runtime.audit.record(
        call.audit_entry(
            "keys.sign", decision="allowed", key_id=record.key_id,
            payload_hash=hashlib.sha256(data).hexdigest(),
            result={"signature_sha256": hashlib.sha256(signature).hexdigest()},
        )
    )
    return json_response(_signature_document(record, signature))


async def sign_batch(call: Call) -> web.Response:
    runtime = call.runtime
    body: BatchSignRequest = call.body
    if len(body.digests) > MAX_BATCH:
        raise PayloadTooLarge(f"at most {MAX_BATCH} digests per batch; got {len(body.digests)}")
    record = await runtime.keys.for_signing(runtime.database, body.key_id, Usage.RAW)
    items = [_signing_input(record, digest) for digest in body.digests]
    signatures = await runtime.signer_for(Usage.RAW).sign_many(record.key_id, record.algorithm.value, items)
    await runtime.audit.record(
        call.audit_entry(
            "keys.sign_batch", decision="allowed", key_id=record.key_id,
            payload_hash=hashlib.sha256(b"".join(items)).hexdigest(),
            result={"count": len(signatures),
                    "signatures_sha256": hashlib.sha256(b"".join(signatures)).hexdigest()},
        )
    )
    return json_response({"signatures": [signature.hex() for signature in signatures]})


KEY_ID_PARAM = "/v1/keys/{key_id}"

ENDPOINTS = [
    Endpoint(
        "POST", "/v1/keys", create_key, "Generate a key pair inside the HSM", Permission.KEYS_CREATE, "keys",
        request_model=KeyCreateRequest, response_model=KeyDocument, response_status=201,
        idempotency="optional", audited_action="keys.create",
    ),
    Endpoint("GET", "/v1/keys", list_all, "List keys", Permission.KEYS_READ, "keys", response_model=KeyList,
             audited_action="keys.list"),
    Endpoint("GET", KEY_ID_PARAM, show, "Show one key", Permission.KEYS_READ, "keys", response_model=KeyDocument,
             audited_action="keys.show"),
    Endpoint(
        "POST", KEY_ID_PARAM + "/sign", sign, "Sign one digest with a raw key", Permission.KEYS_SIGN, "keys",
        request_model=SignRequest, response_model=SignResponse, idempotency="optional", audited_action="keys.sign",
        responses={503: "HSM unavailable"},
    ),
    Endpoint(
        "POST", "/v1/sign/batch", sign_batch, "Sign up to 1,000 digests with one raw key", Permission.KEYS_SIGN,
        "keys", request_model=BatchSignRequest, response_model=BatchSignResponse, idempotency="optional",
        audited_action="keys.sign_batch", responses={413: "More than 1,000 digests", 503: "HSM unavailable"},
    ),
    Endpoint(
        "POST", KEY_ID_PARAM + "/rotate", rotate, "Make the next version of a key in the HSM, the active one",
        Permission.KEYS_CREATE, "keys", response_model=KeyDocument, response_status=201, idempotency="optional",
        audited_action="keys.rotate", responses={409: "Rotated meanwhile, or the next label is taken",
                                                 503: "HSM unavailable"},
    ),
    Endpoint(
        "POST", KEY_ID_PARAM + "/disable", disable, "Stop a key version: it signs nothing (its signatures still "
        "verify)", Permission.KEYS_CREATE, "keys", response_model=KeyDocument, audited_action="keys.disable",
    ),
    Endpoint(
        "POST", KEY_ID_PARAM + "/verify", verify, "Verify a signature with a key's public key (any version, in "
        "software)", Permission.KEYS_READ, "keys", request_model=KeyVerifyRequest, response_model=KeyVerifyResponse,
        audited_action="keys.verify",
    ),
    Endpoint(
        "GET", KEY_ID_PARAM + "/public", public, "A key's public key as JWK, COSE_Key or PEM", Permission.KEYS_READ,
        "keys", response_model=PublicKeyDocument, audited_action="keys.public",
        query=(("format", {"type": "string", "enum": list(PUBLIC_FORMATS)}, "jwk (default), cose or pem"),),
    ),
]
