-- Risk monitoring (docs/risk.md), what 0011 lacked for the rules and for triage.
-- Who made a decision (actor: a principal scope such as client:NAME or user:NAME) and whom it names
-- besides its subject (counterparty: a payee wallet, an EVM recipient) are columns, so that the rules
-- read the windows "per API client or teller" and "to one payee" by index, as "per subject" already is.
ALTER TABLE risk_signals ADD COLUMN actor TEXT NOT NULL DEFAULT '';
ALTER TABLE risk_signals ADD COLUMN counterparty TEXT NOT NULL DEFAULT '';
CREATE INDEX risk_signals_actor ON risk_signals (kind, actor, ts);
CREATE INDEX risk_signals_counterparty ON risk_signals (kind, counterparty, ts);

-- The last event of a rule about a subject: the rules report only evidence newer than it.
CREATE INDEX risk_events_subject ON risk_events (rule, subject, seq);

-- Who an event names (the actors whose decisions are its evidence, its subject when that is a
-- principal): a backend client reads the events that name it, and nobody triages an event that
-- names them.
CREATE TABLE risk_event_parties (
    party      TEXT NOT NULL,
    event_seq  BIGINT NOT NULL,
    PRIMARY KEY (party, event_seq)
);

-- One evaluator at a time across processes and instances: the holder renews its lease with every batch
-- it stores; another process takes over once the lease has expired.
CREATE TABLE risk_monitor_lease (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    expires_at  TEXT NOT NULL
);
