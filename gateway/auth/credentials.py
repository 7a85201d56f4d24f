"""API clients, users and teller sessions: how credentials are made, stored and checked.

- An API key is ``ecny_<prefix>_<secret>``. Only the prefix (for lookup) and a SHA-256 of the
  whole key are stored; the comparison is constant-time. Keys carry 256 bits of randomness, so a
  fast hash is right for them; passwords are not, and get argon2id.
- A teller session token is random; only its SHA-256 is stored, with an expiry.
- Verified API keys are cached in memory for a few seconds (``auth.credential_cache_seconds``)
  so that a signing request does not pay a database round trip; revocation takes effect within
  that time.
- Session tokens are never cached: every request reads the session with its user's *current* role
  and disabled flag (one indexed read), so a logout, an ended session, a disabled user or a role
  change (gateway/auth/users.py) holds from the next request, in every process and instance.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from gateway import clock
from gateway.auth.roles import Role
from gateway.auth.throttle import LoginThrottle, PasswordCheckGate
from gateway.errors import AlreadyExists, NotFound, Unauthenticated, ValidationFailed
from gateway.ledger.store import Database, Tx

API_KEY_PREFIX = "ecny_"
SESSION_TOKEN_PREFIX = "ecnys_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: an API client or a logged-in user, with one role, and the person behind it."""

    name: str
    role: Role
    kind: str  # "client" | "user"
    owner: str = ""
    """The person behind this identity (``users.owner`` / ``clients.owner``); by default its own name.
    Dual control compares owners, not identities: one person may hold a user and API clients."""

    def __post_init__(self) -> None:
        if not self.owner:
            object.__setattr__(self, "owner", self.name)

    @property
    def scope(self) -> str:
        """Namespace for idempotency keys and rate limits: ``client:NAME`` or ``user:NAME``."""
        return f"{self.kind}:{self.name}"


