"""The HSM going away under a running gateway: 503 with Retry-After and a failing /readyz while
it is gone, signing again without a restart once it is back. Real SoftHSM2 token, real processes."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from gateway.auth.roles import Role
from gateway.runtime import RUNTIME
from tests.conftest import ROOT, Gateway, Token, make_settings, start_gateway

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]

LABEL = "ecny-recovery"


def _token_directory(token: Token, label: str) -> Path:
    """SoftHSM keeps each token in a sub-folder of the token directory; find ours by its label."""
    for folder in (token.directory / "tokens").iterdir():
        object_file = folder / "token.object"
        if object_file.exists() and label.encode() in object_file.read_bytes():
            return folder
    raise AssertionError(f"no token folder for {label}")


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def own_gateway(softhsm_token: Token, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    # A token of its own (same token directory, other label), so that taking it away
    # does not disturb the other tests.
    subprocess.run([str(ROOT / "softhsm" / "init-token.sh"), str(softhsm_token.directory), LABEL], check=True,
                   capture_output=True)
    pin = (softhsm_token.directory / f"{LABEL}.user-pin").read_text().strip()
    token = Token(softhsm_token.directory, softhsm_token.conf, LABEL, pin)
    database = tmp_path_factory.mktemp("recovery") / "gateway.db"
    started = await start_gateway(make_settings(token, f"sqlite:///{database}"))
    started.token = token  # type: ignore[attr-defined]
    yield started
    await started.client.close()


async def _raw_key(gateway: Gateway) -> str:
    response = await gateway.client.post(
        "/v1/keys", json={"label": f"recovery-{os.urandom(3).hex()}", "algorithm": "ecdsa-p256", "usage": ["raw"]},
        headers=gateway.auth(Role.ADMIN),
    )
    assert response.status == 201, await response.text()
    key_id: str = (await response.json())["key_id"]
    return key_id


async def _sign(gateway: Gateway, key_id: str) -> Any:
    return await gateway.client.post(
        f"/v1/keys/{key_id}/sign", json={"digest": hashlib.sha256(os.urandom(8)).hexdigest()},
        headers=gateway.auth(Role.BACKEND),
    )


async def _until_signing_works(gateway: Gateway, key_id: str, seconds: float) -> float:
    loop = asyncio.get_running_loop()
    start = loop.time()
    while loop.time() - start < seconds:
        response = await _sign(gateway, key_id)
        if response.status == 200:
            return loop.time() - start
        assert response.status == 503, await response.text()
        await asyncio.sleep(0.1)
    raise AssertionError(f"signing did not resume within {seconds} s")


async def test_token_taken_away_then_back(own_gateway: Gateway) -> None:
    gateway = own_gateway
    key_id = await _raw_key(gateway)
    assert (await _sign(gateway, key_id)).status == 200
    folder = _token_directory(gateway.token, LABEL)  # type: ignore[attr-defined]
    hidden = folder.parent.parent / f"{folder.name}.away"  # outside the token directory: SoftHSM scans it all
    shutil.move(folder, hidden)
    try:
        response = await _sign(gateway, key_id)
        assert response.status == 503
        assert response.headers["Retry-After"].isdigit()
        problem = await response.json()
        assert problem["type"].endswith("/hsm-unavailable")
        # While the token is away every request keeps failing fast, and readiness says so.
        for _ in range(3):
            assert (await _sign(gateway, key_id)).status == 503
        ready = await gateway.client.get("/readyz")
        assert ready.status == 503
        assert "Retry-After" in ready.headers
    finally:
        shutil.move(hidden, folder)
    await _until_signing_works(gateway, key_id, seconds=10)
    assert (await gateway.client.get("/readyz")).status == 200


async def test_killed_worker_processes_are_respawned(own_gateway: Gateway) -> None:
    gateway = own_gateway
    key_id = await _raw_key(gateway)
    pool = gateway.client.server.app[RUNTIME].signer
    before = pool.worker_pids()  # type: ignore[attr-defined]
    assert len(before) == 2
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    await asyncio.sleep(0.2)
    response = await _sign(gateway, key_id)
    assert response.status in (200, 503)  # 503 until a worker is back; never a 500
    await _until_signing_works(gateway, key_id, seconds=15)
    after = pool.worker_pids()  # type: ignore[attr-defined]
    assert set(after).isdisjoint(before)


async def test_wrong_pin_is_fatal_and_not_retried(softhsm_token: Token, tmp_path: Path) -> None:
    from gateway.errors import HsmLoginFailed
    from gateway.hsm.pool import PoolSettings, SignerPool
    from gateway.hsm.profile import load_profile, profiles_dir

    profile = load_profile(profiles_dir() / "softhsm.toml")
    settings = PoolSettings(module_path=profile.module.path, token_label=softhsm_token.label, pin="wrong-pin-1234",
                            workers=1)
    with pytest.raises(HsmLoginFailed):
        await SignerPool.start(profile, settings)
    # The token is not locked by that attempt: the right PIN still works.
    settings.pin = softhsm_token.pin
    pool = await SignerPool.start(profile, settings)
    assert pool.health().ready
    await pool.close()
