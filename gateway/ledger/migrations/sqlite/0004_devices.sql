-- Hard wallets (devices), their loads, the offline payments reconciled from their logs, the
-- discrepancies reconciliation raises, and one row per processed log export.

CREATE TABLE devices (
    device_id               TEXT PRIMARY KEY,
    wallet_id               TEXT NOT NULL REFERENCES wallets (wallet_id),
    model                   TEXT NOT NULL,
    public_key              BLOB NOT NULL UNIQUE,     -- uncompressed P-256 point
    tier                    INTEGER NOT NULL,
    cap_per_payment         INTEGER NOT NULL,
    cap_balance             INTEGER NOT NULL,
    cap_payments_per_sync   INTEGER NOT NULL,
    cert_iat                INTEGER NOT NULL,         -- epoch milliseconds
    cert_exp                INTEGER NOT NULL,
    certificate             BLOB NOT NULL,            -- COSE_Sign1, HSM-signed
    kid                     TEXT NOT NULL,
    status                  TEXT NOT NULL CHECK (status IN ('active', 'frozen', 'revoked', 'unloaded')),
    status_reason           TEXT NOT NULL DEFAULT '',
    stopped_at_ms           INTEGER,                  -- frozen or revoked at (payments dated later are held)
    load_seq                INTEGER NOT NULL DEFAULT 0,
    issued_fen              INTEGER NOT NULL DEFAULT 0 CHECK (issued_fen >= 0),   -- vouchers issued
    expired_fen             INTEGER NOT NULL DEFAULT 0 CHECK (expired_fen >= 0),  -- loaded after expiry
    spent_fen               INTEGER NOT NULL DEFAULT 0 CHECK (spent_fen >= 0),    -- payments within the loaded value
    returned_fen            INTEGER NOT NULL DEFAULT 0 CHECK (returned_fen >= 0), -- back to the wallet at unload
    chain_counter           INTEGER NOT NULL DEFAULT 0,   -- highest payment counter reconciled
    chain_hash              BLOB NOT NULL,            -- hash of that payment (empty: unknown, after a gap)
    rx_synced               INTEGER NOT NULL DEFAULT 0,   -- receipts reconciled
    final_counter           INTEGER,                  -- from the unload statement
    statement               BLOB,                     -- the unload statement (COSE_Sign1, device-signed)
    last_sync_at            TEXT,
    created_at              TEXT NOT NULL,
    created_by              TEXT NOT NULL,
    updated_at              TEXT NOT NULL
);
CREATE INDEX devices_wallet ON devices (wallet_id);

CREATE TABLE device_loads (
    device_id    TEXT NOT NULL REFERENCES devices (device_id),
    load_seq     INTEGER NOT NULL,
    amount       INTEGER NOT NULL CHECK (amount > 0),
    iat          INTEGER NOT NULL,
    exp          INTEGER NOT NULL,
    entry_id     TEXT NOT NULL REFERENCES journal (entry_id),
    payload      BLOB NOT NULL,                        -- the voucher's CBOR payload, fixed at posting
    voucher      BLOB,                                 -- COSE_Sign1, once signed
    kid          TEXT,
    loaded_at    INTEGER,                              -- device clock when it loaded it (from its log)
    expired_load INTEGER NOT NULL DEFAULT 0,           -- 1: the device loaded it after its expiry
    created_at   TEXT NOT NULL,
    created_by   TEXT NOT NULL,
    PRIMARY KEY (device_id, load_seq)
);

-- One row per distinct payment (SHA-256 of its payload), whichever side reported it first.
CREATE TABLE offline_payments (
    payment_hash    BLOB PRIMARY KEY,
    payer_device    TEXT NOT NULL,
    counter         INTEGER NOT NULL,
    payee_device    TEXT NOT NULL,
    amount          INTEGER NOT NULL CHECK (amount > 0),
    ts              INTEGER NOT NULL,
    prev            BLOB NOT NULL,
    envelope        BLOB NOT NULL,                     -- COSE_Sign1 as first received
    status          TEXT NOT NULL CHECK (status IN ('awaiting_payee', 'awaiting_payer', 'held', 'posted',
                                                    'honoured', 'rejected')),
    payer_seen      INTEGER NOT NULL DEFAULT 0,
    payee_seen      INTEGER NOT NULL DEFAULT 0,
    in_budget       INTEGER NOT NULL DEFAULT 0,        -- 1: counted in the payer device's spent value
    discrepancy_id  TEXT,                              -- the discrepancy holding it
    entry_id        TEXT,                              -- journal entry once posted or honoured
    first_seen_at   TEXT NOT NULL,
    posted_at       TEXT
);
CREATE INDEX offline_payments_payer ON offline_payments (payer_device, counter);
-- Partial indexes: most payments are posted within a sync or two and never enter them.
CREATE INDEX offline_payments_awaiting ON offline_payments (payee_device, ts) WHERE status = 'awaiting_payee';
CREATE INDEX offline_payments_hold ON offline_payments (discrepancy_id) WHERE discrepancy_id IS NOT NULL;

CREATE TABLE discrepancies (
    discrepancy_id  TEXT PRIMARY KEY,
    dedupe_key      TEXT NOT NULL UNIQUE,              -- the same finding is raised once
    kind            TEXT NOT NULL,
    device_id       TEXT,
    payment_hash    BLOB,
    amount          INTEGER NOT NULL DEFAULT 0,
    evidence        TEXT NOT NULL,                     -- JSON
    status          TEXT NOT NULL CHECK (status IN ('open', 'resolved')),
    sync_id         TEXT,
    created_at      TEXT NOT NULL,
    resolution      TEXT,
    note            TEXT,
    resolved_by     TEXT,
    resolved_at     TEXT
);
CREATE INDEX discrepancies_status ON discrepancies (status, created_at);

CREATE TABLE device_syncs (
    sync_id      TEXT PRIMARY KEY,
    device_id    TEXT NOT NULL REFERENCES devices (device_id),
    export_hash  BLOB NOT NULL,
    report       TEXT NOT NULL,                        -- JSON reconciliation report
    created_at   TEXT NOT NULL,
    created_by   TEXT NOT NULL,
    UNIQUE (device_id, export_hash)
);