def _sha256(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def new_api_key() -> tuple[str, str]:
    """A fresh API key and its lookup prefix."""
    prefix = secrets.token_hex(6)
    return f"{API_KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}", prefix


def _parse_api_key(presented: str) -> str | None:
    if not presented.startswith(API_KEY_PREFIX):
        return None
    prefix, sep, secret = presented.removeprefix(API_KEY_PREFIX).partition("_")
    if not sep or len(prefix) != 12 or not secret:
        return None
    return prefix


# --- clients ----------------------------------------------------------------------------------


def _check_owner(owner: str | None, default: str) -> str:
    if owner is None:
        return default
    if not owner or len(owner) > 64 or not owner.isprintable() or owner != owner.strip():
        raise ValidationFailed("owner must be 1–64 printable characters without surrounding spaces")
    return owner


def add_client(tx: Tx, name: str, role: Role, owner: str | None = None) -> str:
    """Create an API client. Returns its key — shown once, never stored.

    ``owner``: the person responsible for the client (default: the client's name). Dual control
    treats every identity with one owner as one person.

    Raises:
        AlreadyExists: a client with that name exists.
    """
    if not name or len(name) > 64:
        raise ValidationFailed("client name must be 1–64 characters")
    owner = _check_owner(owner, name)
    if tx.fetchone("SELECT 1 FROM clients WHERE name = ?", (name,)):
        raise AlreadyExists(f"client {name!r} exists")
    key, prefix = new_api_key()
    tx.execute(
        "INSERT INTO clients (name, role, key_prefix, key_hash, created_at, owner) VALUES (?, ?, ?, ?, ?, ?)",
        (name, role.value, prefix, _sha256(key), clock.now_iso(), owner),
    )
    return key


def list_clients(tx: Tx) -> list[dict[str, Any]]:
    rows = tx.fetchall("SELECT name, role, owner, key_prefix, created_at, revoked_at FROM clients ORDER BY name")
    return [dict(row) for row in rows]


def revoke_client(tx: Tx, name: str) -> None:
    """Revoke a client's key. Raises NotFound for an unknown or already revoked client."""
    changed = tx.execute(
        "UPDATE clients SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL", (clock.now_iso(), name)
    )
    if not changed:
        raise NotFound(f"no active client {name!r}")


def rotate_client(tx: Tx, name: str) -> str:
    """Give an active client a new key and revoke its old one in the same step: only the new key's
    prefix and hash are stored from now on (a running gateway may accept the old key for up to
    ``auth.credential_cache_seconds`` more, as after ``revoke``). Returns the new key — shown once.

    Raises:
        NotFound: no such client, or it is revoked.
    """
    key, prefix = new_api_key()
    changed = tx.execute("UPDATE clients SET key_prefix = ?, key_hash = ? WHERE name = ? AND revoked_at IS NULL",
                         (prefix, _sha256(key), name))
    if not changed:
        raise NotFound(f"no active client {name!r}")
    return key


# --- users and sessions -----------------------------------------------------------------------


def add_user(tx: Tx, hasher: PasswordHasher, username: str, role: Role, password: str,
             owner: str | None = None) -> None:
    """Create a user with an argon2id password hash (``owner``: the person, default the username).
    Raises AlreadyExists."""
    if not username or len(username) > 64:
        raise ValidationFailed("username must be 1–64 characters")
    owner = _check_owner(owner, username)
    if len(password) < 12:
        raise ValidationFailed("password must have at least 12 characters")
    if tx.fetchone("SELECT 1 FROM users WHERE username = ?", (username,)):
        raise AlreadyExists(f"user {username!r} exists")
    tx.execute(
        "INSERT INTO users (username, role, password_hash, created_at, owner) VALUES (?, ?, ?, ?, ?)",
        (username, role.value, hasher.hash(password), clock.now_iso(), owner),
    )


def owner_of(tx: Tx, scope: str) -> str:
    """The owner of an identity named by its scope (``user:NAME`` or ``client:NAME``), read from the
    store; an identity the store does not know (or another kind of actor) is its own owner."""
    kind, _, name = scope.partition(":")
    row = None
    if kind == "user":
        row = tx.fetchone("SELECT owner FROM users WHERE username = ?", (name,))
    elif kind == "client":
        row = tx.fetchone("SELECT owner FROM clients WHERE name = ?", (name,))
    return str(row["owner"]) if row is not None and row["owner"] else name


class Authenticator:
    """Turns a bearer credential into a :class:`Principal` (app-scoped, holds the cache)."""

    def __init__(self, database: Database, session_ttl: int, cache_seconds: float,
                 throttle: LoginThrottle | None = None, gate: PasswordCheckGate | None = None) -> None:
        self._database = database
        self._throttle = throttle or LoginThrottle()
        self.gate = gate or PasswordCheckGate(slots=2, waiting=32)
        self._session_ttl = session_ttl
        self._cache_seconds = cache_seconds
        self._cache: dict[bytes, tuple[Principal, float]] = {}
        # argon2id with its library defaults (RFC 9106 low-memory profile).
        self.hasher = PasswordHasher()
        self._dummy_hash = self.hasher.hash(secrets.token_urlsafe(16))

    async def authenticate(self, token: str) -> Principal:
        """Check an API key or session token.

        Raises:
            Unauthenticated: unknown, revoked or expired credential.
        """
        digest = _sha256(token)
        if token.startswith(SESSION_TOKEN_PREFIX):  # never cached: see the module's docstring
            return await self._database.read(lambda tx: self._session_principal(tx, digest))
        cached = self._cache.get(digest)
        now = time.monotonic()
        if cached is not None and cached[1] > now:
            return cached[0]
        prefix = _parse_api_key(token)
        if prefix is None:
            raise Unauthenticated("malformed credential")
        principal = await self._database.read(lambda tx: self._client_principal(tx, prefix, digest))
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (principal, now + self._cache_seconds)
        return principal

    async def client_by_name(self, name: str) -> Principal:
        """The principal of an active API client (for mTLS identities). Raises Unauthenticated."""

        def find(tx: Tx) -> Principal:
            row = tx.fetchone("SELECT name, role, owner, revoked_at FROM clients WHERE name = ?", (name,))
            if row is None or row["revoked_at"]:
                raise Unauthenticated(f"API client {name!r} is unknown or revoked")
            return Principal(row["name"], Role(row["role"]), "client", row["owner"])

        return await self._database.read(find)

    @staticmethod
    def _client_principal(tx: Tx, prefix: str, digest: bytes) -> Principal:
        row = tx.fetchone("SELECT name, role, owner, key_hash, revoked_at FROM clients WHERE key_prefix = ?",
                          (prefix,), then_commit=True)  # the read's only statement: one round trip
        if row is None or not hmac.compare_digest(bytes(row["key_hash"]), digest) or row["revoked_at"]:
            raise Unauthenticated("unknown or revoked API key")
        return Principal(row["name"], Role(row["role"]), "client", row["owner"])

    @staticmethod
    def _session_principal(tx: Tx, digest: bytes) -> Principal:
        row = tx.fetchone(
            "SELECT s.username, u.role, s.expires_at, u.disabled_at, u.owner FROM user_sessions s "
            "JOIN users u ON u.username = s.username WHERE s.token_hash = ?",
            (digest,), then_commit=True,  # the read's only statement: its transaction ends in the same round trip
        )
        if row is None or row["disabled_at"] or row["expires_at"] <= clock.now_iso():
            raise Unauthenticated("unknown or expired session")
        return Principal(row["username"], Role(row["role"]), "user", row["owner"])

    async def login(self, username: str, password: str) -> tuple[str, Principal, str]:
        """Check a password and open a session. Returns (token, principal, expires_at).

        The argon2 check runs off the event loop; an unknown user costs the same as a wrong password.
        The login first passes the :class:`PasswordCheckGate`; then the attempt is counted
        (:class:`LoginThrottle`) before the password is checked.

        Raises:
            Unauthenticated: unknown user, disabled user or wrong password (one message for all).
            LoginThrottled: too many attempts for ``username``; the password was not checked.
            LoginBusy: too many logins at once; nothing was written.
        """
        async with self.gate.admit():
            return await self._login(username, password)

    async def _login(self, username: str, password: str) -> tuple[str, Principal, str]:
        await self._database.write(lambda tx: self._throttle.attempt_in(tx, username, clock.now()))
        row = await self._database.read(
            lambda tx: tx.fetchone(
                "SELECT username, role, owner, password_hash, disabled_at FROM users WHERE username = ?", (username,)
            )
        )
        stored = row["password_hash"] if row is not None else self._dummy_hash
        ok = await asyncio.to_thread(self._verify, stored, password)
        if row is None or not ok or row["disabled_at"]:
            raise Unauthenticated("wrong username or password")
        principal = Principal(row["username"], Role(row["role"]), "user", row["owner"])
        token = SESSION_TOKEN_PREFIX + secrets.token_urlsafe(32)
        expires_at = clock.after(self._session_ttl)

        def record(tx: Tx) -> None:
            self._throttle.succeeded_in(tx, principal.name)
            tx.execute("DELETE FROM user_sessions WHERE expires_at <= ?", (clock.now_iso(),))
            tx.execute(
                "INSERT INTO user_sessions (token_hash, username, role, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (_sha256(token), principal.name, principal.role.value, clock.now_iso(), expires_at),
            )

        await self._database.write(record)
        return token, principal, expires_at

    def _verify(self, stored: str, password: str) -> bool:
        try:
            return self.hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return False

    def forget(self) -> None:
        """Drop every cached credential (after a revocation through this process)."""
        self._cache.clear()
