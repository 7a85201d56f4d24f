-- The bank's own accounts (bank:issuance, bank:suspense) without a row every cash movement locks
-- (docs/scaling.md, "Locks"). Until now each cash-in and cash-out updated bank:issuance's balance row and
-- held that row's lock until COMMIT: every cash movement in the database, from every instance, waited on
-- it (at a 5 ms round trip about 110 a second at most, falling as clients were added). A posting to a
-- bank account now adds its amount to house_pending, in its own transaction and taking no lock; the
-- fold (gateway.ledger.journal.fold_house, run every [store] house_fold_seconds) moves what has committed
-- into accounts.balance. An account's balance is accounts.balance plus what is still pending, and the
-- ledger check compares that sum with the account's postings. No foreign key: the posting beside each
-- row has one, and the two bank accounts are fixed.
CREATE TABLE house_pending (
    pending_id  BIGSERIAL PRIMARY KEY,
    account_id  TEXT NOT NULL,
    amount      BIGINT NOT NULL
);
CREATE INDEX house_pending_account ON house_pending (account_id);

-- ecny_post_cash adds its issuance leg here from migration 0023 on, which replaces the function once for
-- both changes (the daily totals too); the two landed together.
