"""Bodies of the hard-wallet and reconciliation endpoints. Strict: a float amount is a 400."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

WalletId = Annotated[str, StringConstraints(pattern=r"^[0-9]{16}$")]
DeviceId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{2,63}$")]
Fen = Annotated[int, Field(gt=0, description="Amount in fen (1/100 yuan), a positive integer")]
Base64 = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]+={0,2}$", min_length=4, max_length=1_000_000)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class DeviceRegisterRequest(_Body):
    wallet_id: WalletId
    device_id: DeviceId
    public_key_pem: Annotated[str, StringConstraints(min_length=64, max_length=2048)] = Field(
        description="The device's P-256 public key (SubjectPublicKeyInfo PEM), from its `info` answer")
    model: Annotated[str, StringConstraints(min_length=1, max_length=64)]


class Caps(_Body):
    per_payment_fen: int
    balance_fen: int
    payments_per_sync: int


class DeviceDocument(_Body):
    device_id: str
    wallet_id: str
    model: str
    status: Literal["active", "frozen", "revoked", "unloaded"]
    status_reason: str
    tier: int
    caps: Caps
    public_key_pem: str
    certificate: str = Field(description="Base64 tagged COSE_Sign1 signed by the gateway's `voucher` key")
    kid: str = Field(description="key_id of the key that signed the certificate")
    issuer_public_key_pem: str | None = Field(description="That key's public key: the device pins it (`certify`)")
    certificate_iat_ms: int
    certificate_exp_ms: int
    load_seq: int
    issued_fen: int = Field(description="Value of all vouchers issued to the device")
    spent_fen: int = Field(description="Offline payments reconciled within the loaded value")
    returned_fen: int = Field(description="Value returned to the wallet at unload")
    expired_fen: int = Field(description="Value the device loaded after its voucher expired (not spendable)")
    outstanding_fen: int = Field(description="issued − spent − returned: value the offline reserve holds for it")
    chain_counter: int = Field(description="Highest payment counter reconciled")
    rx_synced: int = Field(description="Receipts reconciled")
    last_sync_at: str | None
    created_at: str
    updated_at: str


class RecertifiedDevice(DeviceDocument):
    endorsements: list[str] = Field(
        description="Base64 tagged COSE_Sign1 endorsements, oldest first, from the voucher key the device pins "
                    "to the certificate's issuer (empty when it is the same key): give them to the device with "
                    "the certificate (`certify`)")


class LoadRequest(_Body):
    amount_fen: Fen


class LoadDocument(_Body):
    device_id: str
    load_seq: int
    amount_fen: int
    expires_at_ms: int = Field(description="The device must load the voucher before this time")
    entry_id: str
    voucher: str = Field(description="Base64 tagged COSE_Sign1 {device_id, load_seq, amount, iat, exp}")
    kid: str


class UnloadRequest(_Body):
    statement: Base64 = Field(description="Base64 of the device's signed final statement (its `unload` answer)")


class UnloadResult(_Body):
    device_id: str
    status: Literal["unloaded"]
    returned_fen: int
    entry_id: str | None
    statement_mismatch: str | None = Field(description="Discrepancy raised when the statement's totals differ")


class RevokeRequest(_Body):
    reason: Annotated[str, StringConstraints(min_length=1, max_length=500)]


class SideCounts(_Body):
    received: int
    new: int
    known: int = Field(description="Reconciled before (a re-upload)")
    posted: int
    held: int
    invalid: int


class PaymentCounts(SideCounts):
    awaiting_payee: int = Field(description="Valid, waiting for the payee's record")


class ReceiptCounts(SideCounts):
    awaiting_payer: int = Field(description="Authentic, waiting for the payer's record")


class DiscrepancyRef(_Body):
    discrepancy_id: str
    kind: str
    amount_fen: int
    device_id: str | None
    payment_hash: str | None


class DeviceState(_Body):
    status: str
    chain_counter: int
    spent_fen: int
    outstanding_fen: int


class SyncReport(_Body):
    sync_id: str
    device_id: str
    export_hash: str
    replayed: bool = Field(description="The same export was reconciled before: nothing changed")
    counter: int
    rx: int
    payments: PaymentCounts
    receipts: ReceiptCounts
    posted_fen: int
    held_fen: int
    discrepancies: list[DiscrepancyRef] = Field(description="Raised by this sync")
    device: DeviceState
    ack: str = Field(description="Base64 COSE_Sign1 acknowledgement for the device's `ack_log`")
    kid: str


class DiscrepancyDocument(_Body):
    discrepancy_id: str
    kind: str
    description: str
    status: Literal["open", "resolved"]
    device_id: str | None
    payment_hash: str | None
    amount_fen: int
    evidence: dict[str, Any]
    sync_id: str | None
    created_at: str
    resolution: str | None
    note: str | None
    resolved_by: str | None
    resolved_at: str | None
    held_payments: list[str] = Field(description="Hashes of the payments this discrepancy holds (or held)")


class DiscrepancyList(_Body):
    discrepancies: list[DiscrepancyDocument]


class ResolveRequest(_Body):
    resolution: Literal["post", "honour", "reject", "acknowledge"]
    note: Annotated[str, StringConstraints(min_length=1, max_length=500)]
