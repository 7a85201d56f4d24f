"""A network HSM that goes away under load: the token is served by `p11-kit server` (the stand-in
for a network HSM) and reached through `p11-kit-client.so`. Kill the server and its per-connection
processes while requests keep coming: only 503s with Retry-After (never a 500), a failing
/readyz, and signing back within 5 s of the server's return, with no restart. Every acknowledged
signature is valid and audited exactly once."""

from __future__ import annotations

import asyncio
import glob
import hashlib
import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from gateway.auth.roles import Role
from tests.api.support import audit_entries
from tests.conftest import ROOT, Gateway, Token, make_settings, start_gateway

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]

LABEL = "ecny-remote"


def _client_module() -> str:
    found = glob.glob("/usr/lib/*/pkcs11/p11-kit-client.so") + glob.glob("/usr/lib/pkcs11/p11-kit-client.so")
    if not found:
        pytest.fail("p11-kit-client.so not found: install p11-kit (make test does)")
    return found[0]


class RemoteHsm:
    """`p11-kit server` exporting one SoftHSM2 token on a unix socket."""

    def __init__(self, token: Token, socket: Path) -> None:
        self.token = token
        self.socket = socket
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.socket.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            ["p11-kit", "server", "-f", "-n", str(self.socket), "--provider", "/usr/lib/softhsm/libsofthsm2.so",
             f"pkcs11:token={self.token.label}"],
            env={**os.environ, "SOFTHSM2_CONF": str(self.token.conf)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            assert time.monotonic() < deadline, "p11-kit server did not start"
            time.sleep(0.02)

    def kill(self) -> None:
        """Kill the server and every per-connection p11-kit-remote it started: the HSM is gone."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        subprocess.run(["pkill", "-KILL", "-f", f"p11-kit-remote --provider .* pkcs11:token={self.token.label}"],
                       check=False)


@pytest.fixture(scope="module")
def remote_hsm(softhsm_token: Token, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteHsm]:
    subprocess.run([str(ROOT / "softhsm" / "init-token.sh"), str(softhsm_token.directory), LABEL], check=True,
                   capture_output=True)
    pin = (softhsm_token.directory / f"{LABEL}.user-pin").read_text().strip()
    token = Token(softhsm_token.directory, softhsm_token.conf, LABEL, pin)
    server = RemoteHsm(token, tmp_path_factory.mktemp("p11kit") / "hsm.sock")
    server.start()
    previous = os.environ.get("P11_KIT_SERVER_ADDRESS")
    os.environ["P11_KIT_SERVER_ADDRESS"] = f"unix:path={server.socket}"  # inherited by spawned workers
    yield server
    server.kill()
    if previous is None:
        os.environ.pop("P11_KIT_SERVER_ADDRESS", None)
    else:
        os.environ["P11_KIT_SERVER_ADDRESS"] = previous


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def remote_gateway(remote_hsm: RemoteHsm, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    database = tmp_path_factory.mktemp("remote") / "gateway.db"
    settings = make_settings(remote_hsm.token, f"sqlite:///{database}", hsm={"module": _client_module()})
    started = await start_gateway(settings)
    yield started
    await started.client.close()


async def test_signing_survives_the_network_hsm_going_away(remote_gateway: Gateway, remote_hsm: RemoteHsm) -> None:
    gw = remote_gateway
    created = await gw.client.post("/v1/keys", json={"label": "remote-raw", "algorithm": "ecdsa-p256",
                                                     "usage": ["raw"]}, headers=gw.auth(Role.ADMIN))
    assert created.status == 201, await created.text()
    key = await created.json()
    public = serialization.load_pem_public_key(key["public_key_pem"].encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)

    results: list[tuple[float, int, bytes, Any]] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def client(index: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            digest = hashlib.sha256(f"{index}-{n}".encode()).digest()
            response = await gw.client.post(
                f"/v1/keys/{key['key_id']}/sign", json={"digest": digest.hex()},
                headers={**gw.auth(Role.BACKEND), "Idempotency-Key": f"remote-{index}-{n}"},
            )
            body = await response.json()
            results.append((loop.time(), response.status, digest, (body, response.headers.get("Retry-After"))))
            if response.status != 200:
                await asyncio.sleep(0.05)

    clients = [asyncio.create_task(client(i)) for i in range(4)]
    await asyncio.sleep(1.0)
    remote_hsm.kill()
    killed_at = loop.time()
    ready_failed = False
    for _ in range(40):
        if (await gw.client.get("/readyz")).status == 503:
            ready_failed = True
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)
    remote_hsm.start()
    back_at = loop.time()
    while loop.time() - back_at < 10 and not any(t > back_at and s == 200 for t, s, _, _ in results):
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*clients)

    statuses = {status for _, status, _, _ in results}
    assert statuses <= {200, 503}, statuses  # never a 500, never anything else
    assert ready_failed, "/readyz kept passing while the HSM was gone"
    during = [r for r in results if killed_at + 0.3 < r[0] < back_at]
    assert during and all(status == 503 for _, status, _, _ in during)
    assert all(extra[1] and extra[1].isdigit() for _, status, _, extra in results if status == 503)
    first_after = min(t for t, s, _, _ in results if t > back_at and s == 200)
    assert first_after - back_at <= 5.0, f"signing resumed {first_after - back_at:.1f} s after the HSM returned"
    assert (await gw.client.get("/readyz")).status == 200

    # Every acknowledged signature is valid, and audited exactly once; nothing refused was signed.
    acknowledged = [(digest, extra[0]) for _, status, digest, extra in results if status == 200]
    for digest, body in acknowledged:
        public.verify(bytes.fromhex(body["der"]), digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    entries = await audit_entries(gw)
    signed = [e["payload_hash"] for e in entries if e["action"] == "keys.sign" and e["decision"] == "allowed"]
    assert sorted(signed) == sorted(hashlib.sha256(d).hexdigest() for d, _ in acknowledged)
