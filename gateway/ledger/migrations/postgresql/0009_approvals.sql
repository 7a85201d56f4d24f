-- Dual control (docs/threat-model.md, "One person on both sides of an approval").
-- Users and API clients carry an owner: the person behind the identity. No one decides an approval
-- whose requester has their owner, under whichever identity either side acts. Existing identities
-- default to their own name, so existing deployments keep working.
ALTER TABLE users ADD COLUMN owner TEXT NOT NULL DEFAULT '';
UPDATE users SET owner = username WHERE owner = '';
ALTER TABLE clients ADD COLUMN owner TEXT NOT NULL DEFAULT '';
UPDATE clients SET owner = name WHERE owner = '';
-- The requester's owner, fixed when the approval is requested; and what the approval is about
-- (e.g. discrepancy:<id>), so that one subject has at most one approval pending.
ALTER TABLE approvals ADD COLUMN requested_owner TEXT NOT NULL DEFAULT '';
ALTER TABLE approvals ADD COLUMN subject TEXT NOT NULL DEFAULT '';
UPDATE approvals SET requested_owner = substr(requested_by, strpos(requested_by, ':') + 1) WHERE requested_owner = '';
CREATE INDEX approvals_owner ON approvals (requested_owner, created_at);
CREATE INDEX approvals_subject ON approvals (subject, status);
