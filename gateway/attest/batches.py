"""The fingerprint batch a member publishes (``GET /v1/alliance/fingerprints``) and its verification.

A batch is a tagged COSE_Sign1, signed by the member's ``attest`` key, over canonical CBOR::

    {v: 1, type: "ecny-alliance-fingerprints", member, after, nonce, issued_at (ms), head,
     entries: [[seq, fingerprint (32 bytes), financed_at (ms)], ...]}

``entries`` are the member's financed fingerprints with seq ``after + 1``, ``after + 2``, … (the feed is
gap-free); ``head`` is the member's last seq when it answered; ``nonce`` echoes the puller's random
challenge. A batch carries no document data: a fingerprint is an HMAC under the alliance key.

The puller accepts a batch only when every one of these holds (else :class:`AllianceBatchRefused` and
nothing is stored): the signature verifies with the key configured for the member (the COSE ``alg`` must
be that key's); ``type`` and ``v`` are a batch's; ``member`` is the peer asked; ``nonce`` is the one just
sent (a recorded old answer, replayed, fails here); ``after`` is the cursor asked for (a batch cannot
rewind or skip the feed); seqs are contiguous; ``issued_at`` is recent and not before the last accepted
batch's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

import cbor2
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from gateway.errors import AllianceBatchRefused, ConfigError
from gateway.schemes import cose
from gateway.signing import Algorithm

BATCH_TYPE = "ecny-alliance-fingerprints"
FINGERPRINT_BYTES = 32


@dataclass(frozen=True)
class MemberKey:
    """A member's ``attest`` public key, as configured (a peer) or as recorded (this bank)."""

    member_id: str
    algorithm: Algorithm
    public_key: bytes  # SEC1 uncompressed point (P-256) or 32 bytes (Ed25519)
    pem: str

    @property
    def cose_alg(self) -> int:
        return cose.DEFAULT_ALGS[self.algorithm]


def member_key(member_id: str, pem: str) -> MemberKey:
    """Read a peer's public key PEM (P-256 or Ed25519).

    Raises:
        ConfigError: not a PEM public key of either kind.
    """
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"alliance.peers {member_id}: public_key_pem is not a PEM public key ({exc})") from None
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        point = key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        return MemberKey(member_id, Algorithm.ECDSA_P256, point, pem)
    if isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return MemberKey(member_id, Algorithm.ED25519, raw, pem)
    raise ConfigError(f"alliance.peers {member_id}: the public key must be P-256 or Ed25519")


@dataclass(frozen=True)
class BatchEntry:
    seq: int
    fingerprint: bytes
    financed_at_ms: int


def batch_payload(member_id: str, after: int, nonce: bytes, issued_at_ms: int, head: int,
                  entries: list[BatchEntry]) -> bytes:
    return cbor2.dumps({
        "v": 1, "type": BATCH_TYPE, "member": member_id, "after": after, "nonce": nonce,
        "issued_at": issued_at_ms, "head": head,
        "entries": [[entry.seq, entry.fingerprint, entry.financed_at_ms] for entry in entries],
    }, canonical=True)


@dataclass(frozen=True)
class Batch:
    member_id: str
    after: int
    head: int
    issued_at_ms: int
    entries: list[BatchEntry]


def _refuse(peer: MemberKey, why: str) -> AllianceBatchRefused:
    return AllianceBatchRefused(f"batch from {peer.member_id} refused: {why}", member=peer.member_id)


def _int(value: Any) -> TypeGuard[int]:
    return type(value) is int and value >= 0


def verify_batch(envelope: bytes, peer: MemberKey, cursor: int, nonce: bytes, now_ms: int, max_age_ms: int,
                 last_issued_at_ms: int, known_members: frozenset[str]) -> Batch:
    """Check one batch from ``peer`` asked for with ``cursor`` and ``nonce`` (see the module docstring).

    Raises:
        AllianceBatchRefused: naming the first check that failed.
    """
    try:
        message = cose.parse(envelope)
    except cose.CoseError as exc:
        raise _refuse(peer, f"not a COSE_Sign1 ({exc.detail})") from None
    if message.alg != peer.cose_alg:
        raise _refuse(peer, f"COSE alg {message.alg} is not that of the member's key ({peer.cose_alg})")
    if not cose.verify_sign1(message, peer.algorithm, peer.public_key):
        raise _refuse(peer, "the signature does not verify with the member's configured key (tampered, or signed "
                            "by another member)")
    try:
        claims = message.claims()
    except Exception:  # cbor2 raises several types on garbage
        raise _refuse(peer, "the payload is not CBOR") from None
    if not isinstance(claims, Mapping) or claims.get("type") != BATCH_TYPE or claims.get("v") != 1:
        raise _refuse(peer, "not a fingerprint batch (an attestation, or another record, signed by the same key)")
    member = claims.get("member")
    if member != peer.member_id:
        known = "a configured peer" if member in known_members else "an unknown member"
        raise _refuse(peer, f"it names member {str(member)[:64]!r} ({known}), not the peer asked")
    if claims.get("nonce") != nonce:
        raise _refuse(peer, "its nonce is not the one just sent: a replayed old answer")
    numbers: list[int] = [n for n in (claims.get(name) for name in ("after", "head", "issued_at")) if _int(n)]
    entries = claims.get("entries")
    if len(numbers) != 3 or not isinstance(entries, list):
        raise _refuse(peer, "after, head, issued_at or entries missing or of the wrong type")
    after, head, issued_at = numbers
    if after != cursor:
        raise _refuse(peer, f"it starts after seq {after}, not at the cursor {cursor}")
    if abs(now_ms - issued_at) > max_age_ms:
        raise _refuse(peer, f"issued {abs(now_ms - issued_at) // 1000} s from now: stale or from the future")
    if issued_at < last_issued_at_ms:
        raise _refuse(peer, "issued before the last batch accepted from this member")
    parsed: list[BatchEntry] = []
    for index, entry in enumerate(entries):
        if (not isinstance(entry, list) or len(entry) != 3 or not _int(entry[0]) or not _int(entry[2])
                or not isinstance(entry[1], bytes) or len(entry[1]) != FINGERPRINT_BYTES):
            raise _refuse(peer, f"entry {index} is not [seq, 32-byte fingerprint, time]")
        if entry[0] != cursor + index + 1:
            raise _refuse(peer, f"entry {index} has seq {entry[0]}, expected {cursor + index + 1} (a gap or reorder)")
        parsed.append(BatchEntry(entry[0], entry[1], entry[2]))
    if head < cursor + len(parsed):
        raise _refuse(peer, f"head {head} is below its own last entry")
    return Batch(peer.member_id, after, head, issued_at, parsed)
