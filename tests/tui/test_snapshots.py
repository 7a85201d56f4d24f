"""Snapshot tests (pytest-textual-snapshot) of the main screens at 80×24, from fixed documents.

Update after an intended change with ``pytest tests/tui/test_snapshots.py --snapshot-update`` and
look at the SVGs in ``__snapshots__/`` before committing them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import Sparkline

from tests.tui.canned import CannedClient
from tui import device as device_module
from tui.app import make_app
from tui.device import PortInfo
from tui.screens import devices as devices_screen


def app_as(role: str = "supervisor") -> Any:
    return make_app(client=CannedClient(role), refresh_seconds=3600)


async def settle(pilot: Pilot[Any], condition: Any = None, rounds: int = 60) -> None:
    for _ in range(rounds):
        await pilot.pause(0.05)
        if condition is None or condition():
            break
    await pilot.pause(0.1)


def go(mode: str, then: Any = None) -> Any:
    async def run_before(pilot: Pilot[Any]) -> None:
        await pilot.app.switch_mode(mode)
        await settle(pilot, lambda: not pilot.app.workers._workers or all(
            w.is_finished for w in pilot.app.workers._workers), rounds=40)
        if then is not None:
            await then(pilot)
            await settle(pilot, rounds=10)

    return run_before


def test_login(snap_compare: Any) -> None:
    app = app_as()
    app.client.session = None
    assert snap_compare(app, terminal_size=(80, 24))


def test_dashboard(snap_compare: Any) -> None:
    async def seed(pilot: Pilot[Any]) -> None:
        screen: Any = pilot.app.screen
        screen.now = lambda: datetime(2025, 1, 3, 18, 0, tzinfo=UTC)  # the canned risk events' day
        screen.risk_cursor = 0
        screen.refresh_now()
        await settle(pilot, lambda: "critical" in str(screen.query_one("#risk-summary").render()), rounds=40)
        screen.rates = [0.0, 3.0, 12.5, 40.0, 38.0, 22.0, 9.0, 30.0, 41.0, 17.0, 6.0, 0.0]
        screen.query_one("#rate-sparkline", Sparkline).data = screen.rates

    assert snap_compare(app_as(), run_before=go("dashboard", seed), terminal_size=(80, 24))


def test_wallets(snap_compare: Any) -> None:
    assert snap_compare(app_as("teller"), run_before=go("wallets"), terminal_size=(80, 24))


def test_wallet_detail(snap_compare: Any) -> None:
    async def open_first(pilot: Pilot[Any]) -> None:
        await pilot.press("enter")
        await settle(pilot, rounds=20)

    assert snap_compare(app_as("teller"), run_before=go("wallets", open_first), terminal_size=(80, 24))


def test_cash_in_confirmation(snap_compare: Any) -> None:
    async def cash_in(pilot: Pilot[Any]) -> None:
        await pilot.press("enter")
        await settle(pilot, rounds=20)
        await pilot.press("i", "5", "0", "0", "enter")
        await settle(pilot, rounds=10)

    assert snap_compare(app_as("teller"), run_before=go("wallets", cash_in), terminal_size=(80, 24))


def test_approvals(snap_compare: Any) -> None:
    assert snap_compare(app_as(), run_before=go("approvals"), terminal_size=(80, 24))


def test_approve_confirmation(snap_compare: Any) -> None:
    async def approve(pilot: Pilot[Any]) -> None:
        await pilot.press("down", "a")

    assert snap_compare(app_as(), run_before=go("approvals", approve), terminal_size=(80, 24))


def test_reconciliation(snap_compare: Any) -> None:
    assert snap_compare(app_as(), run_before=go("reconciliation"), terminal_size=(80, 24))


def test_audit(snap_compare: Any) -> None:
    async def verify(pilot: Pilot[Any]) -> None:
        await pilot.press("v")

    assert snap_compare(app_as("auditor"), run_before=go("audit", verify), terminal_size=(80, 24))


def test_risk(snap_compare: Any) -> None:
    async def evidence_of_the_critical_event(pilot: Pilot[Any]) -> None:
        await pilot.press("down")

    assert snap_compare(app_as(), run_before=go("risk", evidence_of_the_critical_event), terminal_size=(80, 24))


def test_hard_wallets(snap_compare: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    ports = [PortInfo("/dev/ttyUSB0", "CH340 serial"), PortInfo("/dev/ttyACM0", "e-CNY hard wallet")]
    monkeypatch.setattr(devices_screen, "list_ports", lambda: ports)
    monkeypatch.setattr(device_module, "list_ports", lambda: ports)
    assert snap_compare(app_as("teller"), run_before=go("devices"), terminal_size=(80, 24))
