-- ecny_lock_key (0016) as PL/pgSQL. The SQL version was never inlined — convert_to() is only STABLE, so
-- an IMMUTABLE SQL function calling it is not — and PostgreSQL before 18 plans a non-inlined SQL function's
-- body again at every call: each wallet lock of a transfer paid for a parse and a plan (about 50 µs of the
-- server's CPU each, measured with pg_stat_statements in docs/scaling.md). PL/pgSQL keeps the expression's
-- plan for the session. Same value, bit for bit: tests/security/test_pg_scaling.py compares it with the
-- gateway's lock_key.
CREATE OR REPLACE FUNCTION ecny_lock_key(name TEXT) RETURNS BIGINT LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
BEGIN
    RETURN ('x' || substr(encode(sha256(convert_to(name, 'UTF8')), 'hex'), 1, 16))::bit(64)::bigint;
END
$$;
