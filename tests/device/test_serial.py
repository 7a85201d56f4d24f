"""The serial link end to end: simulated hard wallets on real pseudo-terminals, driven through
pyserial, synced through the API; the `device-sim` command; a noisy line; pyserial URLs."""

from __future__ import annotations

import asyncio
import base64
import os
import random
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from gateway.auth.roles import Role
from gateway.errors import DeviceRefused, DeviceTimeout
from gateway.hardwallet.frames import encode_frame
from gateway.hardwallet.link import DeviceLink, open_link, open_port
from gateway.hardwallet.protocol import MAX_REQUEST_ID, answer_message
from gateway.hardwallet.simulator import PtyPort, SimulatedDevice, serve, start_in_thread
from gateway.runtime import RUNTIME
from tests.conftest import Gateway
from tests.device.flows import (
    device_doc,
    discrepancies,
    ensure_voucher_key,
    issue_load,
    ledger_problems,
    open_wallet,
    post_sync,
    wallet,
)

pytestmark = pytest.mark.serial


@pytest.fixture
def two_devices(tmp_path: Path) -> Iterator[tuple[DeviceLink, DeviceLink, SimulatedDevice, SimulatedDevice]]:
    """Two simulated devices, each on its own pseudo-terminal, with a pyserial link to each."""
    devices = [SimulatedDevice.create(path=tmp_path / f"device-{n}.json") for n in range(2)]
    served = [start_in_thread(device) for device in devices]
    links = [open_link(path) for path, _, _ in served]
    yield links[0], links[1], devices[0], devices[1]
    for link in links:
        link.close()
    for _, stop, thread in served:
        stop.set()
        thread.join(timeout=5)


@pytest_asyncio.fixture(scope="module")
async def gw(ledger_gateway: Gateway) -> AsyncIterator[Gateway]:
    await ensure_voucher_key(ledger_gateway)
    yield ledger_gateway


async def on_line(function: Any, *args: Any, **kwargs: Any) -> Any:
    """Blocking pyserial I/O off the event loop (the gateway under test runs on it)."""
    return await asyncio.to_thread(function, *args, **kwargs)


async def register_over_link(gw: Gateway, link: DeviceLink, wallet_id: str) -> dict[str, Any]:
    info = await on_line(link.info)
    response = await gw.client.post("/v1/devices", json={"wallet_id": wallet_id, "device_id": info["device_id"],
                                                         "public_key_pem": info["public_key_pem"],
                                                         "model": info["model"]}, headers=gw.auth(Role.TELLER))
    assert response.status == 201, await response.text()
    document: dict[str, Any] = await response.json()
    await on_line(link.certify, base64.b64decode(document["certificate"]), document["issuer_public_key_pem"])
    return document


async def sync_over_link(gw: Gateway, link: DeviceLink) -> dict[str, Any]:
    progress: list[tuple[int, int]] = []
    export = await on_line(link.export_log, lambda done, total: progress.append((done, total)))
    assert progress and progress[-1][0] == progress[-1][1] == len(export)
    info = await on_line(link.info)
    response = await post_sync(gw, info["device_id"], export)
    assert response.status == 200, await response.text()
    report: dict[str, Any] = await response.json()
    await on_line(link.ack_log, base64.b64decode(report["ack"]))
    report["export"] = export
    return report


