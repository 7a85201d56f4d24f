"""Trade-finance attestations and the alliance's double-financing check (docs/trade-finance.md).

Two banks, each a real gateway with its own store and its own SoftHSM2 token (bank A on SQLite, bank B on
PostgreSQL): the alliance HMAC key is imported into both tokens with ``ecny-gateway alliance import-key``
(the key ceremony), each bank has its own ``attest`` key, and B pulls A's signed fingerprint batches over
real HTTP (A's aiohttp test server on a port). pycose, an independent COSE implementation, verifies every
attestation with the published key.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import cbor2
import pytest
import pytest_asyncio
from aiohttp import ClientSession, web
from pycose.keys import EC2Key
from pycose.messages import Sign1Message

from gateway.attest.alliance import AllianceSync
from gateway.auth.roles import Role
from gateway.config import AlliancePeer, AllianceSettings
from tests.api.support import assert_problem, runtime
from tests.conftest import ROOT, Gateway, Token, make_settings, start_gateway
from tests.pg import PostgresServer
from tests.risk_support import events_where

pytestmark = pytest.mark.softhsm

ALLIANCE_KEY = secrets.token_hex(32)  # the value both banks received at the key ceremony
SELLER = {"name": "Shanghai Export Co.", "tax_id": "91310000MA1FL8XQ3X"}
BUYER = {"name": "Rotterdam Import B.V.", "tax_id": "NL859412345B01"}


@dataclass
class Bank:
    member_id: str
    gateway: Gateway
    token: Token
    config: Path  # a TOML file for the CLI (same token and store)
    attest_key: dict[str, Any]
    peer_key_file: Path  # the API key of a `peer` client of this bank, for others to pull with

    @property
    def url(self) -> str:
        return str(self.gateway.client.make_url("")).rstrip("/")


def new_token(base: Token, label: str) -> Token:
    subprocess.run([str(ROOT / "softhsm" / "init-token.sh"), str(base.directory), label], check=True,
                   capture_output=True)
    return Token(base.directory, base.conf, label, (base.directory / f"{label}.user-pin").read_text().strip())


def write_config(path: Path, token: Token, dsn: str, member_id: str) -> Path:
    path.write_text(
        f'[hsm]\nprofile = "softhsm"\ntoken_label = "{token.label}"\n'
        f'pin_file = "{token.directory}/{token.label}.user-pin"\n'
        f'workers = 1\n\n[store]\ndsn = "{dsn}"\n\n[audit]\nwitness_file = "{path.parent / "witness.jsonl"}"\n\n'
        f'[alliance]\nmember_id = "{member_id}"\n', encoding="utf-8")
    return path


def cli(config: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args, "--config", str(config)], input=stdin,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})


async def open_bank(base: Token, folder: Path, member_id: str, dsn: str, peers: list[AlliancePeer],
                    sync_interval: float = 0.0) -> Bank:
    token = new_token(base, f"attest-{member_id.lower()}-{secrets.token_hex(3)}")
    folder.mkdir(parents=True, exist_ok=True)
    config = write_config(folder / "gateway.toml", token, dsn, member_id)
    key_file = folder / "alliance.key"
    key_file.write_text(ALLIANCE_KEY + "\n")
    key_file.chmod(0o600)
    imported = await asyncio.to_thread(cli, config, "alliance", "import-key", "--from-file", str(key_file))
    assert imported.returncode == 0, imported.stderr
    settings = make_settings(token, dsn, alliance={"member_id": member_id, "peers": peers,
                                                   "sync_interval_seconds": sync_interval})
    gateway = await start_gateway(settings)
    response = await gateway.client.post("/v1/keys", json={"label": f"attest-{member_id}", "algorithm": "ecdsa-p256",
                                                           "usage": ["attest"]}, headers=gateway.auth(Role.ADMIN))
    assert response.status == 201, await response.text()
    peer_key_file = folder / "peer-api-key"
    peer_key_file.write_text(gateway.headers[Role.PEER]["Authorization"].removeprefix("Bearer "))
    peer_key_file.chmod(0o600)
    return Bank(member_id, gateway, token, config, await response.json(), peer_key_file)


def peer_of(bank: Bank, url: str | None = None, member_id: str | None = None) -> AlliancePeer:
    return AlliancePeer(member_id=member_id or bank.member_id, url=url or bank.url,
                        public_key_pem=bank.attest_key["public_key_pem"], api_key_file=bank.peer_key_file)


@pytest_asyncio.fixture(scope="module")
async def banks(softhsm_token: Token, postgres_server: PostgresServer,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Bank, Bank]]:
    folder = tmp_path_factory.mktemp("alliance")
    bank_a = await open_bank(softhsm_token, folder / "a", "BANK-A", f"sqlite:///{folder / 'a.db'}", [])
    bank_b = await open_bank(softhsm_token, folder / "b", "BANK-B", postgres_server.create_database(),
                             [peer_of(bank_a)])
    yield bank_a, bank_b
    await bank_b.gateway.client.close()
    await bank_a.gateway.client.close()


def document(number: str | None = None, amount: int = 12_345_600, document_type: str = "invoice",
             purpose: str = "finance", **changes: Any) -> dict[str, Any]:
    fields = {"issuer": SELLER, "number": number or f"INV-2026-{secrets.token_hex(4).upper()}",
              "issue_date": "2026-11-30", "amount_minor": amount, "currency": "CNY", "seller": SELLER,
              "buyer": BUYER, "references": ["PO-7781"]}
    fields.update(changes)
    return {"document_type": document_type, "document_sha256": hashlib.sha256(json.dumps(fields).encode()).hexdigest(),
            "fields": fields, "purpose": purpose}


async def attest(bank: Bank, body: dict[str, Any], role: Role = Role.BACKEND) -> tuple[int, dict[str, Any]]:
    response = await bank.gateway.client.post("/v1/attestations", json=body, headers=bank.gateway.auth(role))
    return response.status, await response.json()


async def sync(bank: Bank, peers: list[AlliancePeer] | None = None) -> list[Any]:
    settings = bank.gateway.settings.alliance
    if peers is not None:
        settings = AllianceSettings(member_id=settings.member_id, peers=peers, sync_interval_seconds=0)
    return await AllianceSync(runtime(bank.gateway).database, settings).sync_all()


def pycose_verifies(envelope_b64: str, public_key_pem: str) -> dict[str, Any]:
    """Verify with pycose (independent of the gateway) and return the decoded claims."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_public_key(public_key_pem.encode())
    numbers = key.public_numbers()  # type: ignore[union-attr]
    cose_key = EC2Key(crv="P_256", x=numbers.x.to_bytes(32, "big"), y=numbers.y.to_bytes(32, "big"))
    tagged = cbor2.loads(base64.b64decode(envelope_b64))
    assert isinstance(tagged, cbor2.CBORTag) and tagged.tag == 18
    items = list(tagged.value)  # pycose 1.1 cannot decode cbor2 6 output directly (tuples inside tags)
    items[1] = dict(items[1])
    message = Sign1Message.from_cose_obj(items, True)
    message.key = cose_key
    assert message.verify_signature(), "pycose rejects the signature"
    claims: dict[str, Any] = cbor2.loads(message.payload)
    return claims


