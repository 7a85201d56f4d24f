-- Risk monitoring and early warning (docs/risk.md).
-- risk_signals is the outbox: each row is written in the same store transaction as the decision that
-- caused it (a refusal, an approval, a transfer, a discrepancy, a freeze, ...), so a crash cannot keep
-- the decision and lose its signal. The risk worker reads signals after commit, in seq order, evaluates
-- the rules over their windows and marks each signal evaluated in the transaction that writes the
-- events it gave rise to.
CREATE TABLE risk_signals (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    ts           TEXT NOT NULL,               -- ISO-8601 UTC, when the decision committed
    kind         TEXT NOT NULL,               -- e.g. transfer.signed, policy.refused, approval.rejected
    subject      TEXT NOT NULL,               -- what it is about: a wallet, device, client or EVM address
    amount_fen   INTEGER,                     -- integer minor units (fen); token amounts go in detail, as text
    detail       TEXT NOT NULL,               -- JSON object: ids, counterparties, reasons
    evaluated    INTEGER NOT NULL DEFAULT 0   -- 1 once the rules have seen it
);
CREATE INDEX risk_signals_pending ON risk_signals (evaluated, seq);
CREATE INDEX risk_signals_subject ON risk_signals (kind, subject, ts);

-- What the rules found. event_id is the idempotency key of every delivery (SSE, webhooks); seq is the
-- cursor of GET /v1/risk/events?after=.
CREATE TABLE risk_events (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id      TEXT NOT NULL UNIQUE,
    ts            TEXT NOT NULL,
    rule          TEXT NOT NULL,
    rule_version  INTEGER NOT NULL,
    severity      TEXT NOT NULL,              -- info | low | medium | high | critical
    score         INTEGER NOT NULL,           -- 0..100
    subject       TEXT NOT NULL,
    evidence      TEXT NOT NULL,              -- JSON object: ids, amounts, window
    status        TEXT NOT NULL DEFAULT 'open',  -- open | acknowledged | closed
    assignee      TEXT,
    updated_at    TEXT NOT NULL
);
CREATE INDEX risk_events_rule ON risk_events (rule, seq);
CREATE INDEX risk_events_severity ON risk_events (severity, seq);

-- Webhook deliveries: one row per (event, endpoint); at least once, retried with backoff, 'dead' after
-- the last attempt (an admin can replay it).
CREATE TABLE risk_deliveries (
    event_id         TEXT NOT NULL REFERENCES risk_events (event_id),
    endpoint         TEXT NOT NULL,           -- the configured webhook's name
    status           TEXT NOT NULL,           -- pending | delivered | dead
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TEXT NOT NULL,
    last_error       TEXT NOT NULL DEFAULT '',
    delivered_at     TEXT,
    PRIMARY KEY (event_id, endpoint)
);
CREATE INDEX risk_deliveries_due ON risk_deliveries (status, next_attempt_at);
