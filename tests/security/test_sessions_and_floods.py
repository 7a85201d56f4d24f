"""Sessions that can be ended, and floods that cannot make the gateway work or write for free
(issue 14, items 7 and 8), against real gateways on SQLite and PostgreSQL.

Sessions: a logout, a disabled user, an ended session or a role change holds from the very next
request, in every instance on the store (sessions are checked against the store, never cached).
Floods: a bounded number of password checks at once, a per-address login limiter, anonymous
refusals counted into one audit entry per window and cause, and a per-principal rate limit on by
default.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from argon2 import PasswordHasher

from gateway import cli
from gateway.api.endpoints import RATE_LIMITER
from gateway.app import make_app
from gateway.auth.credentials import add_user
from gateway.auth.roles import Role
from gateway.config import Settings
from gateway.ledger.engines import open_database
from tests.api.support import assert_problem, audit_entries, audit_head, runtime
from tests.conftest import PASSWORDS, Gateway, Token, make_settings, provision, start_gateway
from tests.pg import PostgresServer

pytestmark = pytest.mark.softhsm

THRESHOLD = 1_000  # fen: transfers above it wait for a supervisor (small, so tests need little money)
ADMIN_ENDPOINTS = [("POST", "/v1/users/{}/disable", None), ("POST", "/v1/users/{}/enable", None),
                   ("POST", "/v1/users/{}/role", {"role": "supervisor"}), ("DELETE", "/v1/users/{}/sessions", None)]


@pytest_asyncio.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def gw(request: pytest.FixtureRequest, softhsm_token: Token,
             tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    """A gateway per store with the shipped credential cache (2 s) and an `ecny` key."""
    if request.param == "sqlite":
        dsn = f"sqlite:///{tmp_path_factory.mktemp('sessions') / 'gateway.db'}"
    else:
        server: PostgresServer = request.getfixturevalue("postgres_server")
        dsn = server.create_database()
    started = await start_gateway(make_settings(
        softhsm_token, dsn, auth={"credential_cache_seconds": 2.0},
        approvals={"transfer_threshold_fen": THRESHOLD}))
    for label, usage in ((f"ecny-sessions-{request.param}", "ecny"), (f"audit-sessions-{request.param}", "audit")):
        response = await started.client.post("/v1/keys", json={"label": label, "algorithm": "ecdsa-p256",
                                                               "usage": [usage]}, headers=started.auth(Role.ADMIN))
        assert response.status == 201, await response.text()
    yield started
    await started.client.close()


async def new_user(gw: Gateway, role: Role) -> tuple[str, str]:
    username, password = f"{role.value}-{secrets.token_hex(4)}", f"pw-{secrets.token_hex(8)}"
    await runtime(gw).database.write(lambda tx: add_user(tx, PasswordHasher(), username, role, password))
    return username, password


async def login(client: TestClient[Any, Any], username: str, password: str) -> dict[str, str]:
    response = await client.post("/v1/sessions", json={"username": username, "password": password})
    assert response.status == 201, await response.text()
    return {"Authorization": f"Bearer {(await response.json())['token']}"}


async def status_of(client: TestClient[Any, Any], headers: dict[str, str], path: str = "/v1/keys") -> int:
    response = await client.get(path, headers=headers)
    return response.status


async def second_instance(gw: Gateway) -> TestClient[Any, Any]:
    """Another gateway instance on the same store (its own process state, its own credential cache)."""
    settings = gw.settings.model_copy(deep=True)
    settings.hsm.workers = 1
    client: TestClient[Any, Any] = TestClient(TestServer(make_app(settings)))
    await client.start_server()
    return client


# --- sessions ------------------------------------------------------------------------------------


async def test_logout_ends_the_session_at_once_in_every_instance(gw: Gateway) -> None:
    """A session token outlives its logout (in a cache, or in another instance)."""
    username, password = await new_user(gw, Role.TELLER)
    other = await second_instance(gw)
    try:
        session = await login(gw.client, username, password)
        assert await status_of(gw.client, session) == 200
        assert await status_of(other, session) == 200  # the other instance has seen (and could cache) it
        response = await gw.client.delete("/v1/sessions", headers=session)
        assert response.status == 200, await response.text()
        assert await response.json() == {"username": username, "ended": True}
        for client in (gw.client, other):  # at once, well inside the 2 s credential cache
            await assert_problem(await client.get("/v1/keys", headers=session), 401, "unauthenticated")
        await assert_problem(await other.delete("/v1/sessions", headers=session), 401, "unauthenticated")
        # Positive control: the same user logs in again and works, on either instance.
        again = await login(other, username, password)
        assert await status_of(gw.client, again) == 200
    finally:
        await other.close()
    ends = [e for e in await audit_entries(gw) if e["action"] == "sessions.end" and e["actor"] == f"user:{username}"]
    assert [e["result"] for e in ends] == [{"username": username, "ended": True}]


async def test_an_api_key_cannot_be_logged_out_as_if_it_were_a_session(gw: Gateway) -> None:
    """A client believes DELETE /v1/sessions revoked its API key when it did nothing."""
    await assert_problem(await gw.client.delete("/v1/sessions", headers=gw.auth(Role.ADMIN)), 403, "not-a-session")
    await assert_problem(await gw.client.delete("/v1/sessions", headers=gw.auth(Role.BACKEND)), 403, "forbidden")
    assert await status_of(gw.client, gw.auth(Role.ADMIN)) == 200  # and the key still works
    await assert_problem(await gw.client.delete("/v1/sessions"), 401, "unauthenticated")


async def test_disabling_a_user_kills_their_live_session_and_their_logins(
        gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dismissed employee keeps working through a live session, or logs in again."""
    username, password = await new_user(gw, Role.SUPERVISOR)
    session, second = await login(gw.client, username, password), await login(gw.client, username, password)
    assert await status_of(gw.client, session) == 200
    response = await gw.client.post(f"/v1/users/{username}/disable", headers=gw.auth(Role.ADMIN))
    assert response.status == 200, await response.text()
    document = await response.json()
    assert document["disabled_at"] and document["sessions_ended"] == 2 and document["live_sessions"] == 0
    for headers in (session, second):
        await assert_problem(await gw.client.get("/v1/keys", headers=headers), 401, "unauthenticated")
    # The right password of a disabled user gets exactly what a wrong password gets, at the same
    # cost (one argon2 check each, counted on the real verifier): no oracle.
    authenticator = runtime(gw).authenticator
    checks: list[bool] = []
    verify = authenticator._verify

    def counted(stored: str, given: str) -> bool:
        checks.append(verify(stored, given))
        return checks[-1]

    monkeypatch.setattr(authenticator, "_verify", counted)
    refused = await gw.client.post("/v1/sessions", json={"username": username, "password": password})
    wrong = await gw.client.post("/v1/sessions", json={"username": username, "password": password + "x"})
    unknown = await gw.client.post("/v1/sessions", json={"username": f"nobody-{secrets.token_hex(3)}",
                                                         "password": password})
    bodies = [await assert_problem(r, 401, "unauthenticated") for r in (refused, wrong, unknown)]
    assert len({(b["title"], b["detail"]) for b in bodies}) == 1
    assert checks == [True, False, False]  # the disabled user's password was checked, and was right
    monkeypatch.undo()
    # Positive control: an administrator enables the user again, and they log in and work.
    response = await gw.client.post(f"/v1/users/{username}/enable", headers=gw.auth(Role.ADMIN))
    assert response.status == 200 and (await response.json())["disabled_at"] is None
    assert await status_of(gw.client, await login(gw.client, username, password)) == 200
    actions = [e["action"] for e in await audit_entries(gw) if e["result"].get("username") == username
               and e["action"].startswith("users.")]
    assert actions == ["users.disable", "users.enable"]


