"""The operator's command line against a real token, store and running gateway: `users passwd` and
`clients rotate`, `hsm doctor`, `--json`, progress bars, and errors that are one line, never a traceback.

Every command runs as a real ``ecny-gateway`` process (``python -m gateway.cli``), as an operator runs it.
"""

from __future__ import annotations

import json
import os
import pty
import select
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher

from tests.conftest import ROOT, Token
from tests.procs import GatewayProcess

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]

LABEL = "ecny-operations"


@dataclass
class Site:
    gateway: GatewayProcess
    credentials: dict[str, Any]
    database: Path
    pin_file: Path

    def cli(self, *args: str, stdin: str | None = None, env: dict[str, str] | None = None,
            config: bool = True) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "gateway.cli", *args]
        if config:
            command += ["--config", str(self.gateway.var / "gateway.toml")]
        return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=120,
                              env={**self.gateway.env, "PYTHONPATH": str(ROOT), **(env or {})})

    def status(self, api_key: str, path: str = "/v1/keys") -> int:
        request = urllib.request.Request(self.gateway.url + path, headers={"Authorization": f"Bearer {api_key}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return int(error.code)


@pytest.fixture(scope="module")
def site(softhsm_token: Token, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    subprocess.run([str(ROOT / "softhsm" / "init-token.sh"), str(softhsm_token.directory), LABEL], check=True,
                   capture_output=True)
    var = tmp_path_factory.mktemp("operations")
    database = var / "gw.db"
    gateway = GatewayProcess(var / "var", softhsm_token.conf, LABEL, softhsm_token.directory / f"{LABEL}.user-pin",
                             f"sqlite:///{database}")
    credentials = gateway.provision()
    gateway.start()
    try:
        yield Site(gateway, credentials, database, softhsm_token.directory / f"{LABEL}.user-pin")
    finally:
        gateway.stop()


def _login(site: Site, username: str, password: str) -> int:
    request = urllib.request.Request(site.gateway.url + "/v1/sessions", method="POST",
                                     data=json.dumps({"username": username, "password": password}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def test_users_passwd_reads_stdin_and_ends_sessions(site: Site) -> None:
    """Password on the command line (ps, shell history): `users passwd` takes none from argv, reads it
    from stdin or a prompt, keeps it out of the audit log, and logs out the old password's sessions."""
    old = site.credentials["users"]["auditor1"]
    assert _login(site, "auditor1", old) == 201
    refused = site.cli("users", "passwd", "auditor1", "a-password-in-argv-1")
    assert refused.returncode == 2 and "unrecognized arguments" in refused.stderr
    assert _login(site, "auditor1", old) == 201  # unchanged
    short = site.cli("users", "passwd", "auditor1", "--password-stdin", stdin="short\n")
    assert short.returncode == 2 and "at least 12" in short.stderr and "Traceback" not in short.stderr

    new = "correct-horse-battery-9"
    changed = site.cli("users", "passwd", "auditor1", "--password-stdin", stdin=new + "\n")
    assert changed.returncode == 0, changed.stderr
    assert "2 session(s) ended" in changed.stdout
    assert _login(site, "auditor1", old) == 401
    assert _login(site, "auditor1", new) == 201
    with sqlite3.connect(site.database) as db:
        stored = db.execute("SELECT password_hash FROM users WHERE username = 'auditor1'").fetchone()[0]
        audit = [row[0] for row in db.execute("SELECT result FROM audit_log WHERE action = 'users.passwd'")]
    assert PasswordHasher().verify(stored, new)
    assert audit and all(new not in str(result) for result in audit)


def test_clients_rotate_revokes_the_old_key(site: Site) -> None:
    """A leaked API key outliving its rotation: after `clients rotate` the old key is refused at once
    (credential cache 0) and the new key, printed once on stdout only, works."""
    added = site.cli("clients", "add", "--name", "rotating", "--role", "auditor")
    old = added.stdout.strip()
    assert added.returncode == 0 and site.status(old, "/v1/audit") == 200
    rotated = site.cli("clients", "rotate", "rotating")
    assert rotated.returncode == 0, rotated.stderr
    new = rotated.stdout.strip()
    assert new.startswith("ecny_") and new != old and new not in rotated.stderr
    assert site.status(old, "/v1/audit") == 401
    assert site.status(new, "/v1/audit") == 200
    listed = json.loads(site.cli("clients", "list", "--json").stdout)["clients"]
    entry = next(c for c in listed if c["name"] == "rotating")
    assert new.startswith(f"ecny_{entry['key_prefix']}_") and entry["revoked_at"] is None
    revoked = site.cli("clients", "revoke", "rotating")
    assert revoked.returncode == 0
    again = site.cli("clients", "rotate", "rotating")  # a revoked client is not brought back by a rotation
    assert again.returncode == 2 and "no active client" in again.stderr
    assert site.status(new, "/v1/audit") == 401


def test_json_on_every_list_and_show(site: Site) -> None:
    """Scripts scraping tables: every list and show command prints one JSON document with --json."""
    keys = json.loads(site.cli("keys", "list", "--json").stdout)["keys"]
    assert {k["label"] for k in keys} >= {"ecny-transfers", "evm-hot-wallet"}
    evm = next(k for k in keys if k["label"] == "evm-hot-wallet")
    shown = json.loads(site.cli("keys", "show", evm["key_id"], "--json").stdout)
    assert shown["address"] == evm["address"] and shown["public_key_pem"].startswith("-----BEGIN PUBLIC KEY")
    clients = json.loads(site.cli("clients", "list", "--json").stdout)["clients"]
    assert {"dev-admin", "dev-backend"} <= {c["name"] for c in clients}
    assert all("key_hash" not in c for c in clients)
    users = json.loads(site.cli("users", "list", "--json").stdout)["users"]
    assert {u["username"] for u in users} >= {"teller1", "supervisor1", "auditor1"}
    assert all("password_hash" not in u for u in users)
    assert json.loads(site.cli("migrate", "--json").stdout) == {"applied": []}
    assert json.loads(site.cli("ledger", "check", "--json").stdout) == {"ok": True, "problems": []}
    verified = json.loads(site.cli("audit", "verify", "--json").stdout)
    assert verified["ok"] is True and verified["entries"] > 0
    doctor = json.loads(site.cli("hsm", "doctor", "--json").stdout)
    assert doctor["ok"] is True and {c["check"] for c in doctor["checks"]} >= {"module", "slots", "token", "login"}


def _on_terminal(site: Site, *args: str) -> tuple[int, str, bytes]:
    """Run with stderr on a pseudo-terminal and stdout on a pipe: (exit status, stdout, stderr bytes)."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", *args, "--config", str(site.gateway.var / "gateway.toml")],
        stdout=subprocess.PIPE, stderr=terminal, env={**site.gateway.env, "PYTHONPATH": str(ROOT)})
    os.close(terminal)
    drawn = b""
    while True:
        ready, _, _ = select.select([controller], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        drawn += chunk
    assert process.stdout is not None
    stdout = process.stdout.read().decode()
    os.close(controller)
    return process.wait(timeout=60), stdout, drawn


@pytest.mark.parametrize(("command", "description"), [
    (("audit", "verify"), b"verifying the audit chain"),
    (("ledger", "check"), b"checking the ledger"),
    (("migrate",), b"migrating"),
])
def test_progress_bars_only_on_a_terminal(site: Site, command: tuple[str, ...], description: bytes) -> None:
    """Control characters in a log or a JSON pipe: the progress bar is drawn on a terminal only, never
    with --json, never into a pipe."""
    code, stdout, drawn = _on_terminal(site, *command)
    assert code == 0 and description in drawn and b"\x1b[" in drawn, drawn[-500:]
    code, stdout, drawn = _on_terminal(site, *command, "--json")
    assert code == 0 and description not in drawn
    json.loads(stdout)
    piped = site.cli(*command)
    assert piped.returncode == 0 and description.decode() not in piped.stderr and "\x1b[" not in piped.stderr


def test_hsm_doctor_finds_a_weak_key_and_a_missing_mechanism(site: Site, tmp_path: Path) -> None:
    """A key on the gateway's token made outside it (extractable, not sensitive), or a profile naming a
    mechanism the device lacks: `hsm doctor` names each and exits 1; the sound token passes."""
    sound = site.cli("hsm", "doctor")
    assert sound.returncode == 0, sound.stdout + sound.stderr
    assert "HSM matches the profile" in sound.stdout
    skipped = site.cli("hsm", "doctor", "--no-login")
    assert skipped.returncode == 0 and "SKIPPED" in skipped.stdout

    profile = tmp_path / "softhsm-sha256.toml"  # CKM_ECDSA_SHA256: SoftHSM2 2.6 does not have it
    profile.write_text((ROOT / "gateway" / "hsm" / "profiles" / "softhsm.toml").read_text().replace(
        'sign_mechanism = "ECDSA"\ninput = "digest"\nhash = "sha256"',
        'sign_mechanism = "ECDSA_SHA256"\ninput = "message"\nhash = "none"', 1))
    assert "ECDSA_SHA256" in profile.read_text()
    missing = site.cli("hsm", "doctor", "--profile", str(profile), "--no-login")
    assert missing.returncode == 1, missing.stdout + missing.stderr
    assert "PROBLEM  mechanisms ecdsa-p256: missing or without the flag: CKM_ECDSA_SHA256" in missing.stdout

    planted = subprocess.run([sys.executable, "-c", (
        "import pkcs11, sys\n"
        "from pkcs11.util.ec import encode_named_curve_parameters\n"
        "lib = pkcs11.lib('/usr/lib/softhsm/libsofthsm2.so')\n"
        f"with lib.get_token(token_label={LABEL!r}).open(user_pin=sys.stdin.read().strip(), rw=True) as s:\n"
        "    p = s.create_domain_parameters(pkcs11.KeyType.EC, {pkcs11.Attribute.EC_PARAMS: "
        "encode_named_curve_parameters('1.2.840.10045.3.1.7')}, local=True)\n"
        "    p.generate_keypair(store=True, label='exportable', id=b'\\x01\\x02', private_template={"
        "pkcs11.Attribute.SENSITIVE: False, pkcs11.Attribute.EXTRACTABLE: True})\n")],
        input=site.pin_file.read_text(), env=site.gateway.env, capture_output=True, text=True, timeout=60)
    assert planted.returncode == 0, planted.stderr
    weak = site.cli("hsm", "doctor")
    assert weak.returncode == 1, weak.stdout + weak.stderr
    line = next(line for line in weak.stdout.splitlines() if "'exportable'" in line)
    assert line.startswith("PROBLEM") and "extractable = true" in line and "sensitive = false" in line
    document = json.loads(site.cli("hsm", "doctor", "--json").stdout)
    assert document["ok"] is False


def test_wrong_pin_is_a_finding_not_a_crash(site: Site) -> None:
    """A wrong PIN in the settings: the doctor reports the refused login (exit 1), no traceback."""
    result = site.cli("hsm", "doctor", env={"ECNY_HSM__PIN": "0000-not-the-pin"})
    assert result.returncode == 1 and "PROBLEM  login: login refused" in result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [
    ("keys", "show", "00" * 16),
    ("clients", "revoke", "nobody"),
    ("clients", "rotate", "nobody"),
    ("users", "disable", "nobody"),
    ("users", "passwd", "nobody", "--password-stdin"),
    ("hsm", "doctor", "--profile", "no-such-profile"),
    ("audit", "verify", "--public-key", "k=/nonexistent.pem"),
    ("audit", "verify", "--witness", "/nonexistent/witness.jsonl"),
    ("migrate", "--db", "mysql://nobody@localhost/x"),
    ("ledger", "check", "--db", "sqlite:////nonexistent/dir/x.db"),
])
def test_errors_are_one_line_never_a_traceback(site: Site, args: tuple[str, ...]) -> None:
    """Tracebacks that leak settings or internals to an operator's terminal or a log collector: every
    refusal is one `ecny-gateway: …` line on stderr and exit status 2."""
    result = site.cli(*args, stdin="")
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and result.stderr.startswith("ecny-gateway: "), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 or "warning" in result.stderr


@pytest.mark.parametrize("settings", ["[server\nport = 1", "[server]\nport = 'eighty'", "[nonsense]\nx = 1"])
def test_bad_settings_are_one_line(site: Site, tmp_path: Path, settings: str) -> None:
    """A broken settings file: a one-line message naming the file or key, exit 2, no traceback."""
    config = tmp_path / "bad.toml"
    config.write_text(settings)
    result = site.cli("keys", "list", "--config", str(config), config=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("ecny-gateway: ") and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [("ledger", "check"), ("audit", "verify")])
def test_checking_a_mistyped_store_is_refused(site: Site, tmp_path: Path, command: tuple[str, ...]) -> None:
    """A mistyped store path checked as sound: `ledger check` and `audit verify` refuse a SQLite file that
    does not exist instead of creating, migrating and passing an empty one."""
    missing = tmp_path / "typo" / "gateway.db"
    result = site.cli(*command, "--db", f"sqlite:///{missing}")
    assert result.returncode == 2 and f"no database at {missing}" in result.stderr
    assert not missing.parent.exists()
    real = site.cli(*command, "--db", f"sqlite:///{site.database}")
    assert real.returncode == 0, real.stdout + real.stderr
