"""Fixtures of the teller UI tests: a real gateway (SoftHSM token, SQLite store) for the Pilot tests,
helpers that drive the app like a teller would, and an HTTP proxy that can be slowed down or stopped."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import ClientSession, ClientTimeout, web
from textual.app import App
from textual.pilot import Pilot

from gateway.auth.roles import Role
from tests.conftest import PASSWORDS, Gateway, Token, make_settings, start_gateway
from tui.app import TellerApp, make_app


@pytest_asyncio.fixture(scope="session")
async def tui_gateway(softhsm_token: Token, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    """A gateway for the teller UI tests, with `ecny`, `audit` and `voucher` keys (transfers, audit
    checkpoints, device certificates and vouchers are signed)."""
    dsn = f"sqlite:///{tmp_path_factory.mktemp('tui') / 'gateway.db'}"
    started = await start_gateway(make_settings(softhsm_token, dsn))
    for label, usage in (("tui-ecny", "ecny"), ("tui-audit", "audit"), ("tui-voucher", "voucher")):
        response = await started.client.post(
            "/v1/keys", json={"label": label, "algorithm": "ecdsa-p256", "usage": [usage]},
            headers=started.auth(Role.ADMIN))
        assert response.status == 201, await response.text()
    yield started
    await started.client.close()


def url_of(gateway: Gateway) -> str:
    return str(gateway.client.make_url("")).rstrip("/")


def teller_app(gateway_or_url: Gateway | str, **options: Any) -> TellerApp:
    url = gateway_or_url if isinstance(gateway_or_url, str) else url_of(gateway_or_url)
    options.setdefault("refresh_seconds", 0.5)
    return make_app(url, **options)


async def wait_for(pilot: Pilot[Any], condition: Any, timeout: float = 10.0, what: str = "condition") -> None:
    """Let the app run until ``condition()`` holds (workers talk to a real gateway: no fixed sleeps)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        await pilot.pause(0.05)
        try:
            if condition():
                return
        except Exception:  # the widget may not be mounted yet
            pass
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; screen: {pilot.app.screen!r}; "
                         f"notifications: {notifications(pilot.app)}")


def notifications(app: App[Any]) -> list[str]:
    return [f"{n.title}: {n.message}" for n in app._notifications]


def has_notification(app: App[Any], *fragments: str) -> bool:
    return any(all(f.lower() in text.lower() for f in fragments) for text in notifications(app))


async def type_text(pilot: Pilot[Any], text: str) -> None:
    await pilot.press(*[_key(c) for c in text])


def _key(char: str) -> str:
    return {" ": "space", ".": "full_stop", "/": "slash", "+": "plus", ",": "comma", "-": "minus",
            ":": "colon"}.get(char, char)


async def login(pilot: Pilot[Any], username: str) -> None:
    """Type the username and password into the login screen and wait for the dashboard."""
    from tui.screens.dashboard import DashboardScreen

    await wait_for(pilot, lambda: pilot.app.query_one("#username").has_focus, what="the login form")
    await type_text(pilot, username)
    await pilot.press("enter")
    await type_text(pilot, PASSWORDS[username])
    await pilot.press("enter")
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, DashboardScreen), what=f"{username} logged in")


async def open_filtered(pilot: Pilot[Any], key: str, screen: type[Any], text: str) -> None:
    """Go to a screen by its key and type ``text`` into its filter (``/``)."""
    await pilot.press(key)
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, screen), what=screen.__name__)
    await pilot.press("slash")
    await type_text(pilot, text)


def cell_texts(app: App[Any], table_id: str) -> list[list[str]]:
    from textual.widgets import DataTable

    table = app.screen.query_one(table_id, DataTable)
    return [[str(cell) for cell in table.get_row_at(i)] for i in range(table.row_count)]


def screen_text(app: App[Any]) -> str:
    """Everything the current screen shows, as plain text (what a person would read)."""
    from textual.widgets import Label, Static

    parts: list[str] = []
    for widget in app.screen.query("Static, Label"):
        if isinstance(widget, Static | Label):
            parts.append(str(widget.render()))
    return "\n".join(parts)


def idem() -> dict[str, str]:
    return {"Idempotency-Key": uuid.uuid4().hex}


async def api(gateway: Gateway, method: str, path: str, role: Role = Role.TELLER, headers: dict[str, str] | None = None,
              **kwargs: Any) -> Any:
    response = await gateway.client.request(method, path, headers={**gateway.auth(role), **(headers or {})},
                                            **kwargs)
    assert response.status < 300, await response.text()
    return await response.json()


async def new_wallet(gateway: Gateway, holder: str = "Wang Fang", tier: int = 4, cash: int = 0) -> str:
    document = await api(gateway, "POST", "/v1/wallets",
                         json={"holder_name": holder, "phone": "13900139000", "tier": tier, "kind": "personal"})
    from tests.api.support import approve_opened_tier

    wallet_id: str = (await approve_opened_tier(gateway, document))["wallet_id"]
    if cash > gateway.settings.approvals.cash_in_threshold_fen:  # dual control: a second person approves it
        from tests.api.support import approve_as_second_person

        response = await gateway.client.post(f"/v1/wallets/{wallet_id}/cash-in", json={"amount_fen": cash},
                                             headers={**gateway.auth(Role.TELLER), **idem()})
        await approve_as_second_person(gateway, response)
    elif cash:
        await api(gateway, "POST", f"/v1/wallets/{wallet_id}/cash-in", json={"amount_fen": cash}, headers=idem())
    return wallet_id


class Proxy:
    """An HTTP proxy in front of the gateway: ``delay`` slows every answer; ``hold()`` keeps every
    answer back until ``release()`` (``held`` counts the requests waiting); ``stop()`` closes the port
    (connections refused) and ``start()`` opens the same port again."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.delay = 0.0
        self.held = 0
        self._gate = asyncio.Event()
        self._gate.set()
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._session: ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        if self.delay:
            await asyncio.sleep(self.delay)
        if not self._gate.is_set():
            self.held += 1
            try:
                await self._gate.wait()
            finally:
                self.held -= 1
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self._session.request(request.method, self.upstream + request.path_qs, headers=headers,
                                         data=await request.read(), timeout=ClientTimeout(total=30)) as answer:
            body = await answer.read()
            passed = {k: v for k, v in answer.headers.items()
                      if k.lower() not in ("content-length", "transfer-encoding", "content-encoding", "connection")}
            return web.Response(status=answer.status, body=body, headers=passed)

    async def start(self) -> None:
        if self._session is None:
            self._session = ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def close(self) -> None:
        await self.stop()
        if self._session is not None:
            await self._session.close()
            self._session = None


@pytest_asyncio.fixture
async def proxy(tui_gateway: Gateway) -> AsyncIterator[Proxy]:
    started = Proxy(url_of(tui_gateway))
    await started.start()
    yield started
    await started.close()


def press_all(keys: Iterable[str]) -> list[str]:
    return list(keys)
