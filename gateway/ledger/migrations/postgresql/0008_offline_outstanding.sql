-- A hard wallet's outstanding value (issued - spent - returned) is never negative (issue 14, item 9):
-- payments within the loaded value plus the value returned at unload never exceed what was loaded.
-- NOT VALID: enforced on every write from now on; rows an older version left negative are reported by
-- `ecny-gateway ledger check` rather than failing the upgrade.
ALTER TABLE devices ADD CONSTRAINT devices_outstanding_not_negative CHECK (spent_fen + returned_fen <= issued_fen) NOT VALID;
