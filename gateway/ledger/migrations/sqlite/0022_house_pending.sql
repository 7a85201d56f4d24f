-- The bank's own accounts (bank:issuance, bank:suspense) without a row every cash movement locks
-- (docs/scaling.md, "Locks"). On PostgreSQL a posting to one of them adds its amount to house_pending,
-- in its own transaction and without a lock, and the fold (gateway.ledger.journal.fold_house) moves
-- what has committed into accounts.balance; the account's balance is accounts.balance plus what is
-- still pending. SQLite has one writer and updates the balance at once, so this table stays empty
-- here: it exists so that both dialects read balances and check the ledger the same way.
CREATE TABLE house_pending (
    pending_id  INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id  TEXT NOT NULL,
    amount      INTEGER NOT NULL
);
CREATE INDEX house_pending_account ON house_pending (account_id);
