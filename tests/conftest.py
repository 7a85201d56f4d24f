"""Shared fixtures: a real SoftHSM2 token made by the tests, and a running gateway on top of it.

The token comes from ``softhsm/init-token.sh`` — the same script ``make run`` uses. Signer
workers are spawned processes; they inherit ``SOFTHSM2_CONF`` from this process's environment.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from argon2 import PasswordHasher
from pydantic import SecretStr

from gateway.app import make_app
from gateway.audit.chain import AuditEntry, append
from gateway.auth.credentials import add_client, add_user
from gateway.auth.roles import Role
from gateway.config import Settings, load_settings
from gateway.ledger.engines import open_database
from tests.pg import PostgresServer, PostgresUnavailable

ROOT = Path(__file__).resolve().parents[1]
TOKEN_LABEL = "ecny-test"


@dataclass(frozen=True)
class Token:
    directory: Path
    conf: Path
    label: str
    pin: str


@pytest.fixture(scope="session")
def softhsm_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Token]:
    directory = tmp_path_factory.mktemp("softhsm")
    conf = subprocess.run(
        [str(ROOT / "softhsm" / "init-token.sh"), str(directory), TOKEN_LABEL],
        check=True, capture_output=True, text=True, timeout=120,
    ).stdout.strip()
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = conf
    yield Token(directory, Path(conf), TOKEN_LABEL, (directory / f"{TOKEN_LABEL}.user-pin").read_text().strip())
    if previous is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = previous


def make_settings(token: Token, dsn: str, **sections: dict[str, Any]) -> Settings:
    settings = load_settings(None, environ={})
    settings.hsm.token_label = token.label
    settings.hsm.pin = SecretStr(token.pin)
    settings.hsm.workers = 2
    settings.store.dsn = dsn
    settings.audit.checkpoint_every = 10
    settings.audit.checkpoint_seconds = 0.0  # by count only: tests decide when the tail is signed
    settings.auth.credential_cache_seconds = 0.0
    # In-process test gateways run the risk rules inline: tests change rule thresholds at run time and read
    # the metric here. The evaluator process (the default) has tests of its own (tests/api/test_risk.py).
    settings.risk.evaluator = "inline"
    if not dsn.startswith("sqlite:///"):  # the default witness would be ./var/, shared by every run
        settings.audit.witness_file = Path(tempfile.mkdtemp(prefix="ecny-witness-")) / "audit-witness.jsonl"
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(settings, section), key, value)
    return settings


@dataclass
class Gateway:
    client: TestClient[Any, Any]
    settings: Settings
    headers: dict[Role, dict[str, str]]
    passwords: dict[str, str]

    def auth(self, role: Role) -> dict[str, str]:
        return dict(self.headers[role])


PASSWORDS = {"teller1": "teller-password-1", "supervisor1": "supervisor-password-1",
             "supervisor2": "supervisor-password-2",
             "auditor1": "auditor-password-1", "admin1": "admin-password-1"}


async def provision(dsn: str) -> dict[str, str]:
    """API clients for backend and admin; users for the other roles. Returns API keys by role."""
    database = await open_database(dsn)
    hasher = PasswordHasher()
    try:
        await database.migrate()

        def work(tx: Any) -> dict[str, str]:
            keys = {"backend": add_client(tx, "test-backend", Role.BACKEND),
                    "admin": add_client(tx, "test-admin", Role.ADMIN),
                    "peer": add_client(tx, "test-peer", Role.PEER)}
            for username, role in (("teller1", Role.TELLER), ("supervisor1", Role.SUPERVISOR),
                                   ("supervisor2", Role.SUPERVISOR), ("auditor1", Role.AUDITOR),
                                   ("admin1", Role.ADMIN)):
                add_user(tx, hasher, username, role, PASSWORDS[username])
            append(tx, [AuditEntry("test", "admin", "test.provision", "allowed")])
            return keys

        return await database.write(work)
    finally:
        await database.close()


async def start_gateway(settings: Settings) -> Gateway:
    keys = await provision(settings.store.dsn)
    client: TestClient[Any, Any] = TestClient(TestServer(make_app(settings)))
    await client.start_server()
    headers = {Role.BACKEND: {"Authorization": f"Bearer {keys['backend']}"},
               Role.ADMIN: {"Authorization": f"Bearer {keys['admin']}"},
               Role.PEER: {"Authorization": f"Bearer {keys['peer']}"}}
    for username, role in (("teller1", Role.TELLER), ("supervisor1", Role.SUPERVISOR), ("auditor1", Role.AUDITOR)):
        response = await client.post("/v1/sessions", json={"username": username, "password": PASSWORDS[username]})
        assert response.status == 201, await response.text()
        headers[role] = {"Authorization": f"Bearer {(await response.json())['token']}"}
    return Gateway(client, settings, headers, PASSWORDS)


@pytest_asyncio.fixture(scope="session")
async def gateway(softhsm_token: Token, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    """One gateway for the session (spawning signer workers costs ~0.5 s)."""
    database = tmp_path_factory.mktemp("store") / "gateway.db"
    started = await start_gateway(make_settings(softhsm_token, f"sqlite:///{database}"))
    yield started
    await started.client.close()


@pytest_asyncio.fixture(scope="session")
async def raw_keys(gateway: Gateway) -> dict[str, dict[str, Any]]:
    """Keys made through the API: one per algorithm with usage raw, plus keys for other usages."""
    specs = {
        "p256": ("raw-p256", "ecdsa-p256", ["raw"]),
        "k1": ("raw-k1", "ecdsa-secp256k1", ["raw"]),
        "ed": ("raw-ed25519", "ed25519", ["raw"]),
        "ecny": ("ecny-p256", "ecdsa-p256", ["ecny"]),
        "audit": ("audit-p256", "ecdsa-p256", ["audit"]),
    }
    made = {}
    for name, (label, algorithm, usage) in specs.items():
        response = await gateway.client.post(
            "/v1/keys", json={"label": label, "algorithm": algorithm, "usage": usage}, headers=gateway.auth(Role.ADMIN)
        )
        assert response.status == 201, await response.text()
        made[name] = await response.json()
    return made


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throw-away PostgreSQL cluster for the session (see ``tests/pg.py``). Fails, never skips,
    when PostgreSQL is not installed: ``make test`` installs it."""
    server: PostgresServer | None = None
    problem = ""
    try:
        server = PostgresServer().start()
    except PostgresUnavailable as exc:
        problem = str(exc)
    if server is None:
        pytest.fail(f"PostgreSQL tests need a local PostgreSQL server: {problem}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_dsn(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty (not migrated) store for each test, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = f"t_{uuid.uuid4().hex[:16]}"
    yield server.create_database(name)
    server.drop_database(name)


async def login(gateway: Gateway, username: str) -> dict[str, str]:
    response = await gateway.client.post("/v1/sessions", json={"username": username,
                                                               "password": gateway.passwords[username]})
    assert response.status == 201, await response.text()
    return {"Authorization": f"Bearer {(await response.json())['token']}"}


@pytest_asyncio.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def ledger_gateway(
    request: pytest.FixtureRequest, softhsm_token: Token, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Gateway]:
    """A gateway per store (SQLite and PostgreSQL) with an `ecny` and an `audit` key, for ledger tests."""
    if request.param == "sqlite":
        dsn = f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'gateway.db'}"
    else:
        server: PostgresServer = request.getfixturevalue("postgres_server")
        dsn = server.create_database()
    started = await start_gateway(make_settings(softhsm_token, dsn))
    for label, usage in ((f"ecny-{request.param}", "ecny"), (f"audit-{request.param}", "audit")):
        response = await started.client.post(
            "/v1/keys", json={"label": label, "algorithm": "ecdsa-p256", "usage": [usage]},
            headers=started.auth(Role.ADMIN),
        )
        assert response.status == 201, await response.text()
    yield started
    await started.client.close()


