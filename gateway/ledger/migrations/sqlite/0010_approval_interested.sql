-- Dual control (docs/threat-model.md, "An interested party approves"): besides the requester's owner,
-- an approval names the owners who stand to gain from it, fixed when it is requested (for a honour or
-- a device load: the owner of whoever registered the device, and so may hold its key). None of them
-- may decide it. A JSON array of owner names; existing approvals name nobody.
ALTER TABLE approvals ADD COLUMN interested_owners TEXT NOT NULL DEFAULT '[]';
