"""What the teller UI's screens show: the gateway's answers as typed, immutable results.

:class:`~tui.client.GatewayClient` (the transport) builds them from the gateway's JSON documents; the
screens only read them. Nothing here does I/O.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Session:
    username: str
    token: str
    role: str
    expires_at: str


@dataclass(frozen=True)
class Readiness:
    ready: bool
    hsm_ready: bool
    hsm_workers: int
    hsm_workers_up: int
    hsm_detail: str
    store_ready: bool


@dataclass(frozen=True)
class MetricsSample:
    """The counters the dashboard turns into rates."""

    signatures_total: float
    requests_total: float
    refusals_total: float


@dataclass(frozen=True)
class Wallet:
    wallet_id: str
    holder_name: str
    id_number: str | None
    phone: str
    tier: int
    kind: str
    status: str
    status_reason: str
    balance_fen: int
    offline_reserve_fen: int
    created_at: str
    updated_at: str
    tier_approval: "Approval | None" = None
    """Opened with tier 1 asked for: the wallet is tier 2 and this upgrade waits for a second person."""


@dataclass(frozen=True)
class Transaction:
    posting_id: int
    entry_id: str
    kind: str
    reference: str
    memo: str
    account: str
    amount_fen: int
    business_day: str
    created_at: str


@dataclass(frozen=True)
class TransactionPage:
    transactions: tuple[Transaction, ...]
    next_cursor: str | None


@dataclass(frozen=True)
class CashResult:
    entry_id: str
    wallet_id: str
    amount_fen: int
    balance_fen: int


def canonical_json(value: Any) -> str:
    """The gateway's canonical JSON (sorted keys, no spaces, UTF-8): what an approval's hash covers."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class Approval:
    approval_id: str
    kind: str
    payload: dict[str, Any]
    payload_hash: str
    requested_by: str
    status: str
    decided_by: str | None
    decided_at: str | None
    note: str
    result: dict[str, Any] | None
    created_at: str
    expires_at: str

    def shown_hash(self) -> str:
        """SHA-256 of the payload as decoded and shown here. The decision is sent with this hash, so
        the gateway executes only what the supervisor saw (it refuses if it differs from the pending one)."""
        return hashlib.sha256(canonical_json(self.payload).encode()).hexdigest()

    @property
    def hash_matches(self) -> bool:
        return self.shown_hash() == self.payload_hash


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    ts: str
    actor: str
    role: str
    action: str
    decision: str
    reasons: tuple[str, ...]
    payload_hash: str
    key_id: str
    result: dict[str, Any]
    request_id: str
    entry_hash: str


@dataclass(frozen=True)
class AuditPage:
    entries: tuple[AuditEntry, ...]
    next_after_seq: int | None


@dataclass(frozen=True)
class AuditVerification:
    ok: bool
    entries: int
    checkpoints: int
    head_seq: int
    first_bad_seq: int | None
    problem: str
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class Discrepancy:
    """A reconciliation flag. The gateway's document is kept whole in ``document`` (evidence and all)."""

    discrepancy_id: str
    kind: str
    status: str
    device_id: str
    wallet_id: str
    amount_fen: int | None
    evidence: dict[str, Any]
    created_at: str
    document: dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True)
class DeviceRecord:
    device_id: str
    wallet_id: str
    status: str
    model: str
    document: dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True)
class Registration:
    certificate: bytes
    issuer_key_pem: str
    document: dict[str, Any] = field(repr=False, compare=False)
    endorsements: tuple[bytes, ...] = ()
    """A re-certification's: the endorsements from the key the device pins to the certificate's issuer."""


@dataclass(frozen=True)
class LoadVoucher:
    voucher: bytes
    load_seq: int
    document: dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True)
class RiskEvent:
    """What a risk rule found (``GET /v1/risk/events``); ``evidence`` holds ids, amounts and the window."""

    seq: int
    event_id: str
    ts: str
    rule: str
    rule_version: int
    severity: str
    score: int
    subject: str
    evidence: dict[str, Any]
    status: str
    assignee: str | None


@dataclass(frozen=True)
class RiskPage:
    events: tuple[RiskEvent, ...]
    next_after: int | None
    """Pass as ``after`` for more; None when this page was the last one so far."""


@dataclass(frozen=True)
class Attestation:
    """A trade-finance attestation as the gateway lists it (``attestation``: base64 COSE_Sign1)."""

    attestation_id: str
    document_type: str
    purpose: str
    member_id: str
    number: str
    issuer_tax_id: str
    amount_minor: int
    currency: str
    fingerprint: str | None
    created_at: str
    attestation: str | None


@dataclass(frozen=True)
class AttestationVerdict:
    """What ``POST /v1/attestations/verify`` said of an attestation file."""

    valid: bool
    reason: str
    issuer: str | None
    kid: str
    claims: dict[str, Any]


@dataclass(frozen=True)
class FinancingHit:
    """A refused second financing (409 already-financed)."""

    hit_id: str
    ts: str
    document_type: str
    document_number: str
    issuer_tax_id: str
    financed_by: str
    financed_at: str
    requested_by: str