async def _pending_approval(gw: Gateway) -> dict[str, Any]:
    """A transfer above the threshold, requested by the backend client: pending a supervisor."""
    wallets = []
    for funded in (THRESHOLD * 3, 0):
        response = await gw.client.post("/v1/wallets", headers=gw.auth(Role.TELLER), json={
            "holder_name": "Li Lei", "phone": "13800138000", "tier": 1, "kind": "personal"})
        assert response.status == 201, await response.text()
        wallet_id = (await response.json())["wallet_id"]
        if funded:
            response = await gw.client.post(f"/v1/wallets/{wallet_id}/cash-in", json={"amount_fen": funded},
                                            headers=gw.auth(Role.TELLER) | {"Idempotency-Key": secrets.token_hex(8)})
            assert response.status in (200, 201), await response.text()
        wallets.append(wallet_id)
    response = await gw.client.post("/v1/transfers", json={
        "from_wallet": wallets[0], "to_wallet": wallets[1], "amount_fen": THRESHOLD + 1},
        headers=gw.auth(Role.BACKEND) | {"Idempotency-Key": secrets.token_hex(8)})
    assert response.status == 202, await response.text()
    response = await gw.client.get(f"/v1/approvals/{(await response.json())['approval_id']}",
                                   headers=gw.auth(Role.SUPERVISOR))
    assert response.status == 200, await response.text()
    approval: dict[str, Any] = await response.json()
    return approval


