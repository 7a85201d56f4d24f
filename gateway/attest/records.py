"""What the store holds for attestations (migration 0012): this bank's attestations and published feed,
the fingerprints peers published, the peers' cursors, and refused second financings ("hits").

Plain functions over a :class:`~gateway.ledger.store.Tx`; the flow decides, these only read and write.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gateway import clock
from gateway.errors import AttestationNotFound
from gateway.ledger.store import Params, Row, Tx

FEED_LOCK = "alliance-feed"
"""Serialises every finance attestation of this bank: publication_seq is MAX + 1 under it, so the feed
is gap-free and commits in seq order (a reader never sees seq n + 1 before n)."""


@dataclass(frozen=True)
class Financing:
    """Who financed a fingerprint first, and when."""

    member_id: str
    financed_at: str
    local_attestation: str | None  # this bank's attestation id, or None for a peer's


def first_financing(tx: Tx, fingerprint: str, member_id: str) -> Financing | None:
    """The earliest financing of ``fingerprint`` known here: this bank's own, or a peer's (as synced)."""
    own = tx.fetchone("SELECT attestation_id, created_at FROM attestations WHERE fingerprint = ?", (fingerprint,))
    peer = tx.fetchone("SELECT member_id, financed_at FROM alliance_fingerprints WHERE fingerprint = ? "
                       "ORDER BY financed_at, member_id LIMIT 1", (fingerprint,))
    found = []
    if own is not None:
        found.append(Financing(member_id, str(own["created_at"]), str(own["attestation_id"])))
    if peer is not None:
        found.append(Financing(str(peer["member_id"]), str(peer["financed_at"]), None))
    return min(found, key=lambda financing: financing.financed_at) if found else None


def next_publication_seq(tx: Tx) -> int:
    tx.lock(FEED_LOCK)
    row = tx.fetchone("SELECT MAX(publication_seq) AS head FROM attestations")
    return int(row["head"] or 0) + 1 if row is not None else 1


@dataclass(frozen=True)
class NewAttestation:
    attestation_id: str
    document_type: str
    purpose: str
    document_number: str
    issuer_tax_id: str
    document_sha256: str
    amount_minor: int
    currency: str
    fields: dict[str, Any]
    fingerprint: str | None
    publication_seq: int | None
    key_id: str
    claims: bytes
    created_by: str
    created_at: str


def insert_attestation(tx: Tx, new: NewAttestation) -> None:
    """Raises AlreadyExists when the fingerprint is taken (the unique constraint: a concurrent finance)."""
    tx.execute(
        "INSERT INTO attestations (attestation_id, document_type, purpose, document_number, issuer_tax_id, "
        "document_sha256, amount_minor, currency, fields, fingerprint, publication_seq, key_id, claims, "
        "created_by, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (new.attestation_id, new.document_type, new.purpose, new.document_number, new.issuer_tax_id,
         new.document_sha256, new.amount_minor, new.currency, json.dumps(new.fields, sort_keys=True),
         new.fingerprint, new.publication_seq, new.key_id, new.claims, new.created_by, new.created_at),
    )


def get_attestation(tx: Tx, attestation_id: str) -> Row:
    row = tx.fetchone("SELECT * FROM attestations WHERE attestation_id = ?", (attestation_id,))
    if row is None:
        raise AttestationNotFound(f"no attestation {attestation_id[:40]!r}")
    return row


def store_envelope(tx: Tx, attestation_id: str, envelope: bytes) -> tuple[str, Params]:
    """Queue the signature's write unless another finisher stored one first; the query (and its
    parameters) with a row only when the stored envelope is this one."""
    tx.queue("UPDATE attestations SET envelope = ? WHERE attestation_id = ? AND envelope IS NULL",
             (envelope, attestation_id))
    return "SELECT 1 FROM attestations WHERE attestation_id = ? AND envelope = ?", (attestation_id, envelope)


def search(tx: Tx, number: str | None, issuer_tax_id: str | None, limit: int) -> list[Row]:
    clauses, params = [], []
    if number:
        clauses.append("document_number = ?")
        params.append(number)
    if issuer_tax_id:
        clauses.append("issuer_tax_id = ?")
        params.append(issuer_tax_id)
    where = f"WHERE {' AND '.join(clauses)} " if clauses else ""
    return tx.fetchall(f"SELECT * FROM attestations {where}ORDER BY created_at DESC, attestation_id LIMIT ?",
                       (*params, limit))


def record_hit(tx: Tx, hit_id: str, fingerprint: str, document_type: str, number: str, issuer_tax_id: str,
               first: Financing, requested_by: str) -> None:
    tx.execute(
        "INSERT INTO attestation_hits (hit_id, ts, fingerprint, document_type, document_number, issuer_tax_id, "
        "financed_by, financed_at, requested_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (hit_id, clock.now_iso(), fingerprint, document_type, number, issuer_tax_id, first.member_id,
         first.financed_at, requested_by),
    )


def hits(tx: Tx, limit: int) -> list[Row]:
    return tx.fetchall("SELECT * FROM attestation_hits ORDER BY ts DESC, hit_id LIMIT ?", (limit,))


# --- the published feed and the peers' ----------------------------------------------------------------


def feed(tx: Tx, after: int, limit: int) -> tuple[list[Row], int]:
    """This bank's financed fingerprints after ``after``, in seq order, and the feed's head."""
    rows = tx.fetchall("SELECT publication_seq, fingerprint, created_at FROM attestations "
                       "WHERE publication_seq > ? ORDER BY publication_seq LIMIT ?", (after, limit))
    head = tx.fetchone("SELECT MAX(publication_seq) AS head FROM attestations")
    return rows, int(head["head"] or 0) if head is not None else 0


def peer_state(tx: Tx, member_id: str) -> Row | None:
    return tx.fetchone("SELECT * FROM alliance_peers WHERE member_id = ?", (member_id,))


def peer_states(tx: Tx) -> list[Row]:
    return tx.fetchall("SELECT * FROM alliance_peers ORDER BY member_id")


def ensure_peer(tx: Tx, member_id: str) -> None:
    tx.execute("INSERT INTO alliance_peers (member_id) VALUES (?) ON CONFLICT (member_id) DO NOTHING", (member_id,))


def store_peer_entries(tx: Tx, member_id: str, entries: list[tuple[int, str, str]], head: int,
                       issued_at: str) -> None:
    """Store a verified batch's entries (seq, fingerprint hex, financed_at ISO) and move the cursor."""
    received = clock.now_iso()
    for seq, fingerprint, financed_at in entries:
        tx.execute("INSERT INTO alliance_fingerprints (member_id, seq, fingerprint, financed_at, received_at) "
                   "VALUES (?, ?, ?, ?, ?) ON CONFLICT (member_id, seq) DO NOTHING",
                   (member_id, seq, fingerprint, financed_at, received))
    cursor = entries[-1][0] if entries else None
    tx.execute("UPDATE alliance_peers SET feed_cursor = COALESCE(?, feed_cursor), head = ?, last_issued_at = ?, "
               "last_sync_at = ?, last_error = '', last_error_at = '' WHERE member_id = ?",
               (cursor, head, issued_at, received, member_id))


def financed_here(tx: Tx, fingerprints: list[str]) -> list[Row]:
    """This bank's finance attestations whose fingerprint is among ``fingerprints`` (hex)."""
    if not fingerprints:
        return []
    return tx.fetchall("SELECT attestation_id, fingerprint, document_type, document_number, issuer_tax_id, "
                       f"created_at FROM attestations WHERE fingerprint IN ({', '.join('?' * len(fingerprints))})",
                       fingerprints)


def note_peer_error(tx: Tx, member_id: str, error: str) -> None:
    ensure_peer(tx, member_id)
    tx.execute("UPDATE alliance_peers SET last_error = ?, last_error_at = ? WHERE member_id = ?",
               (error[:500], clock.now_iso(), member_id))
