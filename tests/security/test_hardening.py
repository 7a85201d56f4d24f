"""Smaller controls an insider or a careless client could walk around (issue 14, items 4 and 11).

Each test is the attack as it would be sent (a rewritten key table, a planted symlink, a 10 kB
request id, a killed terminal…) next to the legitimate path that must keep working. Real parts
throughout: the SoftHSM token, the gateway over HTTP, SQLite files and PostgreSQL, the teller on a
real pseudo-terminal and in tmux.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import re
import select
import shutil
import signal
import sqlite3
import stat
import struct
import subprocess
import sys
import termios
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio
import structlog
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from gateway.auth.roles import Role
from gateway.config import HsmSettings, load_settings
from gateway.devinit import _write_private
from gateway.errors import ConfigError, StoreUnavailable
from gateway.ledger.engines import open_database
from gateway.runtime import RUNTIME
from gateway.signing import der_from_raw
from tests.conftest import ROOT, Gateway, Token, make_settings, start_gateway
from tests.pg import PostgresServer
from tests.procs import GatewayProcess

PROBLEMS = "https://ecny-gateway.dev/problems/"
SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
GENERATED_REQUEST_ID = re.compile(r"[0-9a-f]{16}")


# --- shared: a gateway of this module's own (its key table gets rewritten) ------------------------


@pytest_asyncio.fixture(scope="module")
async def own_gateway(softhsm_token: Token, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    """A gateway on its own SQLite file: these tests rewrite its key table as an insider would."""
    database = tmp_path_factory.mktemp("hardening") / "gateway.db"
    started = await start_gateway(make_settings(softhsm_token, f"sqlite:///{database}"))
    yield started
    await started.client.close()


def _database_path(gateway: Gateway) -> str:
    return gateway.settings.store.dsn.removeprefix("sqlite:///")


async def _create_key(gateway: Gateway, algorithm: str, usage: list[str]) -> dict[str, Any]:
    response = await gateway.client.post(
        "/v1/keys", json={"label": f"hardening-{uuid.uuid4().hex[:10]}", "algorithm": algorithm, "usage": usage},
        headers=gateway.auth(Role.ADMIN))
    assert response.status == 201, await response.text()
    document: dict[str, Any] = await response.json()
    return document


# --- item 4: raw is exclusive ---------------------------------------------------------------------

MIXED = [("ecdsa-p256", "ecny"), ("ecdsa-p256", "voucher"), ("ecdsa-p256", "audit"), ("ed25519", "ecny"),
         ("ecdsa-secp256k1", "evm")]


@pytest.mark.softhsm
async def test_raw_next_to_another_usage_cannot_be_created(own_gateway: Gateway) -> None:
    """Threat: a raw key that also holds ecny/voucher/audit/evm usage signs any digest with a key the
    policy trusts — created through `POST /v1/keys`."""
    gateway = own_gateway
    for algorithm, other in MIXED:
        for usage in (["raw", other], [other, "raw"]):
            response = await gateway.client.post(
                "/v1/keys", json={"label": f"mixed-{uuid.uuid4().hex[:10]}", "algorithm": algorithm, "usage": usage},
                headers=gateway.auth(Role.ADMIN))
            assert response.status == 400, (usage, await response.text())
            problem = await response.json()
            assert problem["type"] == PROBLEMS + "raw-usage-not-exclusive"
            assert other in problem["detail"]
    listed = await (await gateway.client.get("/v1/keys", headers=gateway.auth(Role.ADMIN))).json()
    assert not [key for key in listed["keys"] if "raw" in key["usage"] and len(key["usage"]) > 1]
    # Positive control: a raw key alone, and a key with two non-raw usages, are still made.
    assert (await _create_key(gateway, "ecdsa-p256", ["raw"]))["usage"] == ["raw"]
    assert (await _create_key(gateway, "ecdsa-p256", ["ecny", "voucher"]))["usage"] == ["ecny", "voucher"]


@pytest.mark.softhsm
@pytest.mark.slow
def test_cli_refuses_raw_next_to_another_usage(softhsm_token: Token, tmp_path: Path) -> None:
    """Threat: a raw key that also holds ecny usage, made with `ecny-gateway keys generate`."""
    gateway = GatewayProcess(tmp_path / "var", softhsm_token.conf, softhsm_token.label,
                             softhsm_token.directory / f"{softhsm_token.label}.user-pin",
                             f"sqlite:///{tmp_path / 'cli.db'}")
    refused = gateway.cli("keys", "generate", "--label", "cli-mixed", "--algorithm", "ecdsa-p256",
                          "--usage", "raw,ecny")
    assert refused.returncode != 0
    assert "raw" in refused.stderr and "ecny" in refused.stderr and "Traceback" not in refused.stderr
    listed = gateway.cli("keys", "list")
    assert listed.returncode == 0 and "cli-mixed" not in listed.stdout
    # Positive control: the same command with raw alone makes the key.
    made = gateway.cli("keys", "generate", "--label", "cli-raw", "--algorithm", "ecdsa-p256", "--usage", "raw")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["usage"] == ["raw"]


def _verify_p256(document: dict[str, Any], digest: bytes, signature_hex: str) -> None:
    key = serialization.load_pem_public_key(document["public_key_pem"].encode())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(der_from_raw(bytes.fromhex(signature_hex)), digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


@pytest.mark.softhsm
async def test_key_table_rewritten_to_add_raw_cannot_sign_digests(own_gateway: Gateway) -> None:
    """Threat: an insider rewrites the key table to give the ecny, voucher, audit or EVM key `raw`
    usage, then forges envelopes, vouchers, checkpoints or EVM transactions with `/v1/keys/{id}/sign`."""
    gateway = own_gateway
    backend = gateway.auth(Role.BACKEND)
    # Positive control: a key whose only usage is raw signs, and the signature verifies.
    raw = await _create_key(gateway, "ecdsa-p256", ["raw"])
    digest = hashlib.sha256(b"a legitimate raw digest").digest()
    response = await gateway.client.post(f"/v1/keys/{raw['key_id']}/sign", json={"digest": digest.hex()},
                                         headers=backend)
    assert response.status == 200, await response.text()
    _verify_p256(raw, digest, (await response.json())["signature"])

    # The insider's edit: the keys that sign what the policy decides on get `raw` next to their usage.
    victims = [await _create_key(gateway, algorithm, [usage]) for algorithm, usage in MIXED]
    with sqlite3.connect(_database_path(gateway)) as connection:
        for victim in victims:
            connection.execute("UPDATE keys SET usages = ? WHERE key_id = ?",
                               (",".join(sorted([*victim["usage"], "raw"])), victim["key_id"]))
    # What a forgery would sign: the digest of an envelope, voucher, checkpoint or transaction.
    forged = hashlib.sha256(b"COSE_Sign1 Sig_structure of a transfer nobody approved").digest()
    for victim in victims:
        data = forged if victim["algorithm"] != "ed25519" else b"Sig_structure of a forged envelope"
        single = await gateway.client.post(f"/v1/keys/{victim['key_id']}/sign", json={"digest": data.hex()},
                                           headers=backend)
        assert single.status == 403, await single.text()
        problem = await single.json()
        assert problem["type"] == PROBLEMS + "raw-key-not-exclusive" and "signature" not in problem
        batch = await gateway.client.post("/v1/sign/batch", json={"key_id": victim["key_id"], "digests": [data.hex()]},
                                          headers=backend)
        assert batch.status == 403 and (await batch.json())["type"] == PROBLEMS + "raw-key-not-exclusive"
    # Each refusal (single and batch, per key) is in the audit log with its reason.
    with sqlite3.connect(_database_path(gateway)) as connection:
        refused = connection.execute(
            "SELECT COUNT(*) FROM audit_log WHERE action IN ('keys.sign', 'keys.sign_batch') "
            "AND decision = 'refused' AND reasons LIKE '%raw-key-not-exclusive%'").fetchone()[0]
    assert refused == 2 * len(victims)
    # The raw-only key still signs after all this.
    again = await gateway.client.post(f"/v1/keys/{raw['key_id']}/sign", json={"digest": digest.hex()},
                                      headers=backend)
    assert again.status == 200


@pytest.mark.softhsm
async def test_rewritten_raw_key_is_flagged_at_start(softhsm_token: Token, tmp_path: Path) -> None:
    """Threat: a key table rewritten to give a policy key `raw` usage goes unnoticed."""
    dsn = f"sqlite:///{tmp_path / 'flag.db'}"
    first = await start_gateway(make_settings(softhsm_token, dsn))
    try:
        ecny = await _create_key(first, "ecdsa-p256", ["ecny"])
        clean = await _create_key(first, "ecdsa-p256", ["raw"])
    finally:
        await first.client.close()
    with sqlite3.connect(str(tmp_path / "flag.db")) as connection:
        connection.execute("UPDATE keys SET usages = 'ecny,raw' WHERE key_id = ?", (ecny["key_id"],))
    from aiohttp.test_utils import TestClient, TestServer

    from gateway.app import make_app

    with structlog.testing.capture_logs() as logs:
        client: Any = TestClient(TestServer(make_app(make_settings(softhsm_token, dsn))))
        await client.start_server()
        await client.close()
    flagged = [entry for entry in logs if entry.get("log_level") == "error" and entry.get("key_id") == ecny["key_id"]]
    assert flagged and "raw" in flagged[0]["event"] and flagged[0]["usages"] == ["ecny", "raw"]
    # Positive control: the untouched raw key is not flagged.
    assert not [entry for entry in logs if entry.get("key_id") == clean["key_id"]]


# --- item 11: synchronous = FULL ------------------------------------------------------------------


async def test_sqlite_commits_are_durable(tmp_path: Path) -> None:
    """Threat: acknowledged transfers lost on power loss (SQLite `synchronous=NORMAL` in WAL mode)."""
    database = await open_database(f"sqlite:///{tmp_path / 'durable.db'}")
    try:
        await database.migrate()
        # 2 = FULL: every commit is synced to disk before it is acknowledged; on both connections.
        written = await database.write(lambda tx: tx.fetchone("PRAGMA synchronous"))
        read = await database.read(lambda tx: tx.fetchone("PRAGMA synchronous"))
        assert written is not None and read is not None
        assert written[0] == read[0] == 2
        mode = await database.read(lambda tx: tx.fetchone("PRAGMA journal_mode"))
        assert mode is not None and mode[0] == "wal"  # positive control: still WAL (readers beside the writer)
    finally:
        await database.close()


# --- item 11: file modes --------------------------------------------------------------------------


@pytest.fixture
def loose_umask() -> Iterator[None]:
    previous = os.umask(0o000)  # the worst an operator's shell could have
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


async def test_database_files_are_private_whatever_the_umask(tmp_path: Path, loose_umask: None) -> None:
    """Threat: the database (ID numbers, password hashes) and its -wal/-shm files readable by every
    local user because of the umask."""
    path = tmp_path / "store" / "gateway.db"
    database = await open_database(f"sqlite:///{path}")
    try:
        await database.migrate()
        await database.write(lambda tx: tx.execute("CREATE TABLE hardening_probe (x INTEGER)"))
        for suffix in ("", "-wal", "-shm", "-writer.lock"):
            companion = Path(f"{path}{suffix}")
            assert companion.exists(), suffix
            assert _mode(companion) == 0o600, (suffix, oct(_mode(companion)))
    finally:
        await database.close()
    # An existing database left world-readable (by an older version, or a copy) is narrowed on open.
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{path}{suffix}").exists():
            os.chmod(f"{path}{suffix}", 0o644)
    database = await open_database(f"sqlite:///{path}")
    try:
        assert (await database.read(lambda tx: tx.fetchone("SELECT 1 AS one")))["one"] == 1  # type: ignore[index]
        assert _mode(path) == 0o600
        for suffix in ("-wal", "-shm"):
            if Path(f"{path}{suffix}").exists():
                assert _mode(Path(f"{path}{suffix}")) == 0o600
    finally:
        await database.close()


async def test_database_path_planted_as_symlink_is_refused(tmp_path: Path) -> None:
    """Threat: a symlink planted where the database will be created sends ID numbers and password
    hashes to a file the planter can read."""
    elsewhere = tmp_path / "attacker" / "loot.db"
    elsewhere.parent.mkdir()
    planted = tmp_path / "var" / "gateway.db"
    planted.parent.mkdir()
    planted.symlink_to(elsewhere)
    with pytest.raises(StoreUnavailable, match=r"gateway\.db"):
        await open_database(f"sqlite:///{planted}")
    assert not elsewhere.exists()
    # Positive control: a real file in the same place opens.
    planted.unlink()
    database = await open_database(f"sqlite:///{planted}")
    await database.close()
    assert planted.is_file() and not planted.is_symlink()


async def test_narrowing_the_files_keeps_the_locks_of_a_live_connection(tmp_path: Path) -> None:
    """Threat: making the files private drops this process's SQLite locks. Closing any descriptor of
    a file releases every POSIX lock the process holds on it, so a second store opened beside a live
    connection (the CLI, a test, a second Database) would let another writer into the middle of a
    transaction: lost writes, "disk I/O error", a corrupt WAL."""
    path = tmp_path / "gateway.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA journal_mode = WAL")
    holder.execute("CREATE TABLE t (x INTEGER)")
    path.chmod(0o644)  # an older version's mode: the store narrows it on open
    holder.execute("BEGIN IMMEDIATE")  # the write lock, held by this process
    holder.execute("INSERT INTO t VALUES (1)")
    database = await open_database(f"sqlite:///{path}")  # narrows the files beside the live lock
    await database.close()
    assert _mode(path) == 0o600
    other = subprocess.run(
        [sys.executable, "-c",
         "import sqlite3, sys; c = sqlite3.connect(sys.argv[1], timeout=0, isolation_level=None)\n"
         "try:\n    c.execute('BEGIN IMMEDIATE')\nexcept sqlite3.OperationalError as e:\n    print(e)",
         str(path)], capture_output=True, text=True, timeout=60, check=True,
    )
    assert "locked" in other.stdout, "another process took the write lock this process still holds"
    holder.execute("COMMIT")
    # Positive control: once the holder commits, the other process writes.
    other = subprocess.run(
        [sys.executable, "-c",
         "import sqlite3, sys; c = sqlite3.connect(sys.argv[1], timeout=5, isolation_level=None)\n"
         "c.execute('BEGIN IMMEDIATE'); c.execute('INSERT INTO t VALUES (2)'); c.execute('COMMIT')", str(path)],
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert [row[0] for row in holder.execute("SELECT x FROM t ORDER BY x")] == [1, 2]
    holder.close()


def _pin_copy(token: Token, path: Path, mode: int) -> Path:
    path.write_text(token.pin + "\n")
    path.chmod(mode)
    return path


def test_pin_file_open_to_others_is_refused(softhsm_token: Token, tmp_path: Path) -> None:
    """Threat: a PIN file readable by other local users (group or world bits) lets them sign."""
    for mode in (0o644, 0o640, 0o604, 0o620):
        pin_file = _pin_copy(softhsm_token, tmp_path / f"pin-{mode:o}", mode)
        with pytest.raises(ConfigError) as refused:
            HsmSettings(pin_file=pin_file).read_pin()
        assert "hsm.pin_file" in refused.value.detail and f"{mode:04o}" in refused.value.detail
        assert "chmod 600" in refused.value.detail and softhsm_token.pin not in refused.value.detail
    # Positive control: owner-only, directly or through a symlink (secret mounts), is read.
    private = _pin_copy(softhsm_token, tmp_path / "pin-private", 0o600)
    assert HsmSettings(pin_file=private).read_pin() == softhsm_token.pin
    link = tmp_path / "pin-link"
    link.symlink_to(private)
    assert HsmSettings(pin_file=link).read_pin() == softhsm_token.pin
    assert HsmSettings(pin_file=_pin_copy(softhsm_token, tmp_path / "pin-ro", 0o400)).read_pin() == softhsm_token.pin


@pytest.mark.softhsm
@pytest.mark.slow
def test_serve_refuses_to_start_with_a_readable_pin_file(softhsm_token: Token, tmp_path: Path) -> None:
    """Threat: a PIN file readable by other local users, unnoticed because the gateway starts anyway."""
    loose = _pin_copy(softhsm_token, tmp_path / "loose.user-pin", 0o644)
    refused = GatewayProcess(tmp_path / "refused", softhsm_token.conf, softhsm_token.label, loose,
                             f"sqlite:///{tmp_path / 'refused.db'}")
    with pytest.raises(AssertionError, match="exited"):
        refused.start(timeout=60)
    refused.process = None
    log = (tmp_path / "refused" / "gateway.log").read_text()
    assert "hsm.pin_file" in log and "0644" in log and softhsm_token.pin not in log
    # Positive control: the same PIN in an owner-only file, and the gateway starts.
    private = _pin_copy(softhsm_token, tmp_path / "private.user-pin", 0o600)
    started = GatewayProcess(tmp_path / "started", softhsm_token.conf, softhsm_token.label, private,
                             f"sqlite:///{tmp_path / 'started.db'}")
    started.start(timeout=60)
    started.stop()


def test_write_private_replaces_a_planted_symlink(tmp_path: Path) -> None:
    """Threat: a symlink planted at the credentials path makes `_write_private` overwrite the file it
    points to, or write the credentials where the planter can read them."""
    victim = tmp_path / "victim.conf"
    victim.write_text("precious\n")
    planted = tmp_path / "dev-credentials.json"
    planted.symlink_to(victim)
    _write_private(planted, '{"admin_api_key": "secret"}\n')
    assert victim.read_text() == "precious\n"
    assert not planted.is_symlink() and planted.read_text() == '{"admin_api_key": "secret"}\n'
    assert _mode(planted) == 0o600
    # A dangling link into a directory the planter reads: nothing is created there.
    loot = tmp_path / "attacker" / "loot.json"
    loot.parent.mkdir()
    dangling = tmp_path / "other-credentials.json"
    dangling.symlink_to(loot)
    _write_private(dangling, "secret\n")
    assert not loot.exists() and dangling.read_text() == "secret\n" and _mode(dangling) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attacker", "dev-credentials.json",
                                                          "other-credentials.json", "victim.conf"]
    # Positive control: an ordinary rewrite (dev-init run again) replaces the file, still 0600.
    _write_private(planted, "second\n")
    assert planted.read_text() == "second\n" and _mode(planted) == 0o600


@pytest.mark.softhsm
@pytest.mark.slow
def test_dev_init_does_not_follow_a_planted_symlink(tmp_path: Path) -> None:
    """Threat: `ecny-gateway dev-init` writes the development credentials through a symlink planted
    at var/dev-credentials.json."""
    var = tmp_path / "var"
    conf = subprocess.run([str(ROOT / "softhsm" / "init-token.sh"), str(var / "hsm"), "ecny-dev"],
                          check=True, capture_output=True, text=True).stdout.strip()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (var / "dev-credentials.json").symlink_to(victim)
    subprocess.run([sys.executable, "-m", "gateway.cli", "dev-init", "--var", str(var)], check=True,
                   env={**os.environ, "SOFTHSM2_CONF": conf}, capture_output=True, timeout=180)
    assert victim.read_text() == "precious\n"
    credentials = var / "dev-credentials.json"
    assert not credentials.is_symlink() and _mode(credentials) == 0o600
    assert set(json.loads(credentials.read_text())) == {"admin_api_key", "backend_api_key", "users"}
    assert _mode(var / "gateway.db") == 0o600


# --- item 11: 503 bodies and /readyz --------------------------------------------------------------


@pytest.mark.softhsm
async def test_readyz_shows_no_worker_details(own_gateway: Gateway) -> None:
    """Threat: the public `/readyz` tells anyone how many signer workers run and what the HSM said."""
    gateway = own_gateway
    response = await gateway.client.get("/readyz")
    assert response.status == 200
    assert await response.json() == {"status": "ready", "hsm": {"ready": True}, "store": {"ready": True}}
    assert (await gateway.client.get("/v1/status")).status == 401
    # Positive control: operators still get the details, authenticated.
    for role in (Role.ADMIN, Role.SUPERVISOR, Role.BACKEND):
        status = await gateway.client.get("/v1/status", headers=gateway.auth(role))
        assert status.status == 200
        document = await status.json()
        assert document["status"] == "ready" and document["store"] == {"ready": True}
        assert document["hsm"]["ready"] is True and document["hsm"]["workers"] == 2
        assert document["hsm"]["workers_up"] == 2 and "detail" in document["hsm"]


@pytest.fixture
def pg_gateway_dsn(postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    # A short lock timeout, so a held lock fails a request in a fraction of a second instead of 10 s.
    monkeypatch.setattr("gateway.ledger.postgres.LOCK_TIMEOUT_MS", 300)
    name = f"t_{uuid.uuid4().hex[:16]}"
    yield postgres_server.create_database(name)
    postgres_server.drop_database(name)


def _leaks_postgres(text: str, dbname: str) -> bool:
    lowered = text.lower()
    return any(word in lowered for word in ("postgres", "lock timeout", "canceling", "clients", dbname.lower(),
                                            "127.0.0.1", "psycopg", "connection"))


@pytest.mark.softhsm
@pytest.mark.postgres
async def test_503_bodies_carry_no_postgresql_text(
    softhsm_token: Token, pg_gateway_dsn: str, postgres_server: PostgresServer
) -> None:
    """Threat: 503 bodies hand any client PostgreSQL's own words (tables, database, host), and a
    client-chosen request id of any form reaches the error log."""
    dbname = pg_gateway_dsn.rsplit("/", 1)[1]
    gateway = await start_gateway(make_settings(softhsm_token, pg_gateway_dsn))
    backend = gateway.auth(Role.BACKEND)
    try:
        assert (await gateway.client.get("/v1/keys", headers=backend)).status == 200  # positive control
        with psycopg.connect(pg_gateway_dsn, autocommit=True) as locker:
            locker.execute("BEGIN")
            locker.execute("LOCK TABLE clients IN ACCESS EXCLUSIVE MODE")  # an insider's long transaction
            with structlog.testing.capture_logs() as logs:
                evil_ids = ["x" * 5000, "evil id\twith\ttabs", "0123456789" * 7]
                responses = [await gateway.client.get("/v1/keys", headers={**backend, "X-Request-Id": evil})
                             for evil in evil_ids]
            locker.execute("ROLLBACK")
        for response in responses:
            assert response.status == 503
            assert response.headers["Retry-After"].isdigit()
            problem = await response.json()
            assert problem["type"] == PROBLEMS + "store-unavailable"
            assert not _leaks_postgres(json.dumps(problem), dbname), problem
            assert GENERATED_REQUEST_ID.fullmatch(problem["request_id"])
            assert response.headers["X-Request-Id"] == problem["request_id"]
            # The specific text is in the log, under the request id the client got.
            logged = [entry for entry in logs if entry.get("request_id") == problem["request_id"]]
            assert logged and "lock timeout" in logged[0]["detail"]
        rendered = json.dumps(logs, default=str)
        assert not [evil for evil in evil_ids if evil in rendered]
        assert (await gateway.client.get("/v1/keys", headers=backend)).status == 200  # and back to normal
    finally:
        await gateway.client.close()


@pytest.mark.softhsm
@pytest.mark.postgres
async def test_readyz_when_the_store_is_down_says_only_which_part(
    softhsm_token: Token, pg_gateway_dsn: str, postgres_server: PostgresServer
) -> None:
    """Threat: a failing `/readyz` hands anyone PostgreSQL's error text and the HSM's worker details."""
    dbname = pg_gateway_dsn.rsplit("/", 1)[1]
    gateway = await start_gateway(make_settings(softhsm_token, pg_gateway_dsn))
    gateway.client.server.app[RUNTIME].database.acquire_timeout = 1.0  # type: ignore[attr-defined]
    admin = psycopg.connect(postgres_server.dsn(), autocommit=True)
    try:
        admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (dbname,))
        ready = await gateway.client.get("/readyz")
        assert ready.status == 503
        problem = await ready.json()
        assert problem["hsm"] == {"ready": True} and problem["store"] == {"ready": False}
        assert not _leaks_postgres(json.dumps(problem), dbname) and "workers" not in json.dumps(problem)
        status = await gateway.client.get("/v1/status", headers=gateway.auth(Role.ADMIN))
        assert status.status == 503  # no one can be authenticated without the store
        assert not _leaks_postgres(await status.text(), dbname)
    finally:
        admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        admin.close()
        await gateway.client.close()


# --- item 11: mtls_identities without tls_client_ca -----------------------------------------------


def test_mtls_identities_without_client_ca_is_a_config_error(tmp_path: Path) -> None:
    """Threat: `mtls_identities` configured without `tls_client_ca` is silently ignored: the operator
    believes in client certificates nobody is asked for."""
    config = tmp_path / "gateway.toml"
    config.write_text('[server]\nmtls_identities = { "branch-backend-01" = "test-backend" }\n')
    with pytest.raises(ConfigError) as refused:
        load_settings(config, environ={})
    assert "server.mtls_identities" in refused.value.detail and "server.tls_client_ca" in refused.value.detail
    with pytest.raises(ConfigError, match="tls_client_ca"):
        load_settings(None, environ={"ECNY_SERVER__MTLS_IDENTITIES": '{"branch-backend-01": "test-backend"}'})
    # The real command refuses to start on it, with the message and no traceback.
    served = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert served.returncode != 0 and "server.tls_client_ca" in served.stderr and "Traceback" not in served.stderr
    # Positive control: with a client CA the same identities load.
    config.write_text('[server]\ntls_cert = "s.pem"\ntls_key = "s.key"\ntls_client_ca = "ca.pem"\n'
                      'mtls_identities = { "branch-backend-01" = "test-backend" }\n')
    assert load_settings(config, environ={}).server.mtls_identities == {"branch-backend-01": "test-backend"}
    assert load_settings(None, environ={}).server.mtls_identities == {}


# --- item 11: X-Request-Id -------------------------------------------------------------------------


async def _raw_http(gateway: Gateway, head: bytes, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One request written byte for byte on a socket (headers aiohttp's client would refuse to send)."""
    server = gateway.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(head + b"\r\n" + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout=30)
    finally:
        writer.close()
    header_block, _, payload = answer.partition(b"\r\n\r\n")
    lines = header_block.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, payload


