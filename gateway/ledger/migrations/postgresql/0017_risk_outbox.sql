-- The risk outbox proper (docs/risk.md). A decision's signal is one row here, in the decision's own
-- transaction: no secondary index to keep, so a transfer's commit writes one
-- small append. The monitor moves signals from here to risk_signals (the rules' indexed history) in
-- batches, in one transaction with its lease, and deletes what it moved. The seq here only orders the
-- outbox; a signal's identity is the seq risk_signals gives it when it is moved.
CREATE TABLE risk_outbox (
    seq           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ts            TEXT NOT NULL,
    kind          TEXT NOT NULL,
    subject       TEXT NOT NULL,
    amount_fen    BIGINT,
    detail        TEXT NOT NULL,
    actor         TEXT NOT NULL DEFAULT '',
    counterparty  TEXT NOT NULL DEFAULT ''
);