async def rows(bank: Bank, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """Rows as committed; on PostgreSQL the audit entries staged so far are chained first."""
    database = runtime(bank.gateway).database
    await runtime(bank.gateway).audit.chain_pending()
    found = await database.read(lambda tx: tx.fetchall(sql, params))
    return [dict(row) for row in found]


# --- the key test ------------------------------------------------------------------------------------


async def test_second_bank_cannot_finance_an_invoice_the_first_financed(banks: tuple[Bank, Bank]) -> None:
    """Double financing of one invoice at two alliance banks: B's finance of X after A financed it is
    refused naming A; B's notice of X is still accepted."""
    bank_a, bank_b = banks
    invoice = document()
    status, financed = await attest(bank_a, invoice)
    assert status == 201, financed
    assert financed["member_id"] == "BANK-A" and financed["purpose"] == "finance"
    assert len(bytes.fromhex(financed["fingerprint"])) == 32
    claims = pycose_verifies(financed["attestation"], bank_a.attest_key["public_key_pem"])
    assert claims["member"] == "BANK-A" and claims["document_sha256"] == bytes.fromhex(invoice["document_sha256"])
    assert claims["fields"]["amount_minor"] == 12_345_600 and claims["type"] == "ecny-trade-attestation"

    # Before the sync B knows nothing: this is the window docs/trade-finance.md describes.
    reports = await sync(bank_b)
    assert [(r.member_id, r.ok, r.stored) for r in reports] == [("BANK-A", True, 1)], reports
    assert await sync(bank_b) == [type(reports[0])("BANK-A", 0, 1, 1)]  # idempotent: nothing new

    # The same invoice, its number written another way: still refused, naming A and the time.
    again = document(number=invoice["fields"]["number"].lower().replace("-", " "))
    response = await bank_b.gateway.client.post("/v1/attestations", json=again,
                                                 headers=bank_b.gateway.auth(Role.TELLER))
    problem = await assert_problem(response, 409, "already-financed")
    assert problem["member"] == "BANK-A" and problem["financed_at"].startswith("20")
    assert "BANK-A" in problem["detail"]

    status, notice = await attest(bank_b, {**again, "purpose": "notice"})
    assert status == 201, notice
    assert notice["member_id"] == "BANK-B" and notice["fingerprint"] is None
    pycose_verifies(notice["attestation"], bank_b.attest_key["public_key_pem"])

    # The hit is on record three times, committed with the refusal: a hit row, an audit entry, a risk signal.
    hits = await rows(bank_b, "SELECT * FROM attestation_hits WHERE fingerprint = ?", (financed["fingerprint"],))
    assert [(h["financed_by"], h["document_type"]) for h in hits] == [("BANK-A", "invoice")]
    audit = await rows(bank_b, "SELECT decision, reasons, result FROM audit_log WHERE action = 'attestations.create' "
                               "AND decision = 'refused'")
    assert len(audit) == 1 and json.loads(audit[0]["reasons"]) == ["already-financed"]
    assert json.loads(audit[0]["result"])["financed_by"] == "BANK-A"
    signals = await rows(bank_b, "SELECT subject, detail FROM risk_outbox WHERE kind = 'attestation.already_financed' "
                                 "UNION ALL SELECT subject, detail FROM risk_signals "
                                 "WHERE kind = 'attestation.already_financed'")  # before or after the monitor moved it
    assert len(signals) == 1 and json.loads(signals[0]["detail"])["financed_by"] == "BANK-A"
    listed = await bank_b.gateway.client.get("/v1/attestations/hits", headers=bank_b.gateway.auth(Role.AUDITOR))
    assert [h["financed_by"] for h in (await listed.json())["hits"]] == ["BANK-A"]


async def test_a_double_financing_that_slipped_through_the_window_is_raised_at_both_banks(
        banks: tuple[Bank, Bank]) -> None:
    """Threat: both banks finance one invoice before either has synced (the window docs/trade-finance.md
    describes). Nothing can refuse it any more, but it must not pass unnoticed: each bank finds the other's
    fingerprint in the next batch, audits it and raises a critical risk event naming the other bank; the
    refused second financing of the first test is a (high) event too."""
    bank_a, bank_b = banks
    await sync(bank_b)  # each is current with the other's feed: what follows is new
    await sync(bank_a, [peer_of(bank_b)])
    invoice = document()
    status_a, at_a = await attest(bank_a, invoice)
    status_b, at_b = await attest(bank_b, invoice)
    assert (status_a, status_b) == (201, 201)  # inside the window both are accepted
    assert at_a["fingerprint"] == at_b["fingerprint"]
    await sync(bank_b)
    await sync(bank_a, [peer_of(bank_b)])  # A pulls B's feed too (in the other test it has no peers)
    for here, there, ours in ((bank_b, "BANK-A", at_b), (bank_a, "BANK-B", at_a)):
        audit = await rows(here, "SELECT decision, reasons, result FROM audit_log WHERE action = "
                                 "'alliance.double_financing' UNION ALL SELECT decision, reasons, result FROM "
                                 "audit_staged WHERE action = 'alliance.double_financing'")
        assert len(audit) == 1 and audit[0]["decision"] == "failed", audit
        result = json.loads(audit[0]["result"])
        assert (result["member_id"], result["attestation_id"]) == (there, ours["attestation_id"])
        found = await events_where(here.gateway, lambda e: e["rule"] == "notable"
                                   and e["evidence"]["kind"] == "attestation.double_financed")
        assert len(found) == 1 and found[0]["severity"] == "critical", found
        assert found[0]["evidence"]["detail"]["member_id"] == there
    # Positive control: syncing again finds nothing new and raises nothing more.
    await sync(bank_b)
    assert len(await events_where(bank_b.gateway, lambda e: e["evidence"].get("kind")
                                  == "attestation.double_financed")) == 1
    # A refused second financing (the first test's hit) is an event as well.
    refused = await events_where(bank_b.gateway, lambda e: e["evidence"].get("kind")
                                 == "attestation.already_financed")
    assert refused and all(e["severity"] == "high" for e in refused)


async def test_a_finance_twice_at_the_same_bank_is_refused(banks: tuple[Bank, Bank]) -> None:
    """Double financing at one bank (a second loan against the same invoice): refused, naming this bank."""
    bank_a, _ = banks
    invoice = document()
    assert (await attest(bank_a, invoice))[0] == 201
    status, problem = await attest(bank_a, invoice, Role.TELLER)
    assert status == 409 and problem["type"].endswith("/already-financed") and problem["member"] == "BANK-A"


@pytest.mark.parametrize("which", [0, 1], ids=["sqlite", "postgresql"])
async def test_concurrent_finances_of_one_document_exactly_one_wins(banks: tuple[Bank, Bank], which: int) -> None:
    """Racing double financing: twelve concurrent finances of one document at one bank → exactly one wins."""
    bank = banks[which]
    invoice = document()
    results = await asyncio.gather(*(attest(bank, invoice) for _ in range(12)))
    statuses = sorted(status for status, _ in results)
    assert statuses == [201] + [409] * 11, results
    fingerprint = next(body["fingerprint"] for status, body in results if status == 201)
    stored = await rows(bank, "SELECT purpose FROM attestations WHERE fingerprint = ?", (fingerprint,))
    assert len(stored) == 1
    assert len(await rows(bank, "SELECT 1 FROM attestation_hits WHERE fingerprint = ?", (fingerprint,))) == 11


# --- the exchange: tampered, foreign and replayed batches -----------------------------------------------


Rewrite = Callable[[bytes, int], Awaitable[bytes]]


async def proxy(target: str, rewrite: Rewrite) -> tuple[web.AppRunner, str]:
    """A fake peer at its own port: forwards the pull to ``target`` and answers with ``rewrite(body, n)``."""
    calls = [0]

    async def handle(request: web.Request) -> web.Response:
        async with ClientSession() as session, session.get(
                target + "/v1/alliance/fingerprints", params=request.query,
                headers={"Authorization": request.headers.get("Authorization", "")}) as answer:
            body = await answer.read()
        calls[0] += 1
        return web.Response(body=await rewrite(body, calls[0]), content_type="application/cbor")

    app = web.Application()
    app.router.add_get("/v1/alliance/fingerprints", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def state_of(bank: Bank, member: str) -> tuple[int, int]:
    peer = await rows(bank, "SELECT feed_cursor FROM alliance_peers WHERE member_id = ?", (member,))
    count = await rows(bank, "SELECT COUNT(*) AS n FROM alliance_fingerprints WHERE member_id = ?", (member,))
    return (int(peer[0]["feed_cursor"]) if peer else 0), int(count[0]["n"])


async def pull_through(bank_b: Bank, peer: AlliancePeer) -> list[Any]:
    """B pulls ``peer`` once; the pull must be refused and store nothing."""
    before = await state_of(bank_b, peer.member_id)
    reports = await sync(bank_b, [peer])
    assert not reports[0].ok and reports[0].code == "alliance-batch-refused", reports
    assert await state_of(bank_b, peer.member_id) == before
    return reports


async def test_tampered_batch_is_refused(banks: tuple[Bank, Bank]) -> None:
    """Tampered fingerprint batch (a fingerprint changed in transit): refused, nothing stored."""
    bank_a, bank_b = banks
    await sync(bank_b)

    async def flip_last_fingerprint_byte(body: bytes, _call: int) -> bytes:
        tagged = cbor2.loads(body)
        protected, unprotected, payload, signature = tagged.value
        claims = cbor2.loads(payload)
        fingerprint = bytearray(claims["entries"][-1][1])
        fingerprint[0] ^= 0x01
        claims["entries"][-1][1] = bytes(fingerprint)
        return cbor2.dumps(cbor2.CBORTag(18, [protected, dict(unprotected), cbor2.dumps(claims, canonical=True),
                                              signature]))

    assert (await attest(bank_a, document()))[0] == 201
    runner, url = await proxy(bank_a.url, flip_last_fingerprint_byte)
    try:
        reports = await pull_through(bank_b, peer_of(bank_a, url))
    finally:
        await runner.cleanup()
    assert "signature does not verify" in reports[0].error
    last = await rows(bank_b, "SELECT last_error FROM alliance_peers WHERE member_id = 'BANK-A'")
    assert "signature" in last[0]["last_error"]
    # The real feed still syncs afterwards: the refusal cost nothing but time.
    assert [r.ok for r in await sync(bank_b)] == [True]


async def test_batch_from_an_unknown_peer_is_refused(banks: tuple[Bank, Bank]) -> None:
    """Batch from an unknown peer: whatever answers at a peer's URL with a batch signed by another key (here
    bank B's own, as member BANK-B) is refused and nothing of it is stored."""
    bank_a, bank_b = banks
    await sync(bank_b)
    assert (await attest(bank_b, document()))[0] == 201  # B's own feed has something to serve

    async def unchanged(body: bytes, _call: int) -> bytes:
        return body

    # The fake peer at A's address forwards to B's feed: B's key signed it, as member BANK-B.
    runner, url = await proxy(bank_b.url, unchanged)
    try:
        reports = await pull_through(bank_b, AlliancePeer(
            member_id="BANK-A", url=url, public_key_pem=bank_a.attest_key["public_key_pem"],
            api_key_file=bank_b.peer_key_file))
    finally:
        await runner.cleanup()
    assert "signature does not verify" in reports[0].error
    # And at verification: A does not know member BANK-B, so B's attestation does not verify at A.
    status, notice = await attest(bank_b, document(purpose="notice"))
    assert status == 201
    response = await bank_a.gateway.client.post("/v1/attestations/verify", json={"attestation": notice["attestation"]},
                                                headers=bank_a.gateway.auth(Role.AUDITOR))
    verdict = await response.json()
    assert response.status == 200 and verdict["valid"] is False and verdict["reason"] == "unknown-member"


async def test_replayed_old_batch_is_refused(banks: tuple[Bank, Bank]) -> None:
    """Replayed old batch (a recorded answer served again to hide later financings): refused by the
    nonce and the cursor, nothing stored."""
    bank_a, bank_b = banks
    await sync(bank_b)
    recorded: list[bytes] = []

    async def replay_first(body: bytes, call: int) -> bytes:
        if call == 1:
            recorded.append(body)
            return body
        return recorded[0]

    runner, url = await proxy(bank_a.url, replay_first)
    try:
        assert (await attest(bank_a, document()))[0] == 201
        first = await sync(bank_b, [peer_of(bank_a, url)])
        assert [r.ok for r in first] == [True]  # the genuine answer, stored
        after_first = await state_of(bank_b, "BANK-A")
        assert (await attest(bank_a, document()))[0] == 201  # A finances something new...
        second = await pull_through(bank_b, peer_of(bank_a, url))  # ...and the proxy replays the old answer
    finally:
        await runner.cleanup()
    assert "replayed" in second[0].error
    assert await state_of(bank_b, "BANK-A") == after_first


async def test_the_feed_is_for_peers_only_and_carries_no_document_data(banks: tuple[Bank, Bank]) -> None:
    """Fingerprint feed read by a non-peer, or read for document data: only `peer` clients read it, and a
    batch holds seqs, fingerprints and times — no number, name, amount or digest."""
    bank_a, _ = banks
    invoice = document(number="CONFIDENTIAL-7788")
    assert (await attest(bank_a, invoice))[0] == 201
    params = {"after": "0", "nonce": secrets.token_hex(16)}
    for role in (Role.BACKEND, Role.AUDITOR, Role.TELLER):
        response = await bank_a.gateway.client.get("/v1/alliance/fingerprints", params=params,
                                                   headers=bank_a.gateway.auth(role))
        await assert_problem(response, 403, "forbidden")
    response = await bank_a.gateway.client.get("/v1/alliance/fingerprints", params=params,
                                               headers=bank_a.gateway.auth(Role.PEER))
    assert response.status == 200 and response.content_type == "application/cbor"
    body = await response.read()
    claims = cbor2.loads(cbor2.loads(body).value[2])
    assert set(claims) == {"v", "type", "member", "after", "nonce", "issued_at", "head", "entries"}
    assert all(len(entry) == 3 and len(entry[1]) == 32 for entry in claims["entries"])
    digest = bytes.fromhex(invoice["document_sha256"])
    for secret in (b"CONFIDENTIAL7788", b"Shanghai", b"91310000MA1FL8XQ3X", digest):
        assert secret not in body
    # A nonce is required: without one a recorded answer could be served as fresh.
    response = await bank_a.gateway.client.get("/v1/alliance/fingerprints", params={"after": "0"},
                                               headers=bank_a.gateway.auth(Role.PEER))
    await assert_problem(response, 400, "validation-failed")


# --- verification ------------------------------------------------------------------------------------


async def test_verify_accepts_own_and_peer_attestations_and_refuses_tampered(banks: tuple[Bank, Bank]) -> None:
    """Forged attestation (claims changed after signing): the verify endpoint says bad-signature; genuine
    ones of this bank and of a configured peer verify, naming the issuer and key."""
    bank_a, bank_b = banks
    status, financed = await attest(bank_a, document())
    assert status == 201
    auditor = bank_b.gateway.auth(Role.AUDITOR)
    verdict = await (await bank_b.gateway.client.post("/v1/attestations/verify",
                                                      json={"attestation": financed["attestation"]},
                                                      headers=auditor)).json()
    assert verdict["valid"] is True and verdict["issuer"] == "BANK-A", verdict
    assert verdict["key"]["public_key_pem"] == bank_a.attest_key["public_key_pem"]
    assert verdict["claims"]["fields"]["number"] == financed["fields"]["number"]
    own = await (await bank_a.gateway.client.post("/v1/attestations/verify",
                                                  json={"attestation": financed["attestation"]},
                                                  headers=bank_a.gateway.auth(Role.TELLER))).json()
    assert own["valid"] is True and own["key"]["kid"] == bank_a.attest_key["key_id"]

    tagged = cbor2.loads(base64.b64decode(financed["attestation"]))
    protected, unprotected, payload, signature = tagged.value
    claims = cbor2.loads(payload)
    claims["fields"]["amount_minor"] *= 10  # an attestation for ten times the amount
    forged = cbor2.dumps(cbor2.CBORTag(18, [protected, dict(unprotected), cbor2.dumps(claims, canonical=True),
                                            signature]))
    verdict = await (await bank_b.gateway.client.post(
        "/v1/attestations/verify", json={"attestation": base64.b64encode(forged).decode()}, headers=auditor)).json()
    assert verdict["valid"] is False and verdict["reason"] == "bad-signature"
    response = await bank_b.gateway.client.post("/v1/attestations/verify", json={"attestation": "bm90IGNvc2U="},
                                                headers=auditor)
    await assert_problem(response, 400, "invalid-cose")


async def test_search_and_read_by_number(banks: tuple[Bank, Bank]) -> None:
    bank_a, _ = banks
    status, made = await attest(bank_a, document(number="LOOKUP-00042", purpose="notice"))
    assert status == 201
    response = await bank_a.gateway.client.get("/v1/attestations", params={"number": "lookup 00042",
                                                                           "issuer_tax_id": SELLER["tax_id"]},
                                               headers=bank_a.gateway.auth(Role.AUDITOR))
    found = (await response.json())["attestations"]
    assert [a["attestation_id"] for a in found] == [made["attestation_id"]]
    response = await bank_a.gateway.client.get(f"/v1/attestations/{made['attestation_id']}",
                                               headers=bank_a.gateway.auth(Role.BACKEND))
    assert await response.json() == made  # the answer built at signing is what the stored row gives
    response = await bank_a.gateway.client.get("/v1/attestations/" + "0" * 32,
                                               headers=bank_a.gateway.auth(Role.BACKEND))
    await assert_problem(response, 404, "attestation-not-found")


# --- bad input -----------------------------------------------------------------------------------------


def _without(body: dict[str, Any], field: str) -> dict[str, Any]:
    fields = dict(body["fields"])
    fields.pop(field)
    return {**body, "fields": fields}


BAD_INPUT: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "digest too short": lambda b: {**b, "document_sha256": b["document_sha256"][:62]},
    "digest too long": lambda b: {**b, "document_sha256": b["document_sha256"] + "00"},
    "digest not hex": lambda b: {**b, "document_sha256": "zz" * 32},
    "unknown type": lambda b: {**b, "document_type": "promissory_note"},
    "unknown purpose": lambda b: {**b, "purpose": "refinance"},
    "float amount": lambda b: {**b, "fields": {**b["fields"], "amount_minor": 12345.0}},
    "string amount": lambda b: {**b, "fields": {**b["fields"], "amount_minor": "12345"}},
    "zero amount": lambda b: {**b, "fields": {**b["fields"], "amount_minor": 0}},
    "missing number": lambda b: _without(b, "number"),
    "missing issuer": lambda b: _without(b, "issuer"),
    "missing fields": lambda b: {k: v for k, v in b.items() if k != "fields"},
    "missing digest": lambda b: {k: v for k, v in b.items() if k != "document_sha256"},
    "unknown field": lambda b: {**b, "fields": {**b["fields"], "discount": 1}},
    "lower-case currency": lambda b: {**b, "fields": {**b["fields"], "currency": "cny"}},
    "future date": lambda b: {**b, "fields": {**b["fields"], "issue_date": "2999-01-01"}},
    "impossible date": lambda b: {**b, "fields": {**b["fields"], "issue_date": "2026-02-30"}},
    "customs number not 18 digits": lambda b: {**b, "document_type": "customs_declaration"},
    "warehouse receipt citing nothing": lambda b: {**b, "document_type": "warehouse_receipt",
                                                   "fields": {**b["fields"], "references": []}},
    "bad tax id": lambda b: {**b, "fields": {**b["fields"], "issuer": {"name": "X", "tax_id": "!!"}}},
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
async def test_bad_input_is_a_problem_and_stores_nothing(banks: tuple[Bank, Bank], case: str) -> None:
    """Malformed attestation request (wrong digest length, unknown type, float amount, missing fields, a
    field against its type's rules): 400 problem+json, nothing stored, no fingerprint computed into the feed."""
    bank_a, _ = banks
    body = BAD_INPUT[case](document(number=f"BAD-{secrets.token_hex(4).upper()}"))
    before = await rows(bank_a, "SELECT COUNT(*) AS n FROM attestations")
    response = await bank_a.gateway.client.post("/v1/attestations", json=body,
                                                headers=bank_a.gateway.auth(Role.BACKEND))
    problem = await assert_problem(response, 400)
    assert problem["type"].rsplit("/", 1)[-1] in {"validation-failed", "invalid-trade-document"}, problem
    assert await rows(bank_a, "SELECT COUNT(*) AS n FROM attestations") == before


# --- the alliance key -------------------------------------------------------------------------------------


async def test_alliance_key_is_sensitive_and_never_recorded(banks: tuple[Bank, Bank]) -> None:
    """Alliance key extraction or leak: the imported HMAC key is sensitive and not extractable in the token,
    and its value appears in no audit entry of either bank."""
    for bank in banks:
        pool = runtime(bank.gateway).signer
        attributes = await pool.secret_attributes(bank.gateway.settings.alliance.hmac_key_label)  # type: ignore[attr-defined]
        assert attributes["sensitive"] is True and attributes["extractable"] is False, attributes
        assert attributes["encrypt"] is False and attributes["wrap"] is False
        entries = await rows(bank, "SELECT action, result FROM audit_log")
        imports = [json.loads(e["result"]) for e in entries if e["action"] == "alliance.import_key"]
        assert imports == [{"label": bank.gateway.settings.alliance.hmac_key_label, "attributes": attributes}], imports
        assert all(ALLIANCE_KEY not in str(e["result"]) for e in entries)


async def test_import_key_refuses_a_readable_file_and_a_second_import(banks: tuple[Bank, Bank],
                                                                       tmp_path: Path) -> None:
    """Alliance key left readable on disk, or replaced by a second ceremony: the CLI refuses both."""
    bank_a, _ = banks
    readable = tmp_path / "alliance.key"
    readable.write_text(ALLIANCE_KEY)
    readable.chmod(0o644)
    result = await asyncio.to_thread(cli, bank_a.config, "alliance", "import-key", "--from-file", str(readable))
    assert result.returncode == 2 and "chmod 600" in result.stderr
    again = await asyncio.to_thread(cli, bank_a.config, "alliance", "import-key", stdin=secrets.token_hex(32) + "\n")
    assert again.returncode == 2 and "exists already" in again.stderr
    short = await asyncio.to_thread(cli, bank_a.config, "alliance", "import-key", "--label", "x",
                                    stdin=secrets.token_hex(8) + "\n")
    assert short.returncode == 2 and "at least 32 bytes" in short.stderr


def peers_toml(peer: AlliancePeer) -> str:
    return (f'\n[[alliance.peers]]\nmember_id = "{peer.member_id}"\nurl = "{peer.url}"\n'
            f"public_key_pem = '''\n{peer.public_key_pem}'''\napi_key_file = \"{peer.api_key_file}\"\n")


async def test_cli_sync_pulls_and_reports_a_refusal(banks: tuple[Bank, Bank], tmp_path: Path) -> None:
    """Peer key swapped in the configuration (a batch signed by a key other than the pinned one): `alliance
    sync` exits 1 naming the refusal; with the right key it stores A's new fingerprints and exits 0."""
    bank_a, bank_b = banks
    assert (await attest(bank_a, document()))[0] == 201
    base = bank_b.config.read_text()
    config = tmp_path / "b.toml"
    wrong = AlliancePeer(member_id="BANK-A", url=bank_a.url, public_key_pem=bank_b.attest_key["public_key_pem"],
                         api_key_file=bank_a.peer_key_file)
    config.write_text(base + peers_toml(wrong))
    refused = await asyncio.to_thread(cli, config, "alliance", "sync")
    assert refused.returncode == 1 and "REFUSED (alliance-batch-refused)" in refused.stdout, refused
    config.write_text(base + peers_toml(peer_of(bank_a)))
    pulled = await asyncio.to_thread(cli, config, "alliance", "sync", "--peer", "BANK-A")
    assert pulled.returncode == 0 and "BANK-A:" in pulled.stdout and "; ok" in pulled.stdout, pulled
    cursor, stored = await state_of(bank_b, "BANK-A")
    head = (await rows(bank_a, "SELECT MAX(publication_seq) AS n FROM attestations"))[0]["n"]
    assert cursor == stored == head
    status = await bank_b.gateway.client.get("/v1/alliance/status", headers=bank_b.gateway.auth(Role.AUDITOR))
    document_ = await status.json()
    assert document_["peers"][0]["cursor"] == head and document_["peers"][0]["lag_seconds"] is not None


async def test_scheduled_pull_keeps_a_third_bank_current(banks: tuple[Bank, Bank], softhsm_token: Token,
                                                         tmp_path: Path) -> None:
    """Stale alliance copy (a bank that only syncs by hand): with `sync_interval_seconds` set, the gateway
    pulls its peers by itself, refuses the second financing without any command, and reports its lag."""
    bank_a, _ = banks
    status, financed = await attest(bank_a, document())
    assert status == 201
    bank_c = await open_bank(softhsm_token, tmp_path / "c", "BANK-C", f"sqlite:///{tmp_path / 'c.db'}",
                             [peer_of(bank_a)], sync_interval=0.2)
    try:
        head = (await rows(bank_a, "SELECT MAX(publication_seq) AS n FROM attestations"))[0]["n"]
        for _ in range(100):
            if (await state_of(bank_c, "BANK-A"))[0] >= head:
                break
            await asyncio.sleep(0.1)
        assert (await state_of(bank_c, "BANK-A"))[0] >= head
        status, problem = await attest(bank_c, {**document(), "fields": financed["fields"],
                                                "document_sha256": financed["document_sha256"]})
        assert status == 409 and problem["member"] == "BANK-A", problem
        metrics = await bank_c.gateway.client.get("/metrics", headers=bank_c.gateway.auth(Role.AUDITOR))
        text = await metrics.text()
        assert 'ecny_alliance_sync_lag_seconds{member="BANK-A"}' in text
        assert 'ecny_alliance_batches_total{member="BANK-A",outcome="accepted"}' in text
    finally:
        await bank_c.gateway.client.close()


async def test_a_finance_recorded_before_a_crash_is_signed_on_read_and_never_financed_twice(
        banks: tuple[Bank, Bank]) -> None:
    """Crash between commit and signing: the finance is recorded (and published) before the HSM is asked; the
    attestation is signed when it is read, and the document cannot be financed again meanwhile."""
    from gateway.attest.attestations import AttestationRequest, Attestations
    from gateway.attest.documents import DocumentType, Party, Purpose, normalise
    from gateway.audit.chain import AuditEntry
    from gateway.errors import HsmUnavailable

    bank_a, _ = banks
    live = runtime(bank_a.gateway)

    class HsmDown:
        async def sign(self, key_id: str, algorithm: str, data: bytes) -> bytes:
            raise HsmUnavailable("the HSM went away after commit")

    flow = Attestations(live.database, HsmDown(), live.signer, live.profile,  # type: ignore[arg-type]
                        bank_a.gateway.settings.alliance, live.keys)
    number = f"CRASH{secrets.token_hex(4).upper()}"
    fields = normalise(DocumentType.INVOICE, Party(SELLER["name"], SELLER["tax_id"]), number, "2026-11-30", 777,
                       "CNY", Party(SELLER["name"], SELLER["tax_id"]), Party(BUYER["name"], BUYER["tax_id"]), [],
                       date(2026, 12, 5))
    with pytest.raises(HsmUnavailable):
        await flow.attest(None, AttestationRequest(DocumentType.INVOICE, Purpose.FINANCE, bytes(32), fields),
                          AuditEntry("test", "backend", "attestations.create", "allowed"))
    unsigned = await rows(bank_a, "SELECT attestation_id, envelope FROM attestations WHERE document_number = ?",
                          (number,))
    assert len(unsigned) == 1 and unsigned[0]["envelope"] is None
    status, problem = await attest(bank_a, document(number=number, amount=777))
    assert status == 409 and problem["member"] == "BANK-A"
    response = await bank_a.gateway.client.get(f"/v1/attestations/{unsigned[0]['attestation_id']}",
                                               headers=bank_a.gateway.auth(Role.AUDITOR))
    signed = await response.json()
    assert response.status == 200 and signed["status"] == "signed", signed
    claims = pycose_verifies(signed["attestation"], bank_a.attest_key["public_key_pem"])
    assert claims["fields"]["number"] == number


async def test_idempotent_replay_returns_the_same_attestation(banks: tuple[Bank, Bank]) -> None:
    """A retried finance (same Idempotency-Key) is the first answer again, not a 409 against itself."""
    bank_a, _ = banks
    body = document()
    headers = bank_a.gateway.auth(Role.BACKEND) | {"Idempotency-Key": f"attest-{secrets.token_hex(8)}"}
    first = await bank_a.gateway.client.post("/v1/attestations", json=body, headers=headers)
    again = await bank_a.gateway.client.post("/v1/attestations", json=body, headers=headers)
    assert first.status == again.status == 201
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert (await first.json())["attestation"] == (await again.json())["attestation"]


async def test_rotated_attest_key_old_attestations_verify_and_peers_must_be_told(banks: tuple[Bank, Bank]) -> None:
    """Attest key rotated without telling the alliance: attestations signed before still verify at home, new
    ones carry the new kid, and a peer still pinning the old key refuses the new batches (never trusts a key it
    was not given). Runs last in this module: it changes bank A's key."""
    bank_a, bank_b = banks
    status, before = await attest(bank_a, document())
    assert status == 201
    response = await bank_a.gateway.client.post(f"/v1/keys/{bank_a.attest_key['key_id']}/rotate",
                                                headers=bank_a.gateway.auth(Role.ADMIN))
    assert response.status in (200, 201), await response.text()
    rotated = await response.json()
    status, after = await attest(bank_a, document())
    assert status == 201 and after["kid"] == rotated["key_id"] != before["kid"]
    pycose_verifies(after["attestation"], rotated["public_key_pem"])
    verdict = await (await bank_a.gateway.client.post("/v1/attestations/verify",
                                                      json={"attestation": before["attestation"]},
                                                      headers=bank_a.gateway.auth(Role.AUDITOR))).json()
    assert verdict["valid"] is True and verdict["key"]["kid"] == before["kid"], verdict
    reports = await sync(bank_b)
    assert not reports[0].ok and "signature does not verify" in reports[0].error
    told = await sync(bank_b, [AlliancePeer(member_id="BANK-A", url=bank_a.url,
                                            public_key_pem=rotated["public_key_pem"],
                                            api_key_file=bank_a.peer_key_file)])
    assert told[0].ok, told


@pytest.mark.parametrize("limit", ["²", "9" * 5000, "-1", "1001", "1.5", "0x10", " 5"],
                         ids=["superscript", "5000-digits", "negative", "over", "decimal", "hex", "space"])
async def test_a_malformed_count_in_a_query_is_validation_failed_never_a_500(banks: tuple[Bank, Bank],
                                                                             limit: str) -> None:
    """A superscript digit passes str.isdigit() and a 5,000-digit number passes it too, but int() refuses
    both: the search, the hits and a peer's fingerprint feed answer 400 with the stable type, never the 500
    of an unhandled ValueError."""
    bank_a, _ = banks
    nonce = secrets.token_hex(16)
    for path, params, role in (
        ("/v1/attestations", {"number": "LOOKUP-00042", "limit": limit}, Role.AUDITOR),
        ("/v1/attestations/hits", {"limit": limit}, Role.AUDITOR),
        ("/v1/alliance/fingerprints", {"after": limit if limit != "1001" else str(10**18 + 1), "nonce": nonce},
         Role.PEER),
        ("/v1/alliance/fingerprints", {"after": "0", "limit": limit if limit != "1001" else "10001", "nonce": nonce},
         Role.PEER),
    ):
        response = await bank_a.gateway.client.get(path, params=params, headers=bank_a.gateway.auth(role))
        await assert_problem(response, 400, "validation-failed")


async def test_the_search_limit_caps_the_answer(banks: tuple[Bank, Bank]) -> None:
    """Positive control for the limit: two attestations of one number, ``limit=1`` answers one of them."""
    bank_a, _ = banks
    for purpose in ("finance", "notice"):
        status, _ = await attest(bank_a, document(number="LIMITED-00007", purpose=purpose))
        assert status == 201
    auditor = bank_a.gateway.auth(Role.AUDITOR)
    for limit, expected in (("1", 1), ("1000", 2)):
        response = await bank_a.gateway.client.get("/v1/attestations", params={"number": "LIMITED-00007",
                                                                               "limit": limit}, headers=auditor)
        assert response.status == 200, await response.text()
        assert len((await response.json())["attestations"]) == expected
