-- Failed-login throttling per username (docs/threat-model.md, "Guessing passwords").
-- Every login attempt is counted here *before* its password is checked; a success deletes the row.
-- From the max-th attempt on, the username is locked for a lockout that doubles with each further
-- attempt; attempts while locked are refused without checking the password.
CREATE TABLE login_throttle (
    username        TEXT PRIMARY KEY,           -- as typed (known or not: unknown users are counted too)
    attempts        INTEGER NOT NULL,           -- since the last success, within the window
    last_attempt_at TEXT NOT NULL,              -- ISO 8601 UTC
    locked_until    TEXT                        -- ISO 8601 UTC, or NULL
);
CREATE INDEX login_throttle_last_attempt ON login_throttle (last_attempt_at);
