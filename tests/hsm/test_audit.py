"""The audit chain and its HSM-signed checkpoints, checked offline by `ecny-gateway audit verify`
on a copy of the live database — intact, then with one row changed, deleted or reordered, with the
chain rewritten consistently, and with a forged checkpoint."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.audit.chain import GENESIS, AuditEntry, entry_hash
from gateway.auth.roles import Role
from gateway.errors import KeyDisabled, KeyUsageNotAllowed
from gateway.keys import Usage
from gateway.runtime import RUNTIME
from tests.conftest import Gateway, make_settings, start_gateway

pytestmark = pytest.mark.softhsm


async def _activity(gateway: Gateway, raw_keys: dict[str, Any], count: int = 12) -> None:
    for i in range(count):
        response = await gateway.client.post(
            f"/v1/keys/{raw_keys['p256']['key_id']}/sign", json={"digest": hashlib.sha256(bytes([i])).hexdigest()},
            headers=gateway.auth(Role.BACKEND),
        )
        assert response.status == 200


async def _snapshot(gateway: Gateway, raw_keys: dict[str, Any], target: Path) -> Path:
    await _activity(gateway, raw_keys)
    seq = await gateway.client.server.app[RUNTIME].audit.checkpoint()
    assert seq is None or seq > 0
    await _activity(gateway, raw_keys, 3)  # a tail after the last checkpoint
    source = sqlite3.connect(gateway.settings.store.dsn.removeprefix("sqlite:///"))
    copy = sqlite3.connect(target)
    source.backup(copy)
    source.close()
    copy.close()
    return target


def _verify(db: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "audit", "verify", "--db", f"sqlite:///{db}", *extra],
        capture_output=True, text=True, timeout=60,
    )


def _rows(db: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(db)
    connection.row_factory = sqlite3.Row
    return connection


@pytest.fixture
async def snapshot(gateway: Gateway, raw_keys: dict[str, Any], tmp_path: Path) -> Path:
    return await _snapshot(gateway, raw_keys, tmp_path / "copy.db")


async def test_api_verify_reports_intact_chain(gateway: Gateway, raw_keys: dict[str, Any]) -> None:
    await _activity(gateway, raw_keys)
    await gateway.client.server.app[RUNTIME].audit.checkpoint()
    response = await gateway.client.get("/v1/audit/verify", headers=gateway.auth(Role.AUDITOR))
    report = await response.json()
    assert response.status == 200
    assert report["ok"] is True and report["entries"] >= 12 and report["checkpoints"] >= 1


def test_intact_copy_verifies(snapshot: Path) -> None:
    result = _verify(snapshot)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "audit chain intact" in result.stdout


def _middle_seq(db: Path) -> int:
    with _rows(db) as connection:
        last = connection.execute("SELECT MAX(seq) FROM audit_log").fetchone()[0]
    return int(last) // 2


def test_changed_row_is_named(snapshot: Path) -> None:
    seq = _middle_seq(snapshot)
    with _rows(snapshot) as connection:
        connection.execute("UPDATE audit_log SET result = '{\"count\":2}' WHERE seq = ?", (seq,))
    result = _verify(snapshot)
    assert result.returncode == 1
    assert f"BROKEN at entry {seq}" in result.stdout and "altered" in result.stdout


def test_deleted_row_is_named(snapshot: Path) -> None:
    seq = _middle_seq(snapshot)
    with _rows(snapshot) as connection:
        connection.execute("DELETE FROM audit_log WHERE seq = ?", (seq,))
    result = _verify(snapshot)
    assert result.returncode == 1
    assert f"BROKEN at entry {seq}" in result.stdout and "missing" in result.stdout


def test_reordered_rows_are_named(snapshot: Path) -> None:
    seq = _middle_seq(snapshot)
    with _rows(snapshot) as connection:
        connection.execute("UPDATE audit_log SET seq = -1 WHERE seq = ?", (seq,))
        connection.execute("UPDATE audit_log SET seq = ? WHERE seq = ?", (seq, seq + 1))
        connection.execute("UPDATE audit_log SET seq = ? WHERE seq = -1", (seq + 1,))
    result = _verify(snapshot)
    assert result.returncode == 1
    assert f"BROKEN at entry {seq}" in result.stdout


def test_consistently_rewritten_chain_is_caught_by_the_signed_checkpoint(snapshot: Path) -> None:
    # Someone with write access changes an early entry and recomputes every hash after it:
    # the chain is self-consistent again, but the HSM-signed checkpoint no longer matches.
    with _rows(snapshot) as connection:
        connection.execute("UPDATE audit_log SET actor = 'client:someone-else' WHERE seq = 2")
        prev = GENESIS
        for row in connection.execute("SELECT * FROM audit_log ORDER BY seq").fetchall():
            digest = entry_hash(prev, dict(row))
            connection.execute("UPDATE audit_log SET prev_hash = ?, entry_hash = ? WHERE seq = ?",
                               (prev, digest, row["seq"]))
            prev = digest
        first_checkpoint = connection.execute("SELECT MIN(seq) FROM audit_checkpoints").fetchone()[0]
    result = _verify(snapshot)
    assert result.returncode == 1
    assert f"checkpoint at {first_checkpoint} does not match" in result.stdout


def test_forged_checkpoint_signature_is_caught(snapshot: Path) -> None:
    with _rows(snapshot) as connection:
        seq, signature = connection.execute("SELECT seq, signature FROM audit_checkpoints LIMIT 1").fetchone()
        forged = bytes([signature[0] ^ 1]) + bytes(signature[1:])
        connection.execute("UPDATE audit_checkpoints SET signature = ? WHERE seq = ?", (forged, seq))
    result = _verify(snapshot)
    assert result.returncode == 1
    assert f"checkpoint at {seq} has an invalid signature" in result.stdout


def test_pinned_public_key_must_match(snapshot: Path, raw_keys: dict[str, Any], tmp_path: Path) -> None:
    audit_key = raw_keys["audit"]
    right = tmp_path / "audit.pem"
    right.write_text(audit_key["public_key_pem"])
    wrong = tmp_path / "other.pem"
    wrong.write_text(raw_keys["ecny"]["public_key_pem"])
    assert _verify(snapshot, "--public-key", f"{audit_key['key_id']}={right}").returncode == 0
    result = _verify(snapshot, "--public-key", f"{audit_key['key_id']}={wrong}")
    assert result.returncode == 1 and "invalid signature" in result.stdout


async def test_the_head_is_checkpointed_and_reported_by_time(softhsm_token: Any, tmp_path: Path) -> None:
    """Entries written inside other transactions (here: opening a wallet) never pass the count of
    grouped entries; the time-based checkpoint signs them within ``checkpoint_seconds``."""
    settings = make_settings(softhsm_token, f"sqlite:///{tmp_path / 'gateway.db'}",
                             audit={"checkpoint_every": 1_000_000, "checkpoint_seconds": 0.2})
    gateway = await start_gateway(settings)
    try:
        response = await gateway.client.post("/v1/keys", json={"label": "audit-by-time", "algorithm": "ecdsa-p256",
                                                               "usage": ["audit"]}, headers=gateway.auth(Role.ADMIN))
        assert response.status == 201, await response.text()
        response = await gateway.client.post("/v1/wallets", json={"holder_name": "Han Meimei", "phone": "13800138000",
                                                                  "tier": 4, "kind": "personal"},
                                             headers=gateway.auth(Role.TELLER))
        assert response.status == 201, await response.text()
        database = gateway.client.server.app[RUNTIME].database
        head = (await database.read(lambda tx: tx.fetchone("SELECT MAX(seq) AS seq FROM audit_log")))["seq"]

        async def checkpointed() -> int:
            row = await database.read(lambda tx: tx.fetchone("SELECT MAX(seq) AS seq FROM audit_checkpoints"))
            return int(row["seq"] or 0)

        async def head_gauge() -> float:
            response = await gateway.client.get("/metrics", headers=gateway.auth(Role.AUDITOR))
            for family in text_string_to_metric_families(await response.text()):
                if family.name == "ecny_audit_head_seq":
                    return float(family.samples[0].value)
            raise AssertionError("no ecny_audit_head_seq")

        for _ in range(200):  # polled, not timed: the ticker runs every 0.2 s
            if await checkpointed() >= head and await head_gauge() >= head:
                break
            await asyncio.sleep(0.05)
        assert await checkpointed() >= head
        # The head seen from outside (Prometheus) follows entries written inside other transactions too.
        assert await head_gauge() == (await database.read(
            lambda tx: tx.fetchone("SELECT MAX(seq) AS seq FROM audit_log")))["seq"]
    finally:
        await gateway.client.close()
    result = _verify(tmp_path / "gateway.db")
    assert result.returncode == 0, result.stdout + result.stderr


async def test_a_stopped_key_turns_only_its_own_entry_into_a_refusal(gateway: Gateway,
                                                                     raw_keys: dict[str, Any]) -> None:
    """Threat: one request's late refusal (its key stopped while it signed) either voids the commit of every
    request grouped with it, or leaves nothing in the chain. Three entries go to one group commit; the
    middle one's key was disabled: it is written as that refusal and its own write does not run, while the
    other two are written as allowed with their writes."""
    runtime = gateway.client.server.app[RUNTIME]
    audit, database = runtime.audit, runtime.database
    created = await gateway.client.post("/v1/keys", json={"label": "grouped-then-disabled", "algorithm": "ecdsa-p256",
                                                          "usage": ["raw"]}, headers=gateway.auth(Role.ADMIN))
    stopped = (await created.json())["key_id"]
    disabled = await gateway.client.post(f"/v1/keys/{stopped}/disable", headers=gateway.auth(Role.ADMIN))
    assert disabled.status == 200, await disabled.text()
    active = raw_keys["p256"]["key_id"]
    ran: list[str] = []

    def also(name: str) -> Callable[[Any], str]:
        def write(tx: Any) -> str:
            ran.append(name)
            return name
        return write

    entries = {name: AuditEntry("test", "backend", "keys.sign", "allowed", key_id=name,
                                result={"signature_sha256": name * 8}) for name in "abc"}
    outcomes = await asyncio.gather(audit.record_with(entries["a"], also("a"), signed_by=(active, Usage.RAW)),
                                    audit.record_with(entries["b"], also("b"), signed_by=(stopped, Usage.RAW)),
                                    audit.record_with(entries["c"], also("c"), signed_by=(active, Usage.RAW)),
                                    return_exceptions=True)
    assert [o[1] for o in outcomes if isinstance(o, tuple)] == ["a", "c"] and ran == ["a", "c"]
    refused = outcomes[1]
    assert isinstance(refused, KeyDisabled) and refused.audited_in_transaction
    rows = await database.read(lambda tx: tx.fetchall(
        "SELECT seq, key_id, decision, reasons, result FROM audit_log ORDER BY seq DESC LIMIT 3"))
    by_key = {row["key_id"]: row for row in rows}
    assert [by_key[k]["decision"] for k in "abc"] == ["allowed", "refused", "allowed"]
    assert {row["seq"] for row in rows} == {o[0] for o in outcomes if isinstance(o, tuple)} | {by_key["b"]["seq"]}
    assert json.loads(by_key["b"]["reasons"]) == ["key-disabled"]
    assert json.loads(by_key["b"]["result"])["withheld"] == {"signature_sha256": "b" * 8}
    # The same key for another usage is refused too: a raw key confirmed as an ``ecny`` signer is not one.
    with pytest.raises(KeyUsageNotAllowed):
        await audit.record_with(AuditEntry("test", "backend", "keys.sign", "allowed"), also("d"),
                                signed_by=(active, Usage.ECNY))
    # The chain stays whole.
    verified = await gateway.client.get("/v1/audit/verify", headers=gateway.auth(Role.AUDITOR))
    assert verified.status == 200 and (await verified.json())["ok"] is True
