"""Hard wallets and reconciliation through the UI: a simulated device (gateway.hardwallet.simulator)
served on a real pseudo-terminal, reached by typing its path, registered, loaded, synced, unloaded."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from textual.widgets import ProgressBar

from gateway.auth.roles import Role
from gateway.hardwallet.simulator import SimulatedDevice, start_in_thread
from tests.conftest import Gateway
from tests.tui.conftest import (
    api,
    has_notification,
    login,
    new_wallet,
    open_filtered,
    screen_text,
    teller_app,
    type_text,
    wait_for,
)
from tui.format import grouped
from tui.screens.devices import DevicesScreen
from tui.screens.reconciliation import ReconciliationScreen

pytestmark = [pytest.mark.softhsm, pytest.mark.serial]


@pytest.fixture
def simulator() -> Iterator[tuple[str, SimulatedDevice]]:
    device = SimulatedDevice.create(device_id="sim-tui-1")
    path, stop, thread = start_in_thread(device)
    yield path, device
    stop.set()
    thread.join(timeout=5)


async def connect(pilot: Any, app: Any, path: str, device_id: str) -> None:
    """Open the hard-wallet screen and connect to the device served on ``path`` (a pty) by typing it."""
    await login(pilot, "teller1")
    await pilot.press("h")
    await wait_for(pilot, lambda: isinstance(app.screen, DevicesScreen))
    app.screen.query_one("#port-path").focus()
    await type_text(pilot, path)
    await pilot.press("enter")
    await wait_for(pilot, lambda: device_id in screen_text(app), what="device info")
    app.screen.query_one("#ports-table").focus()


async def register_through_the_ui(pilot: Any, app: Any, wallet_id: str, device_id: str) -> None:
    """Register the connected device to ``wallet_id`` with the screen's form and confirmation."""
    await pilot.press("g")
    await wait_for(pilot, lambda: app.screen.query("#field-wallet_id"))
    await type_text(pilot, grouped(wallet_id))
    await pilot.press("enter", "enter")
    await wait_for(pilot, lambda: "Register this hard wallet?" in screen_text(app))
    await pilot.press("y")
    await wait_for(pilot, lambda: has_notification(app, f"Registered {device_id}"), what="registration")


async def load_through_the_ui(pilot: Any, app: Any, yuan: str) -> None:
    """Load ``yuan`` on the connected device with the screen's own form and confirmation."""
    await pilot.press("l")
    await wait_for(pilot, lambda: app.screen.query("#field-amount"))
    await type_text(pilot, yuan)
    await pilot.press("enter")
    await wait_for(pilot, lambda: f"Load ¥{yuan}.00?" in screen_text(app))
    await pilot.press("y")


async def test_register_load_sync_and_unload_a_hard_wallet(tui_gateway: Gateway,
                                                           simulator: tuple[str, SimulatedDevice]) -> None:
    path, _ = simulator
    wallet_id = await new_wallet(tui_gateway, "Device Owner", tier=2, cash=50_000)
    app = teller_app(tui_gateway)
    async with app.run_test(size=(80, 24)) as pilot:
        await connect(pilot, app, path, "sim-tui-1")
        await wait_for(pilot, lambda: "not registered" in screen_text(app), what="device info")

        await register_through_the_ui(pilot, app, wallet_id, "sim-tui-1")
        await wait_for(pilot, lambda: "Cert     yes" in screen_text(app) and "active" in screen_text(app))

        await load_through_the_ui(pilot, app, "100")
        await wait_for(pilot, lambda: "Offline  ¥100.00" in screen_text(app), what="device balance")
        wallet = await api(tui_gateway, "GET", f"/v1/wallets/{wallet_id}")
        assert wallet["balance_fen"] == 40_000 and wallet["offline_reserve_fen"] == 10_000

        await pilot.press("s")
        await wait_for(pilot, lambda: has_notification(app, "Synced"), what="sync")
        assert app.screen.query_one("#sync-progress", ProgressBar).percentage == 1.0

        await pilot.press("x")
        await wait_for(pilot, lambda: "Unload this hard wallet?" in screen_text(app))
        await pilot.press("y")
        await wait_for(pilot, lambda: has_notification(app, "Unloaded"), what="unload")
    wallet = await api(tui_gateway, "GET", f"/v1/wallets/{wallet_id}")
    assert wallet["balance_fen"] == 50_000 and wallet["offline_reserve_fen"] == 0


async def test_reconciliation_lists_open_discrepancies(tui_gateway: Gateway) -> None:
    app = teller_app(tui_gateway)
    open_items = (await api(tui_gateway, "GET", "/v1/reconciliation/discrepancies", role=Role.SUPERVISOR,
                            params={"status": "open"}))["discrepancies"]
    async with app.run_test(size=(80, 24)) as pilot:
        await login(pilot, "supervisor1")
        await pilot.press("r")
        await wait_for(pilot, lambda: isinstance(app.screen, ReconciliationScreen))
        await wait_for(pilot, lambda: f"{len(open_items)} open discrepanc" in screen_text(app), what="the list")


async def resolve(pilot: Any, resolution: str, note: str) -> None:
    await pilot.press("v")
    await wait_for(pilot, lambda: "Resolve this discrepancy?" in screen_text(pilot.app), what="the dialog")
    await type_text(pilot, resolution)
    await pilot.press("enter")
    await type_text(pilot, note)
    await pilot.press("enter")


