-- Scale out on PostgreSQL (docs/scaling.md): no global lock on the write path, and the check-and-post of
-- a transfer as one server-side function.

-- Audit staging. A decision writes its audit entries here, in its own transaction, with no global lock;
-- one chainer per database (gateway.audit.chain.chain_staged, leader by an advisory lock) moves them into
-- audit_log, numbered and hash-chained in the order it finds them committed, deleting them here in the
-- same transaction. An entry in this table is "pending": committed, not yet chained.
CREATE TABLE audit_staged (
    staged_id     BIGSERIAL PRIMARY KEY,
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
ALTER TABLE audit_log ADD COLUMN staged_id BIGINT;
CREATE UNIQUE INDEX audit_log_staged ON audit_log (staged_id);

-- gateway.ledger.postgres.lock_key computed by the server: the first 8 bytes of SHA-256(name) as a
-- signed 64-bit integer, so that a function takes the very advisory locks the Python code takes.
CREATE FUNCTION ecny_lock_key(name TEXT) RETURNS BIGINT LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT ('x' || substr(encode(sha256(convert_to(name, 'UTF8')), 'hex'), 1, 16))::bit(64)::bigint
$$;

-- The CBOR encoding of an unsigned integer (RFC 8949 §3.1, major type 0, shortest form).
CREATE FUNCTION ecny_cbor_uint(n BIGINT) RETURNS BYTEA LANGUAGE plpgsql IMMUTABLE STRICT AS $$
BEGIN
    IF n < 0 THEN
        RAISE EXCEPTION 'ecny_cbor_uint: % is negative', n;
    ELSIF n < 24 THEN
        RETURN set_byte('\x00'::bytea, 0, n::int);
    ELSIF n < 256 THEN
        RETURN '\x18'::bytea || substring(int8send(n) FROM 8 FOR 1);
    ELSIF n < 65536 THEN
        RETURN '\x19'::bytea || substring(int8send(n) FROM 7 FOR 2);
    ELSIF n < 4294967296 THEN
        RETURN '\x1a'::bytea || substring(int8send(n) FROM 5 FOR 4);
    END IF;
    RETURN '\x1b'::bytea || int8send(n);
END
$$;

-- A transfer's check and post in one statement (gateway.wallets.accounts, PostgreSQL path): the wallet
-- locks (the same advisory locks as everywhere, in wallet-id order), the policy figures, the tier limits
-- (passed in, indexed by tier: NULL is no limit), and — when nothing refuses — the journal entry, its
-- postings, the day's spend, the payer's out_seq and the transfer row with its envelope payload
-- (payload_head || CBOR(seq) || payload_tail). Reasons are the strings gateway.policy.limits gives, in
-- the same order; a refused transfer writes nothing. missing names a wallet that does not exist.
CREATE FUNCTION ecny_post_transfer(
    p_transfer_id TEXT, p_entry_id TEXT, p_from TEXT, p_to TEXT, p_amount BIGINT, p_memo TEXT, p_actor TEXT,
    p_day TEXT, p_now TEXT, p_ts BIGINT,
    p_cap BIGINT[], p_single BIGINT[], p_daily BIGINT[], p_annual BIGINT[],
    p_payload_head BYTEA, p_payload_tail BYTEA,
    OUT reasons TEXT[], OUT missing TEXT, OUT seq BIGINT
) LANGUAGE plpgsql AS $$
DECLARE
    payer_status TEXT; payer_tier INT; payer_balance BIGINT;
    payee_status TEXT; payee_tier INT; payee_balance BIGINT;
    spent_today BIGINT; spent_year BIGINT;
BEGIN
    reasons := ARRAY[]::TEXT[];
    IF p_from COLLATE "C" < p_to COLLATE "C" THEN
        PERFORM pg_advisory_xact_lock(ecny_lock_key('wallet:' || p_from));
        PERFORM pg_advisory_xact_lock(ecny_lock_key('wallet:' || p_to));
    ELSE
        PERFORM pg_advisory_xact_lock(ecny_lock_key('wallet:' || p_to));
        PERFORM pg_advisory_xact_lock(ecny_lock_key('wallet:' || p_from));
    END IF;
    SELECT w.status, w.tier, a.balance INTO payer_status, payer_tier, payer_balance
        FROM wallets w JOIN accounts a ON a.account_id = 'w:' || w.wallet_id WHERE w.wallet_id = p_from;
    IF NOT FOUND THEN
        missing := p_from;
        RETURN;
    END IF;
    SELECT w.status, w.tier, a.balance INTO payee_status, payee_tier, payee_balance
        FROM wallets w JOIN accounts a ON a.account_id = 'w:' || w.wallet_id WHERE w.wallet_id = p_to;
    IF NOT FOUND THEN
        missing := p_to;
        RETURN;
    END IF;
    SELECT COALESCE(SUM(CASE WHEN business_day = p_day THEN amount ELSE 0 END), 0), COALESCE(SUM(amount), 0)
        INTO spent_today, spent_year FROM wallet_spend
        WHERE wallet_id = p_from AND business_day >= substr(p_day, 1, 4) || '-01-01'
          AND business_day <= substr(p_day, 1, 4) || '-12-31';
    IF payer_status <> 'active' THEN
        reasons := reasons || ('payer-wallet-' || payer_status);
    END IF;
    IF payee_status <> 'active' THEN
        reasons := reasons || ('payee-wallet-' || payee_status);
    END IF;
    IF p_amount > payer_balance THEN
        reasons := reasons || 'insufficient-funds'::TEXT;
    END IF;
    IF p_single[payer_tier] IS NOT NULL AND p_amount > p_single[payer_tier] THEN
        reasons := reasons || 'single-limit-exceeded'::TEXT;
    END IF;
    IF p_daily[payer_tier] IS NOT NULL AND spent_today + p_amount > p_daily[payer_tier] THEN
        reasons := reasons || 'daily-limit-exceeded'::TEXT;
    END IF;
    IF p_annual[payer_tier] IS NOT NULL AND spent_year + p_amount > p_annual[payer_tier] THEN
        reasons := reasons || 'annual-limit-exceeded'::TEXT;
    END IF;
    IF p_cap[payee_tier] IS NOT NULL AND payee_balance + p_amount > p_cap[payee_tier] THEN
        reasons := reasons || 'balance-cap-exceeded'::TEXT;
    END IF;
    IF cardinality(reasons) > 0 THEN
        RETURN;
    END IF;
    INSERT INTO journal (entry_id, kind, reference, memo, actor, business_day, created_at)
        VALUES (p_entry_id, 'transfer', p_transfer_id, p_memo, p_actor, p_day, p_now);
    -- The CHECK on accounts is the backstop: a wallet that would go negative aborts the transaction.
    UPDATE accounts SET balance = balance - p_amount WHERE account_id = 'w:' || p_from;
    UPDATE accounts SET balance = balance + p_amount WHERE account_id = 'w:' || p_to;
    INSERT INTO postings (entry_id, account_id, amount)
        VALUES (p_entry_id, 'w:' || p_from, -p_amount), (p_entry_id, 'w:' || p_to, p_amount);
    INSERT INTO wallet_spend (wallet_id, business_day, amount) VALUES (p_from, p_day, p_amount)
        ON CONFLICT (wallet_id, business_day) DO UPDATE SET amount = wallet_spend.amount + excluded.amount;
    UPDATE wallets SET out_seq = out_seq + 1 WHERE wallet_id = p_from RETURNING out_seq INTO seq;
    INSERT INTO transfers (transfer_id, from_wallet, to_wallet, amount, memo, status, entry_id, seq, ts, payload,
                           envelope, kid, approval_id, requested_by, created_at)
        VALUES (p_transfer_id, p_from, p_to, p_amount, p_memo, 'posted', p_entry_id, seq, p_ts,
                p_payload_head || ecny_cbor_uint(seq) || p_payload_tail, NULL, NULL, NULL, p_actor, p_now);
END
$$;

-- A cash-in or cash-out's check and post in one statement (gateway.wallets.accounts, PostgreSQL path):
-- the wallet lock, the status and funds or balance-cap check (reasons as gateway.policy.limits gives
-- them), the approval thresholds (NULL: carried out by an approval, no check; park is true when a
-- second person must approve, and nothing is written: the Python path then parks it) and the posting
-- against issuance. balance is the wallet's balance after it.
CREATE FUNCTION ecny_post_cash(
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
    UPDATE accounts SET balance = accounts.balance - delta WHERE account_id = 'bank:issuance';
    INSERT INTO postings (entry_id, account_id, amount)
        VALUES (p_entry_id, 'w:' || p_wallet, delta), (p_entry_id, 'bank:issuance', -delta);
END
$$;

-- A device load's check and post in one statement (gateway.offline.devices, PostgreSQL path): the device
-- and wallet locks, the checks of the Python path in its order (outcome names the first that fails:
-- no-device, device-status, certificate-expired, wallet-status, insufficient-funds, device-cap; park: a
-- second person must approve, nothing written), then the posting from the wallet to its offline
-- reserve, the device_loads row with the voucher payload (payload_head || CBOR(load_seq) ||
-- payload_tail) and the device's counters. The figures an error message names come back with it.
CREATE FUNCTION ecny_post_device_load(
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
        SELECT abs(COALESCE(SUM(p.amount), 0)) INTO moved FROM postings p JOIN journal j ON j.entry_id = p.entry_id
            WHERE p.account_id = 'w:' || d.wallet_id AND j.kind = 'device_load' AND j.business_day = p_day;
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
    INSERT INTO device_loads (device_id, load_seq, amount, iat, exp, entry_id, payload, created_at, created_by)
        VALUES (p_device, load_seq, p_amount, p_now_ms, p_exp_ms, p_entry_id,
                p_payload_head || ecny_cbor_uint(load_seq) || p_payload_tail, p_now, p_actor);
    UPDATE devices SET load_seq = ecny_post_device_load.load_seq, issued_fen = issued_fen + p_amount,
        updated_at = p_now WHERE device_id = p_device;
    outcome := 'posted';
END
$$;
