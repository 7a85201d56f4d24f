-- EVM (stablecoin) signing: gap-free nonces per (chain, address), the transactions that use them,
-- and the day's signed amounts per asset for the daily caps. Amounts are decimal TEXT: wei
-- outgrow 64-bit integers.

CREATE TABLE evm_nonces (
    chain_id    BIGINT NOT NULL,
    address     TEXT NOT NULL,               -- EIP-55
    next_nonce  BIGINT NOT NULL CHECK (next_nonce >= 0),
    updated_at  TEXT NOT NULL,
    PRIMARY KEY (chain_id, address)
);

-- Nonces allocated to a transaction that was never signed (approval rejected, expired or failed):
-- the next allocation for the address takes the lowest of these before a new one, so none is skipped.
CREATE TABLE evm_free_nonces (
    chain_id  BIGINT NOT NULL,
    address   TEXT NOT NULL,
    nonce     BIGINT NOT NULL,
    PRIMARY KEY (chain_id, address, nonce)
);

CREATE TABLE evm_transactions (
    transaction_id   TEXT PRIMARY KEY,
    chain_id         BIGINT NOT NULL,
    key_id           TEXT NOT NULL REFERENCES keys (key_id),
    from_address     TEXT NOT NULL,           -- EIP-55
    nonce            BIGINT NOT NULL,
    tx_type          TEXT NOT NULL,           -- eip1559 | legacy
    unsigned_tx      TEXT NOT NULL,           -- canonical JSON of every field the signature covers
    signing_hash     TEXT NOT NULL,           -- hex keccak-256 of the signing payload (what the HSM signs)
    intent           TEXT NOT NULL,           -- JSON: the decoded intent (asset, method, recipient, amount)
    asset            TEXT NOT NULL,           -- native | token address
    amount           TEXT NOT NULL,           -- base units, decimal
    business_day     TEXT NOT NULL,           -- UTC day the amount counts against
    status           TEXT NOT NULL,           -- unsigned | signed | pending_approval | rejected | expired | failed
    approval_id      TEXT REFERENCES approvals (approval_id),
    raw_transaction  BYTEA,
    tx_hash          TEXT,
    requested_by     TEXT NOT NULL,
    created_at       TEXT NOT NULL,
    signed_at        TEXT
);
-- A nonce belongs to at most one live transaction of an address: never reused.
CREATE UNIQUE INDEX evm_transactions_live_nonce ON evm_transactions (chain_id, from_address, nonce)
    WHERE status IN ('unsigned', 'signed', 'pending_approval');
CREATE INDEX evm_transactions_pending ON evm_transactions (chain_id, from_address, status);

CREATE TABLE evm_spend (
    chain_id      BIGINT NOT NULL,
    address       TEXT NOT NULL,
    asset         TEXT NOT NULL,
    business_day  TEXT NOT NULL,
    amount        TEXT NOT NULL,
    PRIMARY KEY (chain_id, address, asset, business_day)
);
