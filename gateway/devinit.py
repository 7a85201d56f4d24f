"""Development set-up for ``make run``: config, schema, keys, clients and users — once.

The SoftHSM token itself is made by ``softhsm/init-token.sh`` (the same script the tests use);
this fills it and the database. Running it again changes nothing that exists. Credentials are
written to ``var/dev-credentials.json`` (mode 0600) and nowhere else.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher

from gateway.app import pool_settings
from gateway.audit.chain import AuditEntry, append
from gateway.auth.credentials import add_client, add_user
from gateway.auth.roles import Role
from gateway.config import load_settings
from gateway.hsm.pool import SignerPool
from gateway.hsm.profile import load_named_profile
from gateway.key_lifecycle import generate_key
from gateway.keys import Usage, list_keys
from gateway.ledger.engines import open_database
from gateway.ledger.store import Tx
from gateway.signing import Algorithm

DEV_KEYS = [
    ("ecny-transfers", Algorithm.ECDSA_P256, {Usage.ECNY}),
    ("ecny-vouchers", Algorithm.ECDSA_P256, {Usage.VOUCHER}),
    ("evm-hot-wallet", Algorithm.ECDSA_SECP256K1, {Usage.EVM}),
    ("audit-checkpoints", Algorithm.ECDSA_P256, {Usage.AUDIT}),
    ("risk-reports", Algorithm.ECDSA_P256, {Usage.REPORT}),
    ("raw-p256", Algorithm.ECDSA_P256, {Usage.RAW}),
    ("raw-ed25519", Algorithm.ED25519, {Usage.RAW}),
]
DEV_USERS = [("teller1", Role.TELLER), ("supervisor1", Role.SUPERVISOR), ("auditor1", Role.AUDITOR)]


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, mode 0600 whatever the umask, never through a symlink.

    The text goes to a new file beside ``path`` (``O_CREAT | O_EXCL | O_NOFOLLOW``: created here,
    by us, or the call fails), which then replaces ``path``. A rename replaces a symlink found at
    ``path`` itself, so a link planted there (to a file the attacker wants overwritten, or to a
    place they can read) gets neither the credentials nor a truncation.
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_config(var: Path) -> Path:
    config = var / "gateway.toml"
    if not config.exists():
        config.write_text(
            "# Development settings written by `ecny-gateway dev-init` (make run).\n"
            '[server]\nhost = "127.0.0.1"\nport = 8700\n\n'
            '[hsm]\nprofile = "softhsm"\ntoken_label = "ecny-dev"\n'
            f'pin_file = "{var / "hsm" / "ecny-dev.user-pin"}"\n\n'
            f'[store]\ndsn = "sqlite:///{var / "gateway.db"}"\n',
            encoding="utf-8",
        )
    return config


async def _setup(var: Path) -> dict[str, Any]:
    settings = load_settings(write_config(var))
    database = await open_database(settings.store.dsn)
    created: dict[str, Any] = {"keys": [], "credentials": False}
    try:
        await database.migrate()
        existing = {record.label for record in await database.read(list_keys)}
        missing = [spec for spec in DEV_KEYS if spec[0] not in existing]
        if missing:
            profile = load_named_profile(settings.hsm.profile)
            options = pool_settings(settings, profile)
            options.workers = 1
            pool = await SignerPool.start(profile, options)
            try:
                for label, algorithm, usages in missing:
                    entry = AuditEntry(actor="cli:dev-init", role="admin", action="keys.create", decision="allowed")
                    await generate_key(database, pool, profile, label, algorithm, frozenset(usages), entry)
                    created["keys"].append(label)
            finally:
                await pool.close()

        credentials_path = var / "dev-credentials.json"
        have_clients = await database.read(
            lambda tx: tx.fetchone("SELECT COUNT(*) AS n FROM clients WHERE name IN ('dev-admin', 'dev-backend')")
        )
        if not credentials_path.exists() or have_clients is None or int(have_clients["n"]) < 2:
            hasher = PasswordHasher()
            passwords = {username: secrets.token_urlsafe(15) for username, _ in DEV_USERS}

            def make(tx: Tx) -> dict[str, Any]:
                tx.execute("DELETE FROM clients WHERE name IN ('dev-admin', 'dev-backend')")
                tx.execute("DELETE FROM user_sessions WHERE username IN ('teller1', 'supervisor1', 'auditor1')")
                tx.execute("DELETE FROM users WHERE username IN ('teller1', 'supervisor1', 'auditor1')")
                admin = add_client(tx, "dev-admin", Role.ADMIN)
                backend = add_client(tx, "dev-backend", Role.BACKEND)
                for username, role in DEV_USERS:
                    add_user(tx, hasher, username, role, passwords[username])
                append(
                    tx,
                    [
                        AuditEntry(
                            actor="cli:dev-init",
                            role="admin",
                            action="dev.credentials",
                            decision="allowed",
                            result={"clients": ["dev-admin", "dev-backend"], "users": [u for u, _ in DEV_USERS]},
                        )
                    ],
                )
                return {"admin_api_key": admin, "backend_api_key": backend, "users": passwords}

            document = await database.write(make)
            _write_private(credentials_path, json.dumps(document, indent=2) + "\n")
            created["credentials"] = True
    finally:
        await database.close()
    return created


def dev_init(var: Path) -> int:
    var.mkdir(parents=True, exist_ok=True)
    created = asyncio.run(_setup(var.resolve()))
    if created["keys"]:
        print(f"generated keys in the token: {', '.join(created['keys'])}")
    print(f"development credentials: {var / 'dev-credentials.json'} (mode 0600)")
    return 0
