-- A hard wallet's outstanding value (issued - spent - returned) is never negative (issue 14, item 9):
-- payments within the loaded value plus the value returned at unload never exceed what was loaded.
-- SQLite cannot add a CHECK to an existing table: triggers refuse the write instead.
CREATE TRIGGER devices_outstanding_insert BEFORE INSERT ON devices WHEN NEW.spent_fen + NEW.returned_fen > NEW.issued_fen BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: devices_outstanding_not_negative'); END;
CREATE TRIGGER devices_outstanding_update BEFORE UPDATE ON devices WHEN NEW.spent_fen + NEW.returned_fen > NEW.issued_fen BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: devices_outstanding_not_negative'); END;
