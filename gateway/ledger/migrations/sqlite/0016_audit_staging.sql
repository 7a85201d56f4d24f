-- Audit staging (docs/scaling.md). On PostgreSQL a decision writes its audit entries into audit_staged
-- in its own transaction, and one chainer per database links them into audit_log later; SQLite has one
-- writer and chains at once, so this table stays empty here: it exists so that both dialects have the
-- same schema (audit listings and `audit verify` count pending entries the same way on both).
CREATE TABLE audit_staged (
    staged_id     INTEGER PRIMARY KEY AUTOINCREMENT,
    ts            TEXT NOT NULL,
    actor         TEXT NOT NULL,
    role          TEXT NOT NULL,
    action        TEXT NOT NULL,
    decision      TEXT NOT NULL,
    reasons       TEXT NOT NULL,
    payload_hash  TEXT NOT NULL,
    key_id        TEXT NOT NULL,
    result        TEXT NOT NULL,
    request_id    TEXT NOT NULL
);

-- The staged entry a chained entry came from (NULL for entries chained at once). Unique: an entry can
-- never be chained twice, whatever a chainer that dies half-way does.
ALTER TABLE audit_log ADD COLUMN staged_id INTEGER;
CREATE UNIQUE INDEX audit_log_staged ON audit_log (staged_id);
