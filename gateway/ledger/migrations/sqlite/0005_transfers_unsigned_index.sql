-- 0002 indexed (status, envelope): every signed envelope (~300 bytes) was copied into the index.
-- Only posted transfers still waiting for their envelope need finding: index just those.
DROP INDEX transfers_unsigned;
CREATE INDEX transfers_unsigned ON transfers (transfer_id) WHERE status = 'posted' AND envelope IS NULL;
