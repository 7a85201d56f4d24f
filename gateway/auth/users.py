"""Administration of users (of the teller UI) and their sessions: log out, end every session of a
user, disable and enable a user, change a user's role.

Each function runs inside the caller's write transaction, so the caller appends the audit entry
in the same transaction and the change and its record commit together. Nothing here is cached:
a session is checked against the store on every request, with its user's *current* role and
disabled flag (gateway/auth/credentials.py), so each change holds from the next request, in every
HTTP process and every instance on the same store.
"""

from __future__ import annotations

import hashlib
from typing import Any

from argon2 import PasswordHasher

from gateway import clock
from gateway.auth.roles import Role
from gateway.errors import UserNotFound, ValidationFailed
from gateway.ledger.store import Row, Tx

MIN_PASSWORD_LENGTH = 12
"""Shortest password accepted (``users add`` and ``users passwd``)."""


def _user(tx: Tx, username: str) -> Row:
    row = tx.fetchone("SELECT username, role, disabled_at FROM users WHERE username = ?", (username,))
    if row is None:
        raise UserNotFound(f"no user {username!r}")
    return row


def user_document(tx: Tx, username: str) -> dict[str, Any]:
    """A user as an administrator sees it: role, disabled since when, live sessions.

    Raises:
        UserNotFound: no such user.
    """
    row = _user(tx, username)
    live = tx.fetchone("SELECT COUNT(*) AS n FROM user_sessions WHERE username = ? AND expires_at > ?",
                       (username, clock.now_iso()))
    return {"username": row["username"], "role": row["role"], "disabled_at": row["disabled_at"],
            "live_sessions": int(live["n"]) if live is not None else 0}


def end_session(tx: Tx, token: str) -> str | None:
    """End the session of ``token`` (a logout). Returns its username, or None if there was none."""
    digest = hashlib.sha256(token.encode()).digest()  # only this hash is stored (credentials.py)
    row = tx.fetchone("SELECT username FROM user_sessions WHERE token_hash = ?", (digest,))
    if row is None:
        return None
    tx.execute("DELETE FROM user_sessions WHERE token_hash = ?", (digest,))
    return str(row["username"])


def end_sessions(tx: Tx, username: str) -> int:
    """End every session of ``username``. Returns how many there were (expired ones included).

    Raises:
        UserNotFound: no such user.
    """
    _user(tx, username)
    return tx.execute("DELETE FROM user_sessions WHERE username = ?", (username,))


def disable_user(tx: Tx, username: str) -> int:
    """Disable a user and end their sessions; a disabled user's logins fail like a wrong password.
    Disabling a disabled user keeps the first date. Returns the number of sessions ended.

    Raises:
        UserNotFound: no such user.
    """
    _user(tx, username)
    tx.execute("UPDATE users SET disabled_at = ? WHERE username = ? AND disabled_at IS NULL",
               (clock.now_iso(), username))
    return end_sessions(tx, username)


def enable_user(tx: Tx, username: str) -> None:
    """Let a disabled user log in again (their old sessions stay ended).

    Raises:
        UserNotFound: no such user.
    """
    _user(tx, username)
    tx.execute("UPDATE users SET disabled_at = NULL WHERE username = ?", (username,))


def set_role(tx: Tx, username: str, role: Role) -> str:
    """Give a user another role; their live sessions have it from their next request. Returns the
    previous role.

    Raises:
        UserNotFound: no such user.
        ValidationFailed: ``backend`` (a role for API clients only).
    """
    if role is Role.BACKEND:
        raise ValidationFailed("backend is a role for API clients, not for users")
    previous = str(_user(tx, username)["role"])
    tx.execute("UPDATE users SET role = ? WHERE username = ?", (role.value, username))
    return previous


def list_users(tx: Tx) -> list[dict[str, Any]]:
    """Every user as an administrator sees it (no password hash): username, role, owner, created_at,
    disabled_at and the number of live sessions, by username."""
    rows = tx.fetchall(
        "SELECT u.username, u.role, u.owner, u.created_at, u.disabled_at, "
        "(SELECT COUNT(*) FROM user_sessions s WHERE s.username = u.username AND s.expires_at > ?) AS live_sessions "
        "FROM users u ORDER BY u.username", (clock.now_iso(),))
    return [{**dict(row), "owner": row["owner"] or row["username"], "live_sessions": int(row["live_sessions"])}
            for row in rows]


def set_password(tx: Tx, hasher: PasswordHasher, username: str, password: str) -> int:
    """Give a user a new password (argon2id) and end their sessions: whoever logged in with the old
    password is out. Returns the number of sessions ended.

    Raises:
        UserNotFound: no such user.
        ValidationFailed: fewer than 12 characters (as for a new user).
    """
    _user(tx, username)
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValidationFailed(f"password must have at least {MIN_PASSWORD_LENGTH} characters")
    tx.execute("UPDATE users SET password_hash = ? WHERE username = ?", (hasher.hash(password), username))
    return end_sessions(tx, username)
