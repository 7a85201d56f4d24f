"""The application opens each resource in a cleanup context of its own (store, signer pool, audit
log, refusal tally), so one that fails to start is not closed and the ones before it are."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from pydantic import SecretStr

from gateway.app import AUDIT_LOG, RISK_MONITOR, SIGNER_POOL, STORE, make_app
from gateway.errors import GatewayError
from gateway.runtime import RUNTIME
from tests.conftest import Token, make_settings


async def test_a_signer_pool_that_fails_to_start_leaves_the_store_closed_and_nothing_else(
    softhsm_token: Token, tmp_path: Path
) -> None:
    """A wrong PIN: the signer context fails; the store context (started before it) is closed, and
    the failure is the HSM's own error, not a secondary one from closing what never opened."""
    settings = make_settings(softhsm_token, f"sqlite:///{tmp_path / 'gateway.db'}")
    settings.hsm.pin = SecretStr("not-the-pin")
    app = make_app(settings)
    server = TestServer(app)
    with pytest.raises(GatewayError) as failure:
        await server.start_server()
    assert "PIN" in str(failure.value) or "pin" in str(failure.value), str(failure.value)
    await server.close()
    assert STORE in app and SIGNER_POOL not in app and AUDIT_LOG not in app
    # The store was closed: its executor is shut down, so it takes no more work.
    with pytest.raises(RuntimeError, match="after shutdown"):
        await app[STORE].read(lambda tx: tx.fetchone("SELECT 1 AS one"))


async def test_every_resource_is_reachable_by_its_key_once_started(softhsm_token: Token, tmp_path: Path) -> None:
    """Positive control: a good configuration starts every context, each resource under its key."""
    app = make_app(make_settings(softhsm_token, f"sqlite:///{tmp_path / 'gateway.db'}"))
    server = TestServer(app)
    await server.start_server()
    try:
        assert (await app[STORE].read(lambda tx: tx.fetchone("SELECT 1 AS one")))["one"] == 1  # type: ignore[index]
        assert app[SIGNER_POOL].health().ready
        assert app[AUDIT_LOG] is app[RUNTIME].audit
        assert app[RISK_MONITOR] is app[RUNTIME].monitor
    finally:
        await server.close()
