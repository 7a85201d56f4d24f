"""Request and response bodies of the foundation endpoints. Strict: no coercion, no extra fields."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, StringConstraints

from gateway.keys import Usage
from gateway.signing import Algorithm

Hex = Annotated[str, StringConstraints(pattern=r"^(?:[0-9a-fA-F]{2})+$", max_length=131072)]
Label = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SessionRequest(_Body):
    username: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    password: Annotated[str, StringConstraints(min_length=1, max_length=1024)]


class SessionResponse(_Body):
    token: str
    role: str
    expires_at: str


class KeyCreateRequest(_Body):
    label: Label
    # Enums arrive as strings in JSON: let just these fields accept them; every other field is strict.
    algorithm: Annotated[Algorithm, Strict(False)]
    usage: Annotated[list[Annotated[Usage, Strict(False)]], Field(min_length=1, max_length=5)]


class KeyDocument(_Body):
    key_id: str
    label: str
    algorithm: str
    usage: list[str]
    public_key_pem: str
    address: str | None = Field(default=None, description="EIP-55 address (secp256k1 keys only)")
    created_at: str
    family_id: str = Field(description="Key id of the family's first version (rotations share it)")
    version: int = Field(description="1 for a new key; +1 per rotation")
    status: Literal["active", "retired", "disabled"] = Field(
        description="active: signs; retired: superseded, verifies only; disabled: stopped, verifies only")
    status_changed_at: str | None
    origin: Literal["generated", "adopted"]
    active_for: list[str] = Field(description="The usages among ecny, voucher and audit this key signs now (each "
                                              "has exactly one such key)")


class KeyList(_Body):
    keys: list[KeyDocument]


class SignRequest(_Body):
    digest: Hex = Field(description="Hex: a 32-byte digest for ECDSA keys; the message bytes for Ed25519")


class SignResponse(_Body):
    signature: str = Field(description="Hex: raw r‖s for ECDSA, the 64-byte signature for Ed25519")
    der: str | None = Field(default=None, description="Hex DER signature (ECDSA only)")


class BatchSignRequest(_Body):
    key_id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
    digests: Annotated[list[Hex], Field(min_length=1)]


class BatchSignResponse(_Body):
    signatures: list[str]



class KeyVerifyRequest(_Body):
    digest: Hex | None = Field(default=None, description="Hex: the 32-byte digest that was signed (ECDSA); for "
                                                         "Ed25519 the signed bytes")
    message: Hex | None = Field(default=None, description="Hex: the message; the gateway hashes it as it signs "
                                                          "messages (SHA-256 for P-256, Keccak-256 for secp256k1)")
    signature: Hex = Field(description="Hex: raw r‖s, r‖s‖v or DER for ECDSA; 64 bytes for Ed25519")


class KeyVerifyResponse(_Body):
    valid: bool
    key_id: str
    family_id: str
    version: int
    status: str = Field(description="The version's status now: a disabled key's old signatures still verify")
    algorithm: str


class PublicKeyDocument(_Body):
    key_id: str
    format: Literal["jwk", "cose", "pem"]
    jwk: dict[str, str] | None = Field(default=None, description="RFC 7517 JWK (EC P-256/secp256k1, OKP Ed25519)")
    cose_key: str | None = Field(default=None, description="Hex of the CBOR COSE_Key (RFC 9052 §7); kid as in the "
                                                           "key's COSE_Sign1 headers")
    public_key_pem: str | None = None

class AuditEntryDocument(_Body):
    seq: int
    ts: str
    actor: str
    role: str
    action: str
    decision: str
    reasons: list[str]
    payload_hash: str
    key_id: str
    result: dict[str, object]
    request_id: str
    entry_hash: str


class AuditPage(_Body):
    entries: list[AuditEntryDocument]
    next_after_seq: int | None
    pending: int = Field(description="Entries committed but not chained yet (PostgreSQL's audit staging; "
                                     "always 0 on SQLite): they appear here once the chainer numbers them")


class AuditVerifyResponse(_Body):
    ok: bool
    entries: int
    checkpoints: int
    last_checkpoint_seq: int
    head_seq: int
    first_bad_seq: int | None
    problem: str
    warnings: list[str]
    trust: str = Field(description="Whose keys were trusted: `key-table` (a self-check, not outsider-grade) "
                                   "or `pinned`")
    pending: int = Field(description="Entries committed but not chained yet (PostgreSQL's audit staging), "
                                     "which this verification does not cover")


class AuditCheckpointDocument(_Body):
    seq: int = Field(description="The last entry the checkpoint covers")
    head_hash: str = Field(description="Hex: the entry hash at seq")
    key_id: str
    algorithm: str
    signature: str = Field(description="Hex: the audit key's signature of the checkpoint message")
    ts: str


class AuditCheckpointPage(_Body):
    checkpoints: list[AuditCheckpointDocument] = Field(
        description="One witness line each: a collector appends each as a JSON line to its own witness file"
    )
    next_after: int | None = Field(description="Pass as `after` for the next page; null on the last page")


class Health(_Body):
    status: str


class Readiness(_Body):
    status: str
    hsm: dict[str, object] = Field(description="only {ready}: the details are in /v1/status")
    store: dict[str, object]


class SessionEnded(_Body):
    username: str
    ended: bool  # false when the session had ended already (a second logout racing the first)


class UserRoleRequest(_Body):
    role: Literal["teller", "supervisor", "auditor", "admin"]  # backend is for API clients only


class UserDocument(_Body):
    username: str
    role: str
    disabled_at: str | None
    live_sessions: int
    sessions_ended: int = 0  # by this request


class ServiceStatus(_Body):
    status: str = Field(description="ready or unavailable")
    hsm: dict[str, object] = Field(description="ready, workers, workers_up and detail (what went wrong)")
    store: dict[str, object] = Field(description="ready")
