-- EIP-712 requests: each document the gateway signs or parks for a supervisor, with its digest and the
-- intent decoded from it (EIP-2612 permit, EIP-3009 authorisation), whose amount counts in evm_spend
-- like a transaction's. The document is kept whole: an approval re-hashes it before signing.

CREATE TABLE evm_typed_data (
    request_id          TEXT PRIMARY KEY,
    chain_id            BIGINT NOT NULL,
    key_id              TEXT NOT NULL REFERENCES keys (key_id),
    signer              TEXT NOT NULL,           -- EIP-55 address of the key
    primary_type        TEXT NOT NULL,
    verifying_contract  TEXT NOT NULL,           -- EIP-55
    document            TEXT NOT NULL,           -- canonical JSON of the typed-data document as received
    digest              TEXT NOT NULL,           -- hex EIP-712 digest (what the HSM signs)
    intent              TEXT,                    -- JSON of the decoded intent; NULL for a listed type
    business_day        TEXT NOT NULL,           -- UTC day the amount counts against
    status              TEXT NOT NULL,           -- unsigned | signed | pending_approval | rejected | failed
    approval_id         TEXT REFERENCES approvals (approval_id),
    signature           TEXT,                    -- 0x-hex r||s||v
    requested_by        TEXT NOT NULL,
    created_at          TEXT NOT NULL,
    signed_at           TEXT
);
CREATE INDEX evm_typed_data_signer ON evm_typed_data (chain_id, signer, status);
