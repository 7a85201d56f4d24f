"""Bodies of the wallet, transfer and approval endpoints. Strict: a float amount is a 400."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

WalletId = Annotated[str, StringConstraints(pattern=r"^[0-9]{16}$")]
Fen = Annotated[int, Field(gt=0, description="Amount in fen (1/100 yuan), a positive integer")]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class WalletOpenRequest(_Body):
    holder_name: Annotated[str, StringConstraints(min_length=1, max_length=128, strip_whitespace=True)]
    id_number: Annotated[str, StringConstraints(pattern=r"^[0-9A-Za-z]{6,32}$")] | None = None
    phone: Annotated[str, StringConstraints(pattern=r"^\+?[0-9]{6,20}$")]
    tier: Annotated[int, Field(ge=1, le=4)]
    kind: Literal["personal", "corporate"]


class WalletDocument(_Body):
    wallet_id: str
    holder_name: str
    id_number: str | None = Field(description="Masked: first and last four characters only")
    phone: str
    tier: int
    kind: str
    status: str
    status_reason: str
    balance_fen: int
    offline_reserve_fen: int
    created_at: str
    updated_at: str


class WalletList(_Body):
    wallets: list[WalletDocument]


class StatusRequest(_Body):
    status: Literal["active", "frozen", "closed"]
    reason: Annotated[str, StringConstraints(min_length=1, max_length=500)]


class TierRequest(_Body):
    tier: Annotated[int, Field(ge=1, le=4)]


class AmountRequest(_Body):
    amount_fen: Fen


class CashResult(_Body):
    entry_id: str
    wallet_id: str
    amount_fen: int
    balance_fen: int


class TransactionDocument(_Body):
    posting_id: int
    entry_id: str
    kind: str
    reference: str
    memo: str
    account: Literal["wallet", "reserve"]
    amount_fen: int = Field(description="Signed: positive credits the wallet")
    business_day: str
    created_at: str


class TransactionPage(_Body):
    transactions: list[TransactionDocument]
    next_cursor: str | None


class TransferRequest(_Body):
    from_wallet: WalletId
    to_wallet: WalletId
    amount_fen: Fen
    memo: Annotated[str, StringConstraints(max_length=140)] = ""


class TransferDocument(_Body):
    transfer_id: str
    from_wallet: str
    to_wallet: str
    amount_fen: int
    memo: str
    status: Literal["posted", "pending_approval", "rejected", "failed", "expired"]
    created_at: str
    approval_id: str | None = None
    envelope: str | None = Field(default=None, description="Base64 tagged COSE_Sign1 (once posted)")
    kid: str | None = Field(default=None, description="key_id of the key that signed the envelope")
    seq: int | None = None


class DecisionRequest(_Body):
    payload_hash: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] = Field(
        description="SHA-256 (hex) of the payload the supervisor reviewed; must match the pending one"
    )
    note: Annotated[str, StringConstraints(max_length=500)] = ""


class ApprovalDocument(_Body):
    approval_id: str
    kind: str
    payload: dict[str, object]
    payload_hash: str
    requested_by: str
    requested_owner: str = Field(description="The person behind the requester (no identity of theirs may decide)")
    interested_owners: list[str] = Field(
        default_factory=list,
        description="Other people with a stake in the operation (e.g. the device's registrar); none of them may decide")
    status: Literal["pending", "executed", "rejected", "expired", "failed"]
    decided_by: str | None
    decided_at: str | None
    note: str
    result: dict[str, object] | None
    created_at: str
    expires_at: str


class ApprovalList(_Body):
    approvals: list[ApprovalDocument]


class WalletOpened(WalletDocument):
    tier_approval: ApprovalDocument | None = Field(
        default=None,
        description="Asked for at tier 1: the wallet is opened at tier 2 and this is the pending approval of "
                    "its upgrade to tier 1 (a second person decides it)")
