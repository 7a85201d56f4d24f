"""No PIN, API key, password or session token ever reaches the gateway's logs (debug level, access
log on), the audit log, or the command lines of its processes."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import subprocess
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import ROOT, Token
from tests.procs import GatewayProcess

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]

LABEL = "ecny-secrets"


def test_secrets_stay_out_of_logs_audit_and_argv(softhsm_token: Token, tmp_path: Path) -> None:
    subprocess.run([str(ROOT / "softhsm" / "init-token.sh"), str(softhsm_token.directory), LABEL], check=True,
                   capture_output=True)
    pin_file = softhsm_token.directory / f"{LABEL}.user-pin"
    database = tmp_path / "gw.db"
    gateway = GatewayProcess(tmp_path / "var", softhsm_token.conf, LABEL, pin_file, f"sqlite:///{database}")
    config = gateway.var / "gateway.toml"
    config.write_text(
        config.read_text().replace("[server]\n", "[server]\naccess_log = true\n") + '\n[logging]\nlevel = "debug"\n'
    )
    credentials = gateway.provision()
    gateway.start()
    session_tokens: list[str] = []
    try:
        async def traffic() -> None:
            async with aiohttp.ClientSession() as session:
                backend = {"Authorization": f"Bearer {credentials['backend_api_key']}"}
                admin = {"Authorization": f"Bearer {credentials['admin_api_key']}"}
                async with session.get(gateway.url + "/v1/keys", headers=backend) as r:
                    keys = (await r.json())["keys"]
                raw = next(k for k in keys if k["label"] == "raw-p256")
                for digest in (hashlib.sha256(b"a").hexdigest(), "zz", "00" * 31):
                    async with session.post(f"{gateway.url}/v1/keys/{raw['key_id']}/sign", json={"digest": digest},
                                            headers=backend) as r:
                        await r.read()
                for username, password in credentials["users"].items():
                    async with session.post(gateway.url + "/v1/sessions",
                                            json={"username": username, "password": password}) as r:
                        session_tokens.append((await r.json())["token"])
                    async with session.post(gateway.url + "/v1/sessions",
                                            json={"username": username, "password": password + "x"}) as r:
                        assert r.status == 401
                async with session.post(gateway.url + "/v1/keys", headers=admin,
                                        json={"label": "x", "algorithm": "ecdsa-p256", "usage": ["raw"]}) as r:
                    assert r.status == 201
                wrong = {"Authorization": "Bearer " + credentials["backend_api_key"] + "x"}
                async with session.get(gateway.url + "/v1/audit", headers=wrong) as r:
                    assert r.status == 401
                async with session.get(gateway.url + "/metrics", headers=admin) as r:
                    assert r.status == 200

        asyncio.run(traffic())
        argv = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    finally:
        gateway.stop()

    secrets = {
        "PIN": pin_file.read_text().strip(),
        "SO PIN": (softhsm_token.directory / f"{LABEL}.so-pin").read_text().strip(),
        "admin API key": credentials["admin_api_key"],
        "backend API key": credentials["backend_api_key"],
        **{f"password of {user}": password for user, password in credentials["users"].items()},
        **{f"session token {i}": token for i, token in enumerate(session_tokens)},
    }
    log = (gateway.var / "gateway.log").read_text()
    assert "GET /v1/keys" in log or "/v1/keys" in log  # the access log was on: the check below means something
    with sqlite3.connect(database) as connection:
        audit = "\n".join(repr(row) for row in connection.execute("SELECT * FROM audit_log"))
    assert "sessions.create" in audit
    for name, secret in secrets.items():
        assert secret not in log, f"{name} is in the gateway log"
        assert secret not in audit, f"{name} is in the audit log"
        assert secret not in argv, f"{name} is on a command line"
        # Secrets are stored only as hashes, never as themselves, anywhere in the database file.
        for file in (database, database.with_name(database.name + "-wal")):
            if file.exists():
                assert secret.encode() not in file.read_bytes(), f"{name} is in {file.name}"
