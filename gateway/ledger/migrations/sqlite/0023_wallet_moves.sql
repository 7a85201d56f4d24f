-- What each wallet moved per business day by cash-in, cash-out and device load (the signed sum of
-- those entries' postings on its wallet account), for the approval thresholds' daily totals. The
-- thresholds summed the wallet's postings of the day joined with the journal on every cash movement:
-- a cost that grew with the wallet's history (and, planned on a young database, with the whole
-- journal: 12.6 ms a cash-in at 16 clients in bench/pg_scaling.py --kind cash). Written in the
-- transaction that posts; `ledger check` compares it with the postings.
CREATE TABLE wallet_moves (
    wallet_id     TEXT NOT NULL,
    business_day  TEXT NOT NULL,
    kind          TEXT NOT NULL,
    amount        INTEGER NOT NULL,
    PRIMARY KEY (wallet_id, business_day, kind)
);
INSERT INTO wallet_moves (wallet_id, business_day, kind, amount)
    SELECT substr(p.account_id, 3), j.business_day, j.kind, SUM(p.amount)
    FROM postings p JOIN journal j ON j.entry_id = p.entry_id
    WHERE j.kind IN ('cash_in', 'cash_out', 'device_load') AND p.account_id LIKE 'w:%'
    GROUP BY substr(p.account_id, 3), j.business_day, j.kind;
