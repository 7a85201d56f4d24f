-- EIP-191 personal messages signed through the JSON-RPC signer (personal_sign, eth_sign) by keys of
-- usage `message`: recorded with their digest before the HSM is asked, signed after commit (the same
-- two-phase signed operation as transactions and typed data).

CREATE TABLE evm_messages (
    message_id          TEXT PRIMARY KEY,
    key_id              TEXT NOT NULL REFERENCES keys (key_id),
    signer              TEXT NOT NULL,           -- EIP-55 address of the key
    method              TEXT NOT NULL,           -- personal_sign | eth_sign
    message             TEXT NOT NULL,           -- 0x-hex of the message bytes as received
    digest              TEXT NOT NULL,           -- hex keccak256("\x19Ethereum Signed Message:\n" || len || message)
    status              TEXT NOT NULL,           -- unsigned | signed
    signature           TEXT,                    -- 0x-hex r||s||v (v = 27 or 28)
    requested_by        TEXT NOT NULL,
    created_at          TEXT NOT NULL,
    signed_at           TEXT
);
CREATE INDEX evm_messages_signer ON evm_messages (signer, created_at);