async def _approve(gw: Gateway, approval: dict[str, Any], headers: dict[str, str]) -> Any:
    return await gw.client.post(f"/v1/approvals/{approval['approval_id']}/approve", headers=headers,
                                json={"payload_hash": approval["payload_hash"], "note": "checked"})


async def test_a_role_change_applies_to_the_live_session_at_once(gw: Gateway) -> None:
    """A demoted supervisor keeps approving with their session for hours after the role change."""
    username, password = await new_user(gw, Role.SUPERVISOR)
    session = await login(gw.client, username, password)
    first, second = await _pending_approval(gw), await _pending_approval(gw)
    response = await _approve(gw, first, session)  # positive control: a supervisor decides
    assert response.status == 200, await response.text()
    response = await gw.client.post(f"/v1/users/{username}/role", json={"role": "teller"},
                                    headers=gw.auth(Role.ADMIN))
    assert response.status == 200, await response.text()
    assert (await response.json())["role"] == "teller"
    problem = await assert_problem(await _approve(gw, second, session), 403, "forbidden")
    assert "approvals.decide" in problem["detail"]
    assert await status_of(gw.client, session, "/v1/wallets?q=Li") == 200  # still a teller's session
    entry = next(e for e in reversed(await audit_entries(gw)) if e["action"] == "users.set_role")
    assert entry["result"] == {"username": username, "previous_role": "supervisor", "role": "teller"}


async def test_the_cli_disables_ends_sessions_and_changes_roles_at_once(gw: Gateway, tmp_path: Path) -> None:
    """An administrator's command takes effect only after the sessions expire (up to 8 h)."""
    config = tmp_path / "gateway.toml"
    config.write_text(f'[store]\ndsn = "{gw.settings.store.dsn}"\n')
    username, password = await new_user(gw, Role.SUPERVISOR)
    session = await login(gw.client, username, password)
    approval = await _pending_approval(gw)

    async def run(*argv: str) -> int:
        return await asyncio.to_thread(cli.main, [*argv, "--config", str(config)])

    assert await run("users", "set-role", username, "teller") == 0
    await assert_problem(await _approve(gw, approval, session), 403, "forbidden")
    assert await run("sessions", "end", "--user", username) == 0
    await assert_problem(await gw.client.get("/v1/keys", headers=session), 401, "unauthenticated")
    session = await login(gw.client, username, password)
    assert await run("users", "disable", username) == 0
    await assert_problem(await gw.client.get("/v1/keys", headers=session), 401, "unauthenticated")
    assert (await gw.client.post("/v1/sessions", json={"username": username, "password": password})).status == 401
    assert await run("users", "enable", username) == 0  # positive control
    assert await status_of(gw.client, await login(gw.client, username, password)) == 200
    assert await run("users", "disable", "nobody-at-all") == cli.EXIT_ERROR
    actions = [(e["action"], e["actor"].split(":")[0]) for e in await audit_entries(gw)
               if e["result"].get("username") == username and e["action"].startswith("users.")]
    assert actions == [("users.set_role", "cli"), ("users.end_sessions", "cli"), ("users.disable", "cli"),
                       ("users.enable", "cli")]


