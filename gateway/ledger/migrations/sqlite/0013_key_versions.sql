-- Key lifecycle (issue 18): versions, status and one active key per gateway-chosen usage.
-- A rotation makes a new version of a key family (a new row, a new CKA_ID and COSE kid); the older
-- versions stay in the table so their kids keep resolving (audit checkpoints, device certificates,
-- vouchers), but only an 'active' version may sign. 'retired': superseded, verify only;
-- 'disabled': stopped by an administrator.
ALTER TABLE keys ADD COLUMN family_id TEXT;
ALTER TABLE keys ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
ALTER TABLE keys ADD COLUMN status TEXT NOT NULL DEFAULT 'active';
ALTER TABLE keys ADD COLUMN status_changed_at TEXT;
-- 'generated' (inside the HSM by the gateway) or 'adopted' (an existing HSM key registered by URI).
ALTER TABLE keys ADD COLUMN origin TEXT NOT NULL DEFAULT 'generated';
UPDATE keys SET family_id = key_id WHERE family_id IS NULL;
CREATE UNIQUE INDEX keys_family_version ON keys (family_id, version);
-- The one key that signs each usage the gateway chooses a key for (ecny, voucher, audit, report). A new key
-- with such a usage takes it over (a rotation, never an ambiguity). Existing databases: the newest
-- key of each usage (a configured *.key_id still overrides it).
CREATE TABLE key_usage_active (
    usage       TEXT PRIMARY KEY,
    key_id      TEXT NOT NULL REFERENCES keys (key_id),
    since       TEXT NOT NULL
);
INSERT INTO key_usage_active (usage, key_id, since)
SELECT chosen.usage,
       (SELECT k.key_id FROM keys k WHERE ',' || k.usages || ',' LIKE '%,' || chosen.usage || ',%'
        ORDER BY k.created_at DESC, k.key_id DESC LIMIT 1),
       (SELECT k.created_at FROM keys k WHERE ',' || k.usages || ',' LIKE '%,' || chosen.usage || ',%'
        ORDER BY k.created_at DESC, k.key_id DESC LIMIT 1)
FROM (SELECT 'ecny' AS usage UNION ALL SELECT 'voucher' UNION ALL SELECT 'audit') chosen
WHERE EXISTS (SELECT 1 FROM keys k WHERE ',' || k.usages || ',' LIKE '%,' || chosen.usage || ',%');
