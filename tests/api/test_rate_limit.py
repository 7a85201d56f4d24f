"""Per-principal rate limiting: a client over its rate gets 429 with Retry-After; others are unaffected."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from gateway.auth.roles import Role
from tests.conftest import Gateway, Token, make_settings, start_gateway

pytestmark = pytest.mark.softhsm


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def limited(softhsm_token: Token, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    database = tmp_path_factory.mktemp("ratelimit") / "gateway.db"
    started = await start_gateway(
        make_settings(softhsm_token, f"sqlite:///{database}", server={"rate_limit_per_second": 5.0})
    )
    yield started
    await started.client.close()


async def test_rate_limit_per_principal(limited: Gateway) -> None:
    statuses = []
    for _ in range(30):
        response = await limited.client.get("/v1/keys", headers=limited.auth(Role.BACKEND))
        statuses.append(response.status)
        if response.status == 429:
            problem = await response.json()
            assert problem["type"].endswith("/rate-limited")
            assert response.headers["Retry-After"].isdigit()
    assert 200 in statuses and 429 in statuses
    assert statuses.count(200) <= 12  # burst of 10 plus what refilled meanwhile
    # Another principal has its own bucket.
    assert (await limited.client.get("/v1/keys", headers=limited.auth(Role.ADMIN))).status == 200
