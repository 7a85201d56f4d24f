-- The voucher key's hand-overs: when a new key takes the voucher usage over from an active key, the
-- outgoing key signs an endorsement of the new one (gateway.schemes.offline.Endorsement) before it stops
-- signing. A hard wallet pins the key that certified it and takes a certificate from another issuer only
-- with a chain of these from the key it pins (POST /v1/devices/{device_id}/certificate answers the chain).
CREATE TABLE issuer_endorsements (
    new_key_id   TEXT PRIMARY KEY REFERENCES keys (key_id),
    old_key_id   TEXT NOT NULL REFERENCES keys (key_id),
    endorsement  BLOB NOT NULL,
    created_at   TEXT NOT NULL
);
