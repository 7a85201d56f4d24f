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
    amount        BIGINT NOT NULL,
    PRIMARY KEY (wallet_id, business_day, kind)
);
INSERT INTO wallet_moves (wallet_id, business_day, kind, amount)
    SELECT substr(p.account_id, 3), j.business_day, j.kind, SUM(p.amount)
    FROM postings p JOIN journal j ON j.entry_id = p.entry_id
    WHERE j.kind IN ('cash_in', 'cash_out', 'device_load') AND p.account_id LIKE 'w:%'
    GROUP BY substr(p.account_id, 3), j.business_day, j.kind;

-- The two server-side posts of migration 0016 read the day's total from wallet_moves and add to it;
-- ecny_post_cash also adds its issuance leg to house_pending (migration 0022), taking no row lock.
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
        SELECT abs(COALESCE(SUM(m.amount), 0)) INTO moved FROM wallet_moves m
            WHERE m.wallet_id = p_wallet AND m.business_day = p_day AND m.kind = p_kind;
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
    INSERT INTO wallet_moves (wallet_id, business_day, kind, amount) VALUES (p_wallet, p_day, p_kind, delta)
        ON CONFLICT ON CONSTRAINT wallet_moves_pkey DO UPDATE SET amount = wallet_moves.amount + excluded.amount;
    INSERT INTO postings (entry_id, account_id, amount)
        VALUES (p_entry_id, 'w:' || p_wallet, delta), (p_entry_id, 'bank:issuance', -delta);
END
$$;

CREATE OR REPLACE FUNCTION ecny_post_device_load(
    p_device TEXT, p_amount BIGINT, p_entry_id TEXT, p_actor TEXT, p_day TEXT, p_now TEXT, p_now_ms BIGINT,
    p_exp_ms BIGINT, p_payload_head BYTEA, p_payload_tail BYTEA, p_single_threshold BIGINT,
    p_daily_threshold BIGINT,
    OUT outcome TEXT, OUT wallet_id TEXT, OUT status TEXT, OUT balance BIGINT, OUT on_device BIGINT,
    OUT cap BIGINT, OUT load_seq BIGINT, OUT created_by TEXT
) LANGUAGE plpgsql AS $$
DECLARE
    d RECORD; moved BIGINT;
BEGIN
    PERFORM pg_advisory_xact_lock(ecny_lock_key('device:' || p_device));
    SELECT * INTO d FROM devices WHERE device_id = p_device;
    IF NOT FOUND THEN
        outcome := 'no-device';
        RETURN;
    END IF;
    wallet_id := d.wallet_id;
    created_by := d.created_by;
    PERFORM pg_advisory_xact_lock(ecny_lock_key('wallet:' || d.wallet_id));
    IF d.status <> 'active' THEN
        outcome := 'device-status';
        status := d.status;
        RETURN;
    END IF;
    IF p_now_ms > d.cert_exp THEN
        outcome := 'certificate-expired';
        RETURN;
    END IF;
    SELECT w.status, a.balance INTO status, balance
        FROM wallets w JOIN accounts a ON a.account_id = 'w:' || w.wallet_id WHERE w.wallet_id = d.wallet_id;
    IF status <> 'active' THEN
        outcome := 'wallet-status';
        RETURN;
    END IF;
    IF p_amount > balance THEN
        outcome := 'insufficient-funds';
        RETURN;
    END IF;
    on_device := d.issued_fen - d.spent_fen - d.returned_fen;
    cap := d.cap_balance;
    IF on_device + p_amount > cap THEN
        outcome := 'device-cap';
        RETURN;
    END IF;
    IF p_single_threshold IS NOT NULL THEN
        SELECT abs(COALESCE(SUM(m.amount), 0)) INTO moved FROM wallet_moves m
            WHERE m.wallet_id = d.wallet_id AND m.business_day = p_day AND m.kind = 'device_load';
        IF p_amount > p_single_threshold OR moved + p_amount > p_daily_threshold THEN
            outcome := 'park';
            RETURN;
        END IF;
    END IF;
    load_seq := d.load_seq + 1;
    INSERT INTO journal (entry_id, kind, reference, memo, actor, business_day, created_at)
        VALUES (p_entry_id, 'device_load', p_device || '#' || load_seq, '', p_actor, p_day, p_now);
    UPDATE accounts SET balance = accounts.balance - p_amount WHERE account_id = 'w:' || d.wallet_id;
    UPDATE accounts SET balance = accounts.balance + p_amount WHERE account_id = 'r:' || d.wallet_id;
    INSERT INTO postings (entry_id, account_id, amount)
        VALUES (p_entry_id, 'w:' || d.wallet_id, -p_amount), (p_entry_id, 'r:' || d.wallet_id, p_amount);
    INSERT INTO wallet_moves (wallet_id, business_day, kind, amount) VALUES (d.wallet_id, p_day, 'device_load', -p_amount)
        ON CONFLICT ON CONSTRAINT wallet_moves_pkey DO UPDATE SET amount = wallet_moves.amount + excluded.amount;
    INSERT INTO device_loads (device_id, load_seq, amount, iat, exp, entry_id, payload, created_at, created_by)
        VALUES (p_device, load_seq, p_amount, p_now_ms, p_exp_ms, p_entry_id,
                p_payload_head || ecny_cbor_uint(load_seq) || p_payload_tail, p_now, p_actor);
    UPDATE devices SET load_seq = ecny_post_device_load.load_seq, issued_fen = issued_fen + p_amount,
        updated_at = p_now WHERE device_id = p_device;
    outcome := 'posted';
END
$$;
