"""The UI stays responsive while the gateway is slow or down: a notification, then recovery."""

from __future__ import annotations

import asyncio
import socket

import pytest

from tests.conftest import Gateway
from tests.tui.conftest import (
    Proxy,
    has_notification,
    login,
    notifications,
    screen_text,
    teller_app,
    type_text,
    wait_for,
)
from tui.screens.dashboard import DashboardScreen
from tui.screens.login import LoginScreen
from tui.screens.wallets import WalletsScreen

pytestmark = pytest.mark.softhsm


async def test_keys_work_while_the_gateway_is_slow(tui_gateway: Gateway, proxy: Proxy) -> None:
    app = teller_app(proxy.url, timeout=10.0)
    async with app.run_test(size=(80, 24)) as pilot:
        await login(pilot, "teller1")
        await wait_for(pilot, lambda: "● ready" in screen_text(app))
        proxy.hold()  # the gateway answers nothing until released
        await wait_for(pilot, lambda: proxy.held > 0, what="a dashboard refresh waiting on the gateway")
        await pilot.press("w")
        await wait_for(pilot, lambda: isinstance(app.screen, WalletsScreen), what="screen switch")
        await pilot.press("slash")
        await type_text(pilot, "abc")
        assert app.screen.query_one("#filter").value == "abc"  # type: ignore[attr-defined]
        # Every key above was handled while the gateway still held its answers back: input never waits.
        assert proxy.held > 0, "the gateway answered: the test proves nothing"
        proxy.release()
        await wait_for(pilot, lambda: "matching “abc”" in screen_text(app), what="the slow search lands")


async def test_gateway_down_then_back(tui_gateway: Gateway, proxy: Proxy) -> None:
    app = teller_app(proxy.url, timeout=2.0)
    async with app.run_test(size=(80, 24)) as pilot:
        await login(pilot, "teller1")
        await wait_for(pilot, lambda: "● ready" in screen_text(app))
        await proxy.stop()  # connections refused from now on
        await wait_for(pilot, lambda: has_notification(app, "Gateway unreachable"), what="unreachable notice")
        await pilot.pause(2.0)  # several refreshes fail meanwhile: still one notification
        assert sum("Gateway unreachable" in n for n in notifications(app)) == 1, notifications(app)
        await pilot.press("w")  # the UI still answers
        await wait_for(pilot, lambda: isinstance(app.screen, WalletsScreen), timeout=1.0)
        await pilot.press("d")
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen), timeout=1.0)
        await proxy.start()  # same port again
        await wait_for(pilot, lambda: has_notification(app, "Recovered", "answers again"), what="recovery")
        assert not any("Traceback" in n for n in notifications(app))


async def test_login_against_a_closed_port_then_the_gateway_appears(tui_gateway: Gateway) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proxy = Proxy(str(tui_gateway.client.make_url("")).rstrip("/"))
    proxy.port = port
    app = teller_app(f"http://127.0.0.1:{port}", timeout=2.0)
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: app.query_one("#username").has_focus)
            await type_text(pilot, "teller1")
            await pilot.press("enter")
            await type_text(pilot, "teller-password-1")
            await pilot.press("enter")
            await wait_for(pilot, lambda: has_notification(app, "Log in", "unreachable"), what="notification")
            assert isinstance(app.screen, LoginScreen)
            await proxy.start()
            await asyncio.sleep(0.1)
            await pilot.press("enter")  # the same form, sent again
            await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen), what="logged in")
    finally:
        await proxy.close()