@pytest.mark.softhsm
async def test_client_request_id_enters_the_audit_chain_only_in_a_safe_form(own_gateway: Gateway) -> None:
    """Threat: a client-chosen `X-Request-Id` of any length and content (10 kB, control characters,
    terminal escapes) written into the audit chain and the logs."""
    gateway = own_gateway
    raw = await _create_key(gateway, "ecdsa-p256", ["raw"])
    token = gateway.auth(Role.BACKEND)["Authorization"].encode()
    body = json.dumps({"digest": hashlib.sha256(b"request id").hexdigest()}).encode()
    evil_ids = [b"A" * 10_240, b"B" * 4000, b"C" * 65, b"id\x01with\x02controls", b"\x1b[31mred\x1b[0m",
                b"tab\there", b"line\x0bfeed", b"caf\xc3\xa9", b"del\x7f", b"quote\"and'<script>", b"sp ace"]
    statuses = []
    with structlog.testing.capture_logs() as logs:
        for evil in evil_ids:
            head = (f"POST /v1/keys/{raw['key_id']}/sign HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n").encode()
            head += b"Authorization: " + token + b"\r\nX-Request-Id: " + evil + b"\r\n"
            status, headers, _ = await _raw_http(gateway, head, body)
            statuses.append(status)
            assert status < 500
            if status == 200:  # it reached the gateway: its id was replaced by a generated one, echoed
                assert GENERATED_REQUEST_ID.fullmatch(headers["x-request-id"]), headers
            else:  # the HTTP parser refused it before the gateway saw it (too long, or bytes HTTP forbids)
                assert status in (400, 431), status
    assert statuses.count(200) >= 6, statuses  # most reach the gateway: the replacement is what is tested
    # Positive control: a sane id is kept, echoed and recorded.
    sane = "branch-17:req.2026-12-05_0001"
    response = await gateway.client.post(f"/v1/keys/{raw['key_id']}/sign", data=body,
                                         headers={**gateway.auth(Role.BACKEND), "X-Request-Id": sane,
                                                  "Content-Type": "application/json"})
    assert response.status == 200 and response.headers["X-Request-Id"] == sane
    with sqlite3.connect(_database_path(gateway)) as connection:
        recorded = [row[0] for row in connection.execute("SELECT request_id FROM audit_log")]
    assert sane in recorded
    assert all(request_id == "" or SAFE_REQUEST_ID.fullmatch(request_id) for request_id in recorded)
    texts = [evil.decode("utf-8", "replace") for evil in evil_ids]
    assert not [text for text in texts if text in recorded]
    rendered = json.dumps(logs, default=str)
    assert not [text for text in texts if text in rendered]


