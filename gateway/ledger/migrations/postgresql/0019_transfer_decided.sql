-- A transfer's decision in one round trip, its COMMIT included (docs/scaling.md): the statement that
-- checks and posts (ecny_post_transfer, 0016) also refuses, by raising, so that everything sent with it —
-- the audit entry, the risk signal, the Idempotency-Key reference, then the COMMIT — is rolled back with it,
-- and the payer's lock is released by the COMMIT without waiting for the gateway to read the answer.
-- SQLSTATE class EC: EC404 an unknown wallet (DETAIL: its id), EC409 the policy's reasons (DETAIL: comma
-- separated, in the order the check gives them), EC410 the e-CNY key may not sign (DETAIL: the key as
-- JSON, empty when there is none). The gateway maps them to the same problems as the Python path.
CREATE FUNCTION ecny_decided(p_reasons TEXT[], p_missing TEXT, p_key_status TEXT, p_key JSON) RETURNS BOOLEAN AS $$
BEGIN
    IF p_missing IS NOT NULL THEN
        RAISE EXCEPTION 'no wallet %', p_missing USING ERRCODE = 'EC404', DETAIL = p_missing;
    END IF;
    IF cardinality(p_reasons) > 0 THEN
        RAISE EXCEPTION 'transfer refused: %', array_to_string(p_reasons, ',')
            USING ERRCODE = 'EC409', DETAIL = array_to_string(p_reasons, ',');
    END IF;
    IF p_key_status IS DISTINCT FROM 'active' THEN
        RAISE EXCEPTION 'the e-CNY key may not sign' USING ERRCODE = 'EC410', DETAIL = coalesce(p_key::text, '');
    END IF;
    RETURN true;
END
$$ LANGUAGE plpgsql;
