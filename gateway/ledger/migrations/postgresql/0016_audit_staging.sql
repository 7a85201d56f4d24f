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