async def test_pay_offline_between_two_devices_over_pseudo_terminals(
    gw: Gateway, two_devices: tuple[DeviceLink, DeviceLink, SimulatedDevice, SimulatedDevice]
) -> None:
    payer_link, payee_link, payer, payee = two_devices
    payer_wallet, payee_wallet = await open_wallet(gw, cash=500_000), await open_wallet(gw)
    await register_over_link(gw, payer_link, payer_wallet)
    await register_over_link(gw, payee_link, payee_wallet)
    voucher = await issue_load(gw, payer.state.device_id, 200_000)
    loaded = await on_line(payer_link.load, base64.b64decode(voucher["voucher"]))
    assert loaded == {"load_seq": 1, "balance": 200_000}
    with pytest.raises(DeviceRefused) as refused:  # a voucher loads once
        await on_line(payer_link.load, base64.b64decode(voucher["voucher"]))
    assert refused.value.extra["device_code"] == "replayed"
    amounts = [12_300, 45_600, 7_800]
    for amount in amounts:
        made = await on_line(payer_link.pay, payee.state.device_id, amount)
        received = await on_line(payee_link.receive, made["payment"], made["certificate"])
        assert received["hash"] == made["hash"]
    assert (await on_line(payer_link.info))["balance"] == 200_000 - sum(amounts)
    first = await sync_over_link(gw, payer_link)
    assert first["payments"]["awaiting_payee"] == 3
    second = await sync_over_link(gw, payee_link)
    assert second["receipts"]["posted"] == 3 and second["posted_fen"] == sum(amounts)
    # The ledger moved exactly once: syncing again (the same exports, or fresh ones) changes nothing.
    for report in (first, second):
        response = await post_sync(gw, report["device_id"], report["export"])
        assert (await response.json())["replayed"] is True
    assert (await sync_over_link(gw, payer_link))["payments"]["received"] == 0
    assert (await sync_over_link(gw, payee_link))["receipts"]["received"] == 0
    assert (await wallet(gw, payee_wallet))["balance_fen"] == sum(amounts)
    payer_document = await wallet(gw, payer_wallet)
    assert payer_document["balance_fen"] == 300_000
    assert payer_document["offline_reserve_fen"] == 200_000 - sum(amounts)
    # One journal entry for the three payments of this sync between the two wallets; each payment names it.
    transactions = await (await gw.client.get(f"/v1/wallets/{payee_wallet}/transactions",
                                              headers=gw.auth(Role.TELLER))).json()
    offline_entries = [t for t in transactions["transactions"] if t["kind"] == "offline"]
    assert [(t["amount_fen"], t["reference"]) for t in offline_entries] == [(sum(amounts), second["sync_id"])]
    assert "3 payments" in offline_entries[0]["memo"]
    named = await gw.client.server.app[RUNTIME].database.read(lambda tx: tx.fetchall(
        "SELECT entry_id, amount FROM offline_payments WHERE payer_device = ? ORDER BY counter",
        (payer.state.device_id,)))
    assert [(row["entry_id"], row["amount"]) for row in named] == [(offline_entries[0]["entry_id"], a) for a in amounts]
    # Unload over the link: the final statement returns what is left to the wallet.
    statement = await on_line(payer_link.unload)
    response = await gw.client.post(f"/v1/devices/{payer.state.device_id}/unload",
                                    json={"statement": base64.b64encode(statement).decode()},
                                    headers=gw.auth(Role.TELLER))
    assert response.status == 200, await response.text()
    assert (await response.json())["returned_fen"] == 200_000 - sum(amounts)
    assert (await wallet(gw, payer_wallet))["balance_fen"] == 500_000 - sum(amounts)
    with pytest.raises(DeviceRefused):
        await on_line(payer_link.pay, payee.state.device_id, 1)
    assert (await device_doc(gw, payer.state.device_id))["status"] == "unloaded"
    assert await discrepancies(gw, payer.state.device_id) == []
    assert await ledger_problems(gw) == []
    # The simulator's state survived in its file.
    assert SimulatedDevice.open(payer.path).state.statement  # type: ignore[arg-type]


def test_device_sim_command_on_a_pty(tmp_path: Path) -> None:
    state = tmp_path / "sim.json"
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from gateway.cli import main; sys.exit(main(sys.argv[1:]))",
         "device-sim", "--pty", "--state", str(state), "--device-id", "till-0001"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("device-sim till-0001 on /dev/"), line
        path = line.rsplit(" ", 1)[1].strip()
        with open_link(path) as link:
            info = link.info()
            assert info["device_id"] == "till-0001" and info["certified"] is False and info["simulator"] is True
            with pytest.raises(DeviceRefused):
                link.call("pay", payee="someone-else", amount=1)
            with pytest.raises(DeviceRefused):
                link.call("no-such-op")
        assert state.exists() and oct(state.stat().st_mode & 0o777) == "0o600"
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert process.returncode == 0


class NoisyPort:
    """A device port that puts line noise, a torn frame and a stale answer before every answer."""

    def __init__(self, inner: PtyPort, seed: int) -> None:
        self.inner = inner
        self.random = random.Random(seed)
        self.path = inner.path

    def read(self, size: int = 1) -> bytes:
        return self.inner.read(size)

    def write(self, data: bytes) -> int:
        noise = bytes(self.random.randrange(256) for _ in range(self.random.randrange(1, 64)))
        torn = data[: self.random.randrange(1, max(2, len(data) - 1))].rstrip(b"\x00")
        stale = encode_frame(answer_message(MAX_REQUEST_ID, {"device_id": "stale"}))  # to a request long gone
        self.inner.write(noise + b"\x00" + torn + b"\x00" + stale + data)
        return len(data)

    def close(self) -> None:
        self.inner.close()


def test_link_resynchronises_after_noise_and_torn_frames() -> None:
    device = SimulatedDevice.create()
    port = NoisyPort(PtyPort(), seed=7)
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(port, device, stop), daemon=True)
    thread.start()
    try:
        with open_link(port.path) as link:
            for _ in range(20):
                assert link.info()["device_id"] == device.state.device_id
            assert link.dropped_frames >= 20  # the noise and torn frames were seen and skipped, every time
            # Garbage from the host side is skipped by the device too.
            link.port.write(os.urandom(300) + b"\x00")
            assert link.info()["device_id"] == device.state.device_id
    finally:
        stop.set()
        thread.join(timeout=5)


def test_loop_url_and_timeouts() -> None:
    port = open_port("loop://")
    link = DeviceLink(port, timeout=0.2)
    with pytest.raises(DeviceTimeout):  # loop:// echoes the request back: it is not an answer
        link.info()
    link.close()
