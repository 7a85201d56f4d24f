-- The idempotency guard of an operation whose key nothing read before it ran (docs/spec.md §5): queued
-- first in the operation's transaction, it costs no round trip of its own; a key that has a record
-- aborts the transaction before any check runs, as a unique violation the gateway answers as a replay.
CREATE FUNCTION ecny_idempotency_unused(p_principal TEXT, p_key TEXT) RETURNS VOID AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM idempotency WHERE principal = p_principal AND idem_key = p_key) THEN
        RAISE unique_violation USING MESSAGE = 'this Idempotency-Key has a record';
    END IF;
END
$$ LANGUAGE plpgsql;