async def test_only_an_administrator_administers_users_and_not_their_own_account(gw: Gateway) -> None:
    """A teller or supervisor disables a colleague or raises their own role; an admin raises their own."""
    target, target_password = await new_user(gw, Role.TELLER)
    target_session = await login(gw.client, target, target_password)
    callers = {role: gw.auth(role) for role in (Role.BACKEND, Role.TELLER, Role.SUPERVISOR, Role.AUDITOR)}
    callers[Role.TELLER] = target_session  # the target itself, trying to raise its own role
    for headers in callers.values():
        for method, path, body in ADMIN_ENDPOINTS:
            response = await gw.client.request(method, path.format(target), json=body, headers=headers)
            await assert_problem(response, 403, "forbidden")
    for method, path, body in ADMIN_ENDPOINTS:
        await assert_problem(await gw.client.request(method, path.format(target), json=body), 401)
    assert await status_of(gw.client, target_session) == 200  # nothing happened to the target
    # An administrator logged in as a user cannot change their own account ...
    admin, admin_password = await new_user(gw, Role.ADMIN)
    admin_session = await login(gw.client, admin, admin_password)
    for path, body in ((f"/v1/users/{admin}/role", {"role": "supervisor"}), (f"/v1/users/{admin}/disable", None)):
        await assert_problem(await gw.client.post(path, json=body, headers=admin_session), 403, "self-administration")
    # ... but administers others (positive control), and a made-up role or user is refused cleanly.
    response = await gw.client.post(f"/v1/users/{target}/role", json={"role": "auditor"}, headers=admin_session)
    assert response.status == 200, await response.text()
    for role in ("backend", "root"):
        await assert_problem(await gw.client.post(f"/v1/users/{target}/role", json={"role": role},
                                                  headers=admin_session), 400)
    await assert_problem(await gw.client.post("/v1/users/nobody-at-all/disable", headers=admin_session), 404,
                         "user-not-found")
    response = await gw.client.delete(f"/v1/users/{target}/sessions", headers=admin_session)
    assert response.status == 200 and (await response.json())["sessions_ended"] == 1
    await assert_problem(await gw.client.get("/v1/keys", headers=target_session), 401, "unauthenticated")


# --- floods ----------------------------------------------------------------------------------------