async def test_a_supervisor_resolves_a_discrepancy_in_the_ui(tui_gateway: Gateway) -> None:
    """A payment to a device the gateway does not know becomes an `unknown-device` discrepancy;
    a supervisor finds it with the filter and resolves it with a resolution and a note, which the
    gateway records; a resolution the gateway refuses is shown as a notification."""
    from tests.device.flows import discrepancies, load, open_wallet, pay, register, sync

    suffix = "".join(chr(ord("a") + b % 26) for b in os.urandom(6))
    payer = SimulatedDevice.create(device_id=f"sim-resolve-{suffix}")
    await register(tui_gateway, payer, await open_wallet(tui_gateway, cash=50_000))
    await load(tui_gateway, payer, 10_000)
    pay(payer, None, 1_000, payee_id="ghost-device")
    await sync(tui_gateway, payer)
    [found] = await discrepancies(tui_gateway, payer.state.device_id)
    assert found["kind"] == "unknown-device"

    app = teller_app(tui_gateway)
    async with app.run_test(size=(100, 30)) as pilot:
        await login(pilot, "supervisor1")
        await open_filtered(pilot, "r", ReconciliationScreen, suffix)
        await pilot.press("enter")
        await wait_for(pilot, lambda: "1 open discrepancy" in screen_text(app), what="the filtered list")
        # "acknowledge" cannot close a discrepancy that holds a payment: the gateway says so.
        await resolve(pilot, "acknowledge", "seen")
        await wait_for(pilot, lambda: has_notification(app, "payments-held"), what="the refusal")
        await resolve(pilot, "reject", "checked with the branch: no such device")
        await wait_for(pilot, lambda: has_notification(app, "resolved"), what="the resolution")
    [resolved] = await discrepancies(tui_gateway, payer.state.device_id, status="resolved")
    assert resolved["discrepancy_id"] == found["discrepancy_id"]
    assert resolved["resolution"] == "reject" and resolved["note"] == "checked with the branch: no such device"
    assert await discrepancies(tui_gateway, payer.state.device_id) == []


async def test_a_load_over_the_daily_aggregate_shows_pending_approval(tui_gateway: Gateway) -> None:
    """A 202 shown as a success or an error: a load that takes the wallet's loads today above the daily
    threshold waits for a second person, and the teller must not write a voucher or retry."""
    from tests.device.flows import load, register

    wallet_id = await new_wallet(tui_gateway, "Daily Loads", tier=1, cash=15_000_000)
    for index in range(2):  # ¥100,000 loaded today through two other devices: the daily threshold, not above
        other = SimulatedDevice.create(device_id=f"sim-tui-daily-{index}")
        await register(tui_gateway, other, wallet_id)
        await load(tui_gateway, other, 5_000_000)
    device = SimulatedDevice.create(device_id="sim-tui-pending")
    path, stop, thread = start_in_thread(device)
    try:
        app = teller_app(tui_gateway)
        async with app.run_test(size=(80, 24)) as pilot:
            await connect(pilot, app, path, "sim-tui-pending")
            await register_through_the_ui(pilot, app, wallet_id, "sim-tui-pending")

            await load_through_the_ui(pilot, app, "100")
            await wait_for(pilot, lambda: has_notification(app, "pending approval a_"), what="pending approval")
            assert not has_notification(app, "Loaded ¥100.00")
            assert device.balance == 0  # no voucher was written
        wallet = await api(tui_gateway, "GET", f"/v1/wallets/{wallet_id}")
        assert wallet["balance_fen"] == 5_000_000 and wallet["offline_reserve_fen"] == 10_000_000
    finally:
        stop.set()
        thread.join(timeout=5)


async def test_a_teller_certifies_a_hard_wallet_again_after_a_voucher_key_rotation(tui_gateway: Gateway) -> None:
    """After the voucher key is rotated, the device refuses every new voucher until it is certified again:
    the teller does it from the palette's "Certify again" (key e), the device takes the new certificate with
    the outgoing key's endorsement over its serial link, and a load under the new key lands on it."""
    from tests.device.flows import register

    wallet_id = await new_wallet(tui_gateway, "Rotated Issuer", tier=2, cash=50_000)
    device = SimulatedDevice.create(device_id="sim-tui-recertify")
    await register(tui_gateway, device, wallet_id)
    pinned = device.state.issuer_key_pem
    keys = (await api(tui_gateway, "GET", "/v1/keys", role=Role.ADMIN))["keys"]
    (voucher,) = [key for key in keys if "voucher" in key["active_for"]]
    rotated = await api(tui_gateway, "POST", f"/v1/keys/{voucher['key_id']}/rotate", role=Role.ADMIN)
    path, stop, thread = start_in_thread(device)
    try:
        app = teller_app(tui_gateway)
        async with app.run_test(size=(80, 24)) as pilot:
            await connect(pilot, app, path, "sim-tui-recertify")
            await pilot.press("e")
            await wait_for(pilot, lambda: "Certify this hard wallet again?" in screen_text(app))
            await pilot.press("y")
            await wait_for(pilot, lambda: has_notification(app, "Certified sim-tui-recertify again"),
                           what="re-certification")
            await load_through_the_ui(pilot, app, "100")
            await wait_for(pilot, lambda: "Offline  ¥100.00" in screen_text(app), what="device balance")
    finally:
        stop.set()
        thread.join(timeout=5)
    assert device.state.issuer_key_pem == rotated["public_key_pem"] != pinned
    record = await api(tui_gateway, "GET", f"/v1/devices/{device.state.device_id}")
    assert record["kid"] == rotated["key_id"]
