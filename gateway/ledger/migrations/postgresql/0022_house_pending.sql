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

-- ecny_post_cash (migration 0016) as it was, but for the issuance leg: pending, not a balance update.
CREATE OR REPLACE FUNCTION ecny_post_cash(
    p_kind TEXT, p_wallet TEXT, p_amount BIGINT, p_entry_id TEXT, p_actor TEXT, p_day TEXT, p_now TEXT,
    p_cap BIGINT[], p_single_threshold BIGINT, p_daily_threshold BIGINT,
    OUT reasons TEXT[], OUT missing BOOLEAN, OUT park BOOLEAN, OUT balance BIGINT
) LANGUAGE plpgsql AS $$
DECLARE
    w_status TEXT; w_tier INT; w_balance BIGINT; moved BIGINT; delta BIGINT;
BEGIN
    reasons := ARRAY[]::TEXT[];
    missing := false;
    park := false;
    PERFORM pg_advisory_xact_lock(ecny_lock_key('wallet:' || p_wallet));
    SELECT w.status, w.tier, a.balance INTO w_status, w_tier, w_balance
        FROM wallets w JOIN accounts a ON a.account_id = 'w:' || w.wallet_id WHERE w.wallet_id = p_wallet;
    IF NOT FOUND THEN
        missing := true;
        RETURN;
    END IF;
    IF p_kind = 'cash_in' THEN
        IF w_status <> 'active' THEN
            reasons := reasons || ('payee-wallet-' || w_status);
        END IF;
        IF p_cap[w_tier] IS NOT NULL AND w_balance + p_amount > p_cap[w_tier] THEN
            reasons := reasons || 'balance-cap-exceeded'::TEXT;
        END IF;
        delta := p_amount;
    ELSIF p_kind = 'cash_out' THEN
        IF w_status <> 'active' THEN
            reasons := reasons || ('payer-wallet-' || w_status);
        END IF;
        IF p_amount > w_balance THEN
            reasons := reasons || 'insufficient-funds'::TEXT;
        END IF;
        delta := -p_amount;
    ELSE
        RAISE EXCEPTION 'ecny_post_cash: unknown kind %', p_kind;
    END IF;
    IF cardinality(reasons) > 0 THEN
        RETURN;
    END IF;
    IF p_single_threshold IS NOT NULL THEN
        SELECT abs(COALESCE(SUM(p.amount), 0)) INTO moved FROM postings p JOIN journal j ON j.entry_id = p.entry_id
            WHERE p.account_id = 'w:' || p_wallet AND j.kind = p_kind AND j.business_day = p_day;
        IF p_amount > p_single_threshold OR moved + p_amount > p_daily_threshold THEN
            park := true;
            RETURN;
        END IF;
    END IF;
    INSERT INTO journal (entry_id, kind, reference, memo, actor, business_day, created_at)
        VALUES (p_entry_id, p_kind, p_wallet, '', p_actor, p_day, p_now);
    UPDATE accounts SET balance = accounts.balance + delta WHERE account_id = 'w:' || p_wallet
        RETURNING accounts.balance INTO balance;
    INSERT INTO house_pending (account_id, amount) VALUES ('bank:issuance', -delta);
    INSERT INTO postings (entry_id, account_id, amount)
        VALUES (p_entry_id, 'w:' || p_wallet, delta), (p_entry_id, 'bank:issuance', -delta);
END
$$;