async def test_anonymous_refusals_are_counted_into_a_few_audit_entries(gw: Gateway) -> None:
    """An anonymous flood writes one audit row (a store write) per request."""
    refusals = runtime(gw).refusals
    await refusals.flush()
    head = await audit_head(gw)
    credentials = [{}, {"Authorization": "Bearer ecnys_" + "B" * 43},
                   {"Authorization": "Bearer ecny_000000000000_" + "A" * 43}, {"Authorization": "Basic eDp5"}]
    paths = ["/v1/keys", "/v1/wallets?q=x", "/v1/audit", "/v1/approvals"]
    for i in range(200):
        response = await gw.client.get(paths[i % 4], headers=credentials[(i // 4) % 4])
        assert response.status == 401
    assert refusals.pending == 200
    assert await audit_head(gw) == head  # nothing written yet: a flood costs no store write
    await refusals.flush()
    entries = await audit_entries(gw, head)
    assert len(entries) == 1, entries  # one window, one cause
    (entry,) = entries
    assert (entry["action"], entry["actor"], entry["decision"], entry["reasons"]) == (
        "refusals.anonymous", "anonymous", "refused", ["unauthenticated"])
    assert entry["result"]["count"] == 200
    assert sum(entry["result"]["actions"].values()) == 200 and len(entry["result"]["actions"]) == 4


async def test_counted_refusals_are_written_at_shutdown(softhsm_token: Token, tmp_path: Path) -> None:
    """Refusals counted since the last window vanish when the gateway stops."""
    dsn = f"sqlite:///{tmp_path / 'gateway.db'}"
    started = await start_gateway(make_settings(softhsm_token, dsn))
    for _ in range(7):
        assert (await started.client.get("/v1/keys")).status == 401
    await started.client.post("/v1/sessions", json={"username": "teller1", "password": "wrong-password"})
    await started.client.close()  # runs the application's cleanup
    database = await open_database(dsn)
    try:
        rows = await database.read(lambda tx: tx.fetchall(
            "SELECT reasons, result FROM audit_log WHERE action = 'refusals.anonymous' ORDER BY seq"))
    finally:
        await database.close()
    counted = {row["reasons"]: row["result"] for row in rows}
    assert set(counted) == {'["bad-credentials"]', '["unauthenticated"]'}
    assert '"count":7' in counted['["unauthenticated"]'] and '"teller1":1' in counted['["bad-credentials"]']


@pytest_asyncio.fixture(scope="module")
async def flood_gw(softhsm_token: Token, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    """A gateway with one password check at a time and one login waiting."""
    dsn = f"sqlite:///{tmp_path_factory.mktemp('floods') / 'gateway.db'}"
    started = await start_gateway(make_settings(softhsm_token, dsn, auth={
        "password_checks_max": 1, "password_checks_waiting_max": 1, "login_rate_per_second": 0.0}))
    yield started
    await started.client.close()


async def _throttle_rows(gw: Gateway, usernames: list[str]) -> int:
    marks = ", ".join("?" * len(usernames))
    row = await runtime(gw).database.read(lambda tx: tx.fetchone(
        f"SELECT COUNT(*) AS n FROM login_throttle WHERE username IN ({marks})", tuple(usernames)))
    assert row is not None
    return int(row["n"])


async def test_a_login_flood_runs_few_password_checks_and_writes_almost_nothing(flood_gw: Gateway) -> None:
    """A login flood runs a 64 MiB argon2 check, a store write and an audit row per attempt."""
    gw = flood_gw
    refusals = runtime(gw).refusals
    await refusals.flush()
    head = await audit_head(gw)
    usernames = [f"flood-{secrets.token_hex(4)}" for _ in range(50)]
    responses = await asyncio.gather(*(gw.client.post("/v1/sessions", json={"username": name, "password": "guess-1"})
                                       for name in usernames))
    statuses = [response.status for response in responses]
    busy = [response for response in responses if response.status == 503]
    assert busy and 401 in statuses and set(statuses) == {401, 503}, statuses
    for response in busy:
        await assert_problem(response, 503, "login-busy")
        assert response.headers["Retry-After"].isdigit()
    # Only the logins let through were counted against their username (one store write each).
    assert await _throttle_rows(gw, usernames) == statuses.count(401)
    assert await audit_head(gw) == head
    await refusals.flush()
    entries = await audit_entries(gw, head)
    assert sorted(e["reasons"][0] for e in entries) == ["bad-credentials", "login-busy"]
    assert sum(e["result"]["count"] for e in entries) == 50
    # Positive control: once the flood is over, a person logs in.
    assert (await gw.client.post("/v1/sessions", json={"username": "teller1",
                                                       "password": gw.passwords["teller1"]})).status == 201


async def test_logins_from_one_address_are_rate_limited_before_any_work(
        softhsm_token: Token, tmp_path: Path) -> None:
    """One address tries passwords (over many usernames) as fast as the gateway answers."""
    settings = make_settings(softhsm_token, f"sqlite:///{tmp_path / 'gateway.db'}", auth={"login_rate_per_second": 0.2})
    await provision(settings.store.dsn)
    client: TestClient[Any, Any] = TestClient(TestServer(make_app(settings)))
    await client.start_server()
    gw = Gateway(client, settings, {}, PASSWORDS)
    try:
        usernames = [f"spray-{secrets.token_hex(4)}" for _ in range(10)]
        statuses = []
        for name in usernames:
            response = await gw.client.post("/v1/sessions", json={"username": name, "password": "guess-1"})
            statuses.append(response.status)
            if response.status == 429:
                await assert_problem(response, 429, "login-rate-limited")
                assert response.headers["Retry-After"].isdigit()
        # burst 1, then one token per 5 s: the refused ones answer at once, so a loaded machine that takes
        # a second or two over the lot still sees every attempt after the first refused
        assert statuses[0] == 401 and statuses.count(429) >= 8, statuses
        assert await _throttle_rows(gw, usernames) == statuses.count(401)  # refused ones wrote nothing
        await asyncio.sleep(5.2)  # positive control: the bucket refills
        assert (await gw.client.post("/v1/sessions", json={"username": "teller1",
                                                           "password": gw.passwords["teller1"]})).status == 201
    finally:
        await gw.client.close()


async def test_the_rate_limit_is_on_by_default() -> None:
    """One runaway client takes every signature the HSM can make (no per-principal limit by default)."""
    default = Settings()
    assert default.server.rate_limit_per_second >= 1_000  # above what one backend client may need
    app = make_app(default)
    assert app[RATE_LIMITER].rate == default.server.rate_limit_per_second
    limiter = app[RATE_LIMITER]
    started = time.monotonic()
    allowed = [limiter.allow("client:runaway") for _ in range(int(limiter.burst) + 500)]
    refilled = (time.monotonic() - started) * limiter.rate
    assert allowed.count(False) > 0
    assert allowed.count(True) <= limiter.burst + refilled + 1  # a burst of 2 s worth, then the rate
    assert limiter.allow("client:another")  # other principals keep their own bucket
