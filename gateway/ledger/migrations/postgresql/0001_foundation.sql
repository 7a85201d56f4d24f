-- Keys, API clients, users, teller sessions, idempotency records and the audit chain.

CREATE TABLE keys (
    key_id      TEXT PRIMARY KEY,            -- 32 hex digits; also the token object's CKA_ID
    label       TEXT NOT NULL UNIQUE,
    algorithm   TEXT NOT NULL,
    usages      TEXT NOT NULL,               -- comma-separated, sorted
    public_key  BYTEA NOT NULL,               -- SEC1 point (ECDSA) or 32 bytes (Ed25519)
    created_at  TEXT NOT NULL,
    created_by  TEXT NOT NULL
);

CREATE TABLE clients (
    name        TEXT PRIMARY KEY,
    role        TEXT NOT NULL,
    key_prefix  TEXT NOT NULL UNIQUE,        -- public part of the API key, for lookup
    key_hash    BYTEA NOT NULL,               -- SHA-256 of the whole key; the key itself is never stored
    created_at  TEXT NOT NULL,
    revoked_at  TEXT
);

CREATE TABLE users (
    username      TEXT PRIMARY KEY,
    role          TEXT NOT NULL,
    password_hash TEXT NOT NULL,             -- argon2id
    created_at    TEXT NOT NULL,
    disabled_at   TEXT
);

CREATE TABLE user_sessions (
    token_hash  BYTEA PRIMARY KEY,            -- SHA-256 of the session token
    username    TEXT NOT NULL REFERENCES users (username),
    role        TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    expires_at  TEXT NOT NULL
);
CREATE INDEX user_sessions_expiry ON user_sessions (expires_at);

CREATE TABLE idempotency (
    principal     TEXT NOT NULL,
    idem_key      TEXT NOT NULL,
    request_hash  BYTEA NOT NULL,
    status        INTEGER NOT NULL,
    content_type  TEXT NOT NULL,
    body          BYTEA NOT NULL,
    created_at    TEXT NOT NULL,
    PRIMARY KEY (principal, idem_key)
);

CREATE TABLE audit_log (
    seq           BIGINT PRIMARY KEY,
    ts            TEXT NOT NULL,
    actor         TEXT NOT NULL,
    role          TEXT NOT NULL,
    action        TEXT NOT NULL,
    decision      TEXT NOT NULL,             -- allowed | refused | failed
    reasons       TEXT NOT NULL,             -- JSON array
    payload_hash  TEXT NOT NULL,             -- hex SHA-256 of the request payload, or ''
    key_id        TEXT NOT NULL,             -- '' when no key was involved
    result        TEXT NOT NULL,             -- JSON object
    request_id    TEXT NOT NULL,
    prev_hash     BYTEA NOT NULL,
    entry_hash    BYTEA NOT NULL
);

CREATE TABLE audit_checkpoints (
    seq         BIGINT PRIMARY KEY REFERENCES audit_log (seq),
    head_hash   BYTEA NOT NULL,
    key_id      TEXT NOT NULL,
    algorithm   TEXT NOT NULL,
    signature   BYTEA NOT NULL,
    ts          TEXT NOT NULL
);