# --- item 11: ecny-teller exits when its terminal goes -------------------------------------------

TELLER_BOUND_S = 10.0
UNREACHABLE_GATEWAY = "http://127.0.0.1:9"


def _wait_exit(process: subprocess.Popen[bytes], seconds: float = TELLER_BOUND_S) -> int | None:
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return None


def _read_until(master: int, text: bytes, seconds: float = 60.0) -> bytes:
    seen = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and text not in seen:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            seen += os.read(master, 65536)
    assert text in seen, seen[-500:]
    return seen


def _teller_on_pty(ignore_sighup: bool) -> tuple[subprocess.Popen[bytes], int]:
    """`ecny-teller` on a fresh pseudo-terminal (80×24) that it holds as its controlling terminal."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))

    def child() -> None:
        if ignore_sighup:  # as under nohup or a job runner: the hang-up signal never arrives
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    process = subprocess.Popen([sys.executable, "-m", "tui.app", "--gateway", UNREACHABLE_GATEWAY],
                               stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                               env={**os.environ, "TERM": "xterm-256color"}, preexec_fn=child)
    os.close(slave)
    return process, master


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.slow
@pytest.mark.parametrize("ignore_sighup", [False, True], ids=["sighup", "sighup-ignored"])
def test_teller_exits_when_its_terminal_is_closed(ignore_sighup: bool) -> None:
    """Threat: `ecny-teller` spins a core forever once its terminal goes away (the pty master closed,
    SIGHUP delivered or ignored as under nohup)."""
    process, master = _teller_on_pty(ignore_sighup)
    try:
        _read_until(master, b"Log in")
        # Positive control: with its terminal alive the teller stays, and idles.
        time.sleep(2.0)
        assert process.poll() is None
        before = _cpu_seconds(process.pid)
        time.sleep(2.0)
        assert _cpu_seconds(process.pid) - before < 1.0
        os.close(master)
        master = -1
        assert _wait_exit(process) is not None, "the teller outlived its terminal"
    finally:
        if master >= 0:
            os.close(master)
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_teller_exits_on_sighup_with_its_terminal_still_open() -> None:
    """Threat: `ecny-teller` survives SIGHUP (the hang-up a closing window or SSH session sends)."""
    process, master = _teller_on_pty(ignore_sighup=False)
    try:
        _read_until(master, b"Log in")
        process.send_signal(signal.SIGHUP)
        assert _wait_exit(process) is not None, "the teller ignored SIGHUP"
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (make system does)")
def test_teller_exits_when_its_tmux_session_is_killed() -> None:
    """Threat: `ecny-teller` left spinning at 75 % CPU by a killed tmux session (the teller started
    with SIGHUP ignored, so only the lost terminal tells it)."""
    server = f"hardening-{uuid.uuid4().hex[:8]}"  # a tmux server of our own, started with this environment
    session = "teller"

    def tmux(*args: str) -> str:
        return subprocess.run(["tmux", "-L", server, *args], check=True, capture_output=True, text=True).stdout

    command = f"trap '' HUP; exec {sys.executable} -m tui.app --gateway {UNREACHABLE_GATEWAY}"
    tmux("new-session", "-d", "-s", session, "-x", "80", "-y", "24", "-c", str(ROOT), command)
    pid = 0
    try:
        deadline = time.monotonic() + 60
        while "Log in" not in tmux("capture-pane", "-p", "-t", session):
            assert time.monotonic() < deadline, tmux("capture-pane", "-p", "-t", session)
            time.sleep(0.2)
        pid = int(tmux("list-panes", "-t", session, "-F", "#{pane_pid}").split()[0])
        assert "tui.app" in Path(f"/proc/{pid}/cmdline").read_text()
        tmux("kill-session", "-t", session)
        deadline = time.monotonic() + TELLER_BOUND_S
        while _running(pid):
            assert time.monotonic() < deadline, "the teller outlived its tmux session"
            time.sleep(0.1)
    finally:
        subprocess.run(["tmux", "-L", server, "kill-server"], capture_output=True)
        if pid and _running(pid):  # a teller that outlived its terminal would spin on: end it
            os.kill(pid, signal.SIGKILL)
