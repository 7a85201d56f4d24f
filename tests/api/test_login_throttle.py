"""Failed-login throttling per username (gateway/auth/throttle.py), against a real gateway on
SQLite and on PostgreSQL: the limit holds under concurrent guesses, a locked username is refused
without its password being checked (even the right one), the lockout ends and then doubles, a
success forgets the count, unknown usernames are treated like known ones, and every refusal is
counted in the audit log (one entry per window and cause, naming the usernames: gateway/audit/refusals.py)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
import pytest_asyncio
from argon2 import PasswordHasher

from gateway import clock
from gateway.auth.credentials import add_user
from gateway.auth.roles import Role
from gateway.auth.throttle import LoginThrottle
from tests.api.support import assert_problem, audit_entries, audit_head, runtime
from tests.conftest import Gateway

pytestmark = pytest.mark.softhsm

LIMIT = 5  # the shipped default of [auth] login_max_attempts
PASSWORD = "the-right-password-1"


@pytest_asyncio.fixture(scope="module")
async def gw(ledger_gateway: Gateway) -> AsyncIterator[Gateway]:
    yield ledger_gateway


async def new_teller(gw: Gateway) -> str:
    username = f"throttle-{secrets.token_hex(4)}"
    await runtime(gw).database.write(lambda tx: add_user(tx, PasswordHasher(), username, Role.TELLER, PASSWORD))
    return username


async def attempt(gw: Gateway, username: str, password: str) -> tuple[int, dict[str, str], dict[str, object]]:
    response = await gw.client.post("/v1/sessions", json={"username": username, "password": password})
    return response.status, dict(response.headers), await response.json()


async def unlock_early(gw: Gateway, username: str) -> None:
    """Move the lock's end into the past, as if the lockout had been waited out."""
    past = clock.iso(clock.now() - timedelta(seconds=1))
    changed = await runtime(gw).database.write(lambda tx: tx.execute(
        "UPDATE login_throttle SET locked_until = ? WHERE username = ?", (past, username)))
    assert changed == 1


def test_lockout_doubles_up_to_the_maximum() -> None:
    throttle = LoginThrottle(max_attempts=5, lockout_seconds=30, lockout_max_seconds=900)
    assert [throttle.lockout(n) for n in range(1, 11)] == [0, 0, 0, 0, 30, 60, 120, 240, 480, 900]
    assert throttle.lockout(10_000) == 900


async def test_the_limit_holds_and_a_locked_username_is_refused_even_with_its_password(gw: Gateway) -> None:
    username = await new_teller(gw)
    await runtime(gw).refusals.flush()  # what earlier tests counted is written before `head`
    head = await audit_head(gw)
    for _ in range(LIMIT):
        status, _, problem = await attempt(gw, username, "a-wrong-password")
        assert status == 401, problem
    status, headers, problem = await attempt(gw, username, PASSWORD)
    assert status == 429, problem
    assert str(problem["type"]).endswith("/login-throttled")
    assert 1 <= int(headers["Retry-After"]) <= 30
    await runtime(gw).refusals.flush()
    entries = [e for e in await audit_entries(gw, head) if e["action"] == "refusals.anonymous"]
    counted = {cause: sum(e["result"]["usernames"].get(username, 0) for e in entries if e["reasons"] == [cause])
               for cause in ("bad-credentials", "login-throttled")}
    assert counted == {"bad-credentials": LIMIT, "login-throttled": 1}
    assert all(e["decision"] == "refused" and e["result"]["actions"] == {"sessions.create": e["result"]["count"]}
               and PASSWORD not in str(e) for e in entries)


async def test_concurrent_guesses_cannot_pass_the_limit(gw: Gateway) -> None:
    username = await new_teller(gw)
    results = await asyncio.gather(*(attempt(gw, username, f"guess-{i}") for i in range(20)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [401] * LIMIT + [429] * (20 - LIMIT)


async def test_after_the_lockout_one_attempt_is_checked_and_the_next_lockout_is_longer(gw: Gateway) -> None:
    username = await new_teller(gw)
    for _ in range(LIMIT):
        await attempt(gw, username, "a-wrong-password")
    await unlock_early(gw, username)
    status, _, _ = await attempt(gw, username, "still-wrong")
    assert status == 401  # checked: the lock had ended
    status, headers, _ = await attempt(gw, username, PASSWORD)
    assert status == 429
    assert 30 < int(headers["Retry-After"]) <= 60  # doubled
    await unlock_early(gw, username)
    status, _, document = await attempt(gw, username, PASSWORD)
    assert status == 201, document  # the right password once the lock ends


async def test_a_success_forgets_the_count(gw: Gateway) -> None:
    username = await new_teller(gw)
    for _ in range(LIMIT - 1):
        assert (await attempt(gw, username, "a-wrong-password"))[0] == 401
    assert (await attempt(gw, username, PASSWORD))[0] == 201
    for _ in range(LIMIT - 1):
        assert (await attempt(gw, username, "a-wrong-password"))[0] == 401
    assert (await attempt(gw, username, PASSWORD))[0] == 201


async def test_unknown_usernames_are_throttled_like_known_ones(gw: Gateway) -> None:
    unknown = f"nobody-{secrets.token_hex(4)}"
    statuses = [(await attempt(gw, unknown, "whatever-it-is"))[0] for _ in range(LIMIT + 1)]
    assert statuses == [401] * LIMIT + [429]
    other = await new_teller(gw)  # another username is not affected
    assert (await attempt(gw, other, PASSWORD))[0] == 201


async def test_a_malformed_login_is_not_counted(gw: Gateway) -> None:
    username = await new_teller(gw)
    for _ in range(LIMIT + 2):
        response = await gw.client.post("/v1/sessions", json={"username": username})
        await assert_problem(response, 400, "validation-failed")
    assert (await attempt(gw, username, PASSWORD))[0] == 201