# --- EVM (stablecoin) signing ----------------------------------------------------------------------

EVM_TEST_CHAIN_ID = 131277322940537  # eth-tester's chain id (py-evm backend)
EVM_TEST_TOKEN = "0x5a5A5a5a5A5a5a5a5a5A5a5A5A5a5a5A5A5A5A5A"  # registry entry only: nothing is deployed there
EVM_CAPPED_TOKEN = "0x6b6B6B6b6b6b6B6b6B6b6B6b6B6b6b6B6b6b6b6B"
EVM_DENIED = "0xDeaDbeefdEAdbeefdEadbEEFdeadbeEFdEaDbeeF"


def evm_test_chain() -> dict[str, Any]:
    """The eth-tester chain as a registry entry: a 6-decimal test token (per-transaction cap 1,000
    tokens, approval above 100), a token with a small daily cap, a deny-listed recipient, and the
    token's EIP-712 domain allowed."""
    return {
        "chain_id": EVM_TEST_CHAIN_ID, "name": "eth-tester",
        "native": {"symbol": "ETH", "per_tx_cap": str(1_000 * 10**18), "daily_cap": None},
        "approval_threshold": str(100 * 10**18),
        "tokens": [
            {"address": EVM_TEST_TOKEN, "symbol": "TUSD", "decimals": 6, "per_tx_cap": str(1_000 * 10**6),
             "approval_threshold": str(100 * 10**6)},
            {"address": EVM_CAPPED_TOKEN, "symbol": "CAPD", "decimals": 0, "per_tx_cap": 600, "daily_cap": 1_000},
        ],
        "recipient_denylist": [EVM_DENIED],
        "typed_data_domains": [{"verifying_contract": EVM_TEST_TOKEN, "name": "Test USD", "version": "1"}],
    }


async def new_evm_key(gateway: Gateway, label: str) -> dict[str, Any]:
    """A fresh secp256k1 key with usage `evm` (a fresh address: its nonces start at 0)."""
    response = await gateway.client.post(
        "/v1/keys", json={"label": label, "algorithm": "ecdsa-secp256k1", "usage": ["evm"]},
        headers=gateway.auth(Role.ADMIN))
    assert response.status == 201, await response.text()
    document: dict[str, Any] = await response.json()
    return document


@pytest_asyncio.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def evm_gateway(
    request: pytest.FixtureRequest, softhsm_token: Token, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Gateway]:
    """A gateway per store (SQLite and PostgreSQL) whose chain registry is the shipped one plus the
    eth-tester chain (:func:`evm_test_chain`), with an `audit` key. Tests make their own `evm` keys."""
    from gateway.config import EvmSettings

    if request.param == "sqlite":
        dsn = f"sqlite:///{tmp_path_factory.mktemp('evm') / 'gateway.db'}"
    else:
        server: PostgresServer = request.getfixturevalue("postgres_server")
        dsn = server.create_database()
    chains = [*EvmSettings().chains, evm_test_chain()]
    started = await start_gateway(make_settings(softhsm_token, dsn, evm={"chains": chains}))
    response = await started.client.post(
        "/v1/keys", json={"label": f"audit-evm-{request.param}", "algorithm": "ecdsa-p256", "usage": ["audit"]},
        headers=started.auth(Role.ADMIN))
    assert response.status == 201, await response.text()
    yield started
    await started.client.close()


# The Ethereum JSON-RPC signer's upstream node and gateway (fixtures ``eth_node`` and ``rpc_gateway``).
pytest_plugins = ["tests.evm_node", "tests.evm_rpc_support"]
