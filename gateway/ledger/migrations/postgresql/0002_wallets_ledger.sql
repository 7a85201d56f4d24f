-- Wallets, the double-entry journal, transfers and maker-checker approvals.

CREATE TABLE wallets (
    wallet_id      TEXT PRIMARY KEY,          -- 16 digits, Luhn check digit last
    holder_name    TEXT NOT NULL,
    id_number      TEXT,
    phone          TEXT NOT NULL,
    tier           INTEGER NOT NULL CHECK (tier BETWEEN 1 AND 4),
    kind           TEXT NOT NULL CHECK (kind IN ('personal', 'corporate')),
    status         TEXT NOT NULL CHECK (status IN ('active', 'frozen', 'closed')),
    status_reason  TEXT NOT NULL DEFAULT '',
    out_seq        BIGINT NOT NULL DEFAULT 0,  -- transfers sent; the envelope's seq
    created_at     TEXT NOT NULL,
    created_by     TEXT NOT NULL,
    updated_at     TEXT NOT NULL
);
CREATE INDEX wallets_holder ON wallets (holder_name);
CREATE INDEX wallets_phone ON wallets (phone);

-- One account per wallet balance and per wallet offline reserve, plus the bank's own accounts.
-- Balances are materialised here and must always equal the sum of the account's postings.
CREATE TABLE accounts (
    account_id  TEXT PRIMARY KEY,             -- w:<wallet>, r:<wallet>, bank:issuance, bank:suspense
    wallet_id   TEXT REFERENCES wallets (wallet_id),
    kind        TEXT NOT NULL,                -- wallet | reserve | issuance | suspense | settlement
    balance     BIGINT NOT NULL,
    CHECK (kind NOT IN ('wallet', 'reserve') OR balance >= 0)
);

CREATE TABLE journal (
    entry_id      TEXT PRIMARY KEY,
    kind          TEXT NOT NULL,              -- cash_in | cash_out | transfer | load | unload | offline
    reference     TEXT NOT NULL,              -- the transfer, device load… this entry belongs to
    memo          TEXT NOT NULL DEFAULT '',
    actor         TEXT NOT NULL,
    business_day  TEXT NOT NULL,              -- YYYY-MM-DD in China Standard Time (UTC+8)
    created_at    TEXT NOT NULL
);

CREATE TABLE postings (
    posting_id  BIGSERIAL PRIMARY KEY,
    entry_id    TEXT NOT NULL REFERENCES journal (entry_id),
    account_id  TEXT NOT NULL REFERENCES accounts (account_id),
    amount      BIGINT NOT NULL CHECK (amount <> 0)  -- signed: + raises the account's balance
);
CREATE INDEX postings_account ON postings (account_id, posting_id);
CREATE INDEX postings_entry ON postings (entry_id);

-- Outgoing payments per wallet and CST business day, for the daily and annual tier limits.
CREATE TABLE wallet_spend (
    wallet_id     TEXT NOT NULL REFERENCES wallets (wallet_id),
    business_day  TEXT NOT NULL,
    amount        BIGINT NOT NULL,
    PRIMARY KEY (wallet_id, business_day)
);

CREATE TABLE approvals (
    approval_id    TEXT PRIMARY KEY,
    kind           TEXT NOT NULL,             -- transfer | evm_transaction
    payload        TEXT NOT NULL,             -- canonical JSON of the exact operation
    payload_hash   TEXT NOT NULL,             -- hex SHA-256 of payload
    requested_by   TEXT NOT NULL,
    status         TEXT NOT NULL,             -- pending | executed | rejected | expired | failed
    decided_by     TEXT,
    decided_at     TEXT,
    note           TEXT NOT NULL DEFAULT '',
    result         TEXT,                      -- JSON: the posted transfer or signed transaction
    created_at     TEXT NOT NULL,
    expires_at     TEXT NOT NULL
);
CREATE INDEX approvals_status ON approvals (status, created_at);

CREATE TABLE transfers (
    transfer_id   TEXT PRIMARY KEY,
    from_wallet   TEXT NOT NULL REFERENCES wallets (wallet_id),
    to_wallet     TEXT NOT NULL REFERENCES wallets (wallet_id),
    amount        BIGINT NOT NULL CHECK (amount > 0),
    memo          TEXT NOT NULL DEFAULT '',
    status        TEXT NOT NULL,              -- posted | pending_approval | rejected | expired | failed
    entry_id      TEXT REFERENCES journal (entry_id),
    seq           BIGINT,
    ts            BIGINT,                    -- epoch milliseconds in the envelope
    payload       BYTEA,                       -- the CBOR envelope payload, fixed at posting
    envelope      BYTEA,                       -- COSE_Sign1, once signed
    kid           TEXT,
    approval_id   TEXT REFERENCES approvals (approval_id),
    requested_by  TEXT NOT NULL,
    created_at    TEXT NOT NULL
);
CREATE INDEX transfers_unsigned ON transfers (status, envelope);

INSERT INTO accounts (account_id, wallet_id, kind, balance) VALUES ('bank:issuance', NULL, 'issuance', 0);
INSERT INTO accounts (account_id, wallet_id, kind, balance) VALUES ('bank:suspense', NULL, 'suspense', 0);
