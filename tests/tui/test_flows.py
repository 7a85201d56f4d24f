"""Pilot tests: every screen's main flow, driven by keys, against a real gateway (SoftHSM, SQLite)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from textual.command import CommandPalette
from textual.widgets import Sparkline, Static

from gateway.auth.roles import Role
from gateway.runtime import RUNTIME
from tests.conftest import Gateway
from tests.tui.conftest import (
    api,
    cell_texts,
    has_notification,
    idem,
    login,
    new_wallet,
    open_filtered,
    screen_text,
    teller_app,
    type_text,
    url_of,
    wait_for,
)
from tui.client import GatewayClient, Response
from tui.format import grouped
from tui.screens.approvals import ApprovalsScreen
from tui.screens.audit import AuditScreen
from tui.screens.devices import DevicesScreen
from tui.screens.login import LoginScreen
from tui.screens.reconciliation import ReconciliationScreen
from tui.screens.wallets import WalletDetailScreen, WalletsScreen

pytestmark = pytest.mark.softhsm


def runtime_app(gateway: Gateway) -> web.Application:
    server = gateway.client.server
    assert isinstance(server, TestServer)
    return server.app


async def test_a_throttled_login_says_when_to_try_again(tui_gateway: Gateway) -> None:
    username = "throttled" + "".join(chr(ord("a") + b % 26) for b in os.urandom(6))
    for _ in range(5):  # [auth] login_max_attempts: the next attempt is refused until the lockout ends
        response = await tui_gateway.client.post("/v1/sessions", json={"username": username, "password": "wrong"})
        assert response.status == 401
    app = teller_app(tui_gateway)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.query_one("#username").has_focus)
        await type_text(pilot, username)
        await pilot.press("enter")
        await type_text(pilot, "wrong")
        await pilot.press("enter")
        await wait_for(pilot, lambda: "Too many attempts: try again in" in screen_text(app), what="throttle message")
        assert isinstance(app.screen, LoginScreen)


async def test_login_refuses_a_wrong_password_then_shows_the_dashboard(tui_gateway: Gateway) -> None:
    pending = len((await api(tui_gateway, "GET", "/v1/approvals"))["approvals"])
    app = teller_app(tui_gateway)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.query_one("#username").has_focus)
        await type_text(pilot, "teller1")
        await pilot.press("enter")
        await type_text(pilot, "wrong")
        await pilot.press("enter")
        await wait_for(pilot, lambda: "Wrong username or password" in screen_text(app), what="refusal")
        assert isinstance(app.screen, LoginScreen)
        await pilot.press("d")  # navigation keys do nothing before a login
        assert isinstance(app.screen, LoginScreen)

        app.query_one("#password").value = ""  # type: ignore[attr-defined]
        app.query_one("#username").value = ""  # type: ignore[attr-defined]
        app.query_one("#username").focus()
        await login(pilot, "teller1")
        await wait_for(pilot, lambda: "● ready" in screen_text(app), what="HSM and store health")
        text = screen_text(app)
        assert "HSM    ● ready 2/2 workers" in text and "Store  ● ready" in text
        assert "teller1·teller" in text
        await wait_for(pilot, lambda: str(app.screen.query_one("#approvals-count", Static).render()) == str(pending),
                       what="pending approvals count")
        # The signing rate comes from /metrics deltas: sign a batch and watch the rate and the sparkline.
        key = await api(tui_gateway, "POST", "/v1/keys", role=Role.ADMIN,
                        json={"label": "tui-rate", "algorithm": "ecdsa-p256", "usage": ["raw"]})
        before = screen_text(app)
        await api(tui_gateway, "POST", "/v1/sign/batch", role=Role.BACKEND,
                  json={"key_id": key["key_id"], "digests": ["11" * 32] * 200})
        await wait_for(pilot, lambda: "peak 0.0" not in screen_text(app), what="a signing rate above zero")
        assert "peak 0.0" in before
        sparkline = app.screen.query_one("#rate-sparkline", Sparkline)
        assert sparkline.data and max(sparkline.data) > 0


async def fill_new_wallet_form(app: Any, pilot: Any, holder_name: str, *, tier: int) -> None:
    """From the wallets section, fill the new-wallet form (no identity number, kind personal) up to
    its confirmation."""
    await pilot.press("w")
    await wait_for(pilot, lambda: isinstance(app.screen, WalletsScreen))
    await pilot.press("n")
    await wait_for(pilot, lambda: app.screen.query("#field-holder_name"), what="new wallet form")
    await type_text(pilot, holder_name)
    await pilot.press("enter")
    await type_text(pilot, "13800138000")
    await pilot.press("enter", "enter")  # no identity number
    await pilot.press("backspace", str(tier), "enter", "enter")  # the tier, kind personal
    await wait_for(pilot, lambda: "Open this wallet?" in screen_text(app), what="confirmation")


async def test_open_a_wallet_cash_in_and_out_with_confirmations(tui_gateway: Gateway) -> None:
    app = teller_app(tui_gateway)
    async with app.run_test(size=(80, 24)) as pilot:
        await login(pilot, "teller1")
        await fill_new_wallet_form(app, pilot, "Zhang San", tier=3)
        text = screen_text(app)
        assert "Zhang San" in text and "tier 3" in text and "¥0.00" in text
        await pilot.press("y")
        await wait_for(pilot, lambda: isinstance(app.screen, WalletDetailScreen), what="the new wallet")
        screen = app.screen
        assert isinstance(screen, WalletDetailScreen)
        wallet_id = screen.wallet_id
        assert grouped(wallet_id) in screen_text(app)
        assert len(grouped(wallet_id).split(" ")) == 4
        await wait_for(pilot, lambda: "Available ¥0.00" in screen_text(app))

        await pilot.press("i")
        await wait_for(pilot, lambda: app.screen.query("#field-amount"))
        await type_text(pilot, "1,234.50")
        await pilot.press("enter")
        await wait_for(pilot, lambda: "Cash in ¥1,234.50?" in screen_text(app))
        assert "¥0.00 → ¥1,234.50" in screen_text(app)
        await pilot.press("enter")  # the confirm button has the focus
        await wait_for(pilot, lambda: "Available ¥1,234.50" in screen_text(app), what="new balance")
        assert has_notification(app, "Posted", "¥1,234.50")
        await wait_for(pilot, lambda: len(cell_texts(app, "#transactions-table")) == 1, what="posting listed")
        assert cell_texts(app, "#transactions-table")[0][1] == "cash_in"

        await pilot.press("o")
        await wait_for(pilot, lambda: app.screen.query("#field-amount"))
        await type_text(pilot, "34.5")
        await pilot.press("enter")
        await wait_for(pilot, lambda: "Cash out ¥34.50?" in screen_text(app))
        await pilot.press("n")  # changed my mind: nothing happens
        await pilot.pause(0.3)
        assert "Available ¥1,234.50" in screen_text(app)
        await pilot.press("o")
        await wait_for(pilot, lambda: app.screen.query("#field-amount"))
        await type_text(pilot, "34.5")
        await pilot.press("enter")
        await wait_for(pilot, lambda: "Cash out ¥34.50?" in screen_text(app))
        await pilot.press("y")
        await wait_for(pilot, lambda: "Available ¥1,200.00" in screen_text(app))
        document = await api(tui_gateway, "GET", f"/v1/wallets/{wallet_id}")
        assert document["balance_fen"] == 120000 and document["tier"] == 3

        # More than the balance: the gateway refuses; the UI says why and nothing changes.
        await pilot.press("o")
        await wait_for(pilot, lambda: app.screen.query("#field-amount"))
        await type_text(pilot, "5000")
        await pilot.press("enter")
        await wait_for(pilot, lambda: "Cash out ¥5,000.00?" in screen_text(app))
        await pilot.press("y")
        await wait_for(pilot, lambda: has_notification(app, "insufficient-funds"), what="refusal")
        assert "Available ¥1,200.00" in screen_text(app)


async def test_search_freeze_unfreeze_tier_and_pages(tui_gateway: Gateway) -> None:
    wallet_id = await new_wallet(tui_gateway, "Paging Person", tier=4)
    for _ in range(52):  # 52 postings: two pages of 50
        await api(tui_gateway, "POST", f"/v1/wallets/{wallet_id}/cash-in", json={"amount_fen": 100},
                  headers=idem())
    app = teller_app(tui_gateway)
    async with app.run_test(size=(80, 24)) as pilot:
        await login(pilot, "teller1")
        await open_filtered(pilot, "w", WalletsScreen, "Paging")
        await wait_for(pilot, lambda: [r[1] for r in cell_texts(app, "#wallets-table")] == ["Paging Person"],
                       what="search result")
        assert cell_texts(app, "#wallets-table")[0][0] == grouped(wallet_id)
        await pilot.press("enter")  # from the filter back to the table
        await pilot.press("enter")  # open the wallet
        await wait_for(pilot, lambda: isinstance(app.screen, WalletDetailScreen))
        await wait_for(pilot, lambda: len(cell_texts(app, "#transactions-table")) == 50, what="first page")
        assert "page 1" in screen_text(app)
        await pilot.press("right_square_bracket")
        await wait_for(pilot, lambda: len(cell_texts(app, "#transactions-table")) == 2, what="second page")
        await pilot.press("left_square_bracket")
        await wait_for(pilot, lambda: len(cell_texts(app, "#transactions-table")) == 50, what="back to page 1")

        await pilot.press("f")
        await wait_for(pilot, lambda: "Freeze this wallet?" in screen_text(app))
        assert "active → frozen" in screen_text(app)
        await type_text(pilot, "lost phone")
        await pilot.press("enter")
        await wait_for(pilot, lambda: "FROZEN" in screen_text(app), what="frozen")
        # A teller may not unfreeze: the API refuses and the UI shows it.
        await pilot.press("f")
        await wait_for(pilot, lambda: "Unfreeze this wallet?" in screen_text(app))
        await type_text(pilot, "found it")
        await pilot.press("enter")
        await wait_for(pilot, lambda: has_notification(app, "not allowed", "supervisor"), what="403")
        assert "FROZEN" in screen_text(app)

        await pilot.press("t")
        await wait_for(pilot, lambda: app.screen.query("#field-tier"))
        await type_text(pilot, "2")
        await pilot.press("enter")
        await wait_for(pilot, lambda: "Move to tier 2?" in screen_text(app))
        assert "4 → 2" in screen_text(app) and "single ¥50,000.00" in screen_text(app)
        await pilot.press("y")
        await wait_for(pilot, lambda: "Tier 2" in screen_text(app), what="tier changed")
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, WalletsScreen))

    supervisor = teller_app(tui_gateway)
    async with supervisor.run_test(size=(80, 24)) as pilot:
        await login(pilot, "supervisor1")
        await pilot.press("w")
        await wait_for(pilot, lambda: isinstance(supervisor.screen, WalletsScreen))
        supervisor.screen.query_one("#filter").display = True
        await pilot.press("slash")
        await type_text(pilot, wallet_id[:8])
        await wait_for(pilot, lambda: len(cell_texts(supervisor, "#wallets-table")) == 1, what="found by id")
        await pilot.press("enter", "enter")
        await wait_for(pilot, lambda: "FROZEN" in screen_text(supervisor))
        await pilot.press("f")
        await wait_for(pilot, lambda: "Unfreeze this wallet?" in screen_text(supervisor))
        await type_text(pilot, "identity checked")
        await pilot.press("enter")
        await wait_for(pilot, lambda: "active" in screen_text(supervisor) and "FROZEN" not in screen_text(supervisor))
    assert (await api(tui_gateway, "GET", f"/v1/wallets/{wallet_id}"))["status"] == "active"


async def _pending_transfer(gateway: Gateway, role: Role, amount: int = 6_000_000) -> tuple[str, str, str]:
    source = await new_wallet(gateway, "Big Payer", tier=1, cash=amount + 1)
    target = await new_wallet(gateway, "Big Payee", tier=1)
    document = await api(gateway, "POST", "/v1/transfers", role=role,
                         json={"from_wallet": source, "to_wallet": target, "amount_fen": amount, "memo": "house"},
                         headers=idem())
    assert document["status"] == "pending_approval"
    return source, target, document["approval_id"]


async def test_supervisor_approves_a_transfer_shown_decoded(tui_gateway: Gateway) -> None:
    source, target, approval_id = await _pending_transfer(tui_gateway, Role.TELLER)
    app = teller_app(tui_gateway)
    async with app.run_test(size=(80, 24)) as pilot:
        await login(pilot, "supervisor1")
        await open_filtered(pilot, "a", ApprovalsScreen, source[:12])
        await wait_for(pilot, lambda: len(cell_texts(app, "#approvals-table")) == 1, what="the request")
        await pilot.press("enter")
        text = screen_text(app)
        assert grouped(source) in text and grouped(target) in text and "¥60,000.00 CNY" in text
        assert "payload hash matches what is shown" in text
        await pilot.press("a")
        await wait_for(pilot, lambda: "Approve this transfer?" in screen_text(app))
        assert grouped(source) in screen_text(app) and "¥60,000.00" in screen_text(app)
        await type_text(pilot, "called the customer")
        await pilot.press("enter")
        await wait_for(pilot, lambda: has_notification(app, "Approved: executed"), what="approval")
    document = await api(tui_gateway, "GET", f"/v1/approvals/{approval_id}", role=Role.SUPERVISOR)
    assert document["status"] == "executed" and document["note"] == "called the customer"
    assert (await api(tui_gateway, "GET", f"/v1/wallets/{target}"))["balance_fen"] == 6_000_000


async def test_supervisor_approves_an_erc20_transfer_shown_as_the_gateway_decoded_it(tui_gateway: Gateway) -> None:
    """An ERC-20 transfer above the token's approval threshold, from a real gateway: the screen
    shows the recipient inside the calldata (not the token contract the transaction goes to) and
    the amount in tokens; once approved, eth-account and eth-abi read the same out of the signed
    transaction."""
    from eth_abi.abi import decode
    from eth_account import Account
    from eth_account.typed_transactions.typed_transaction import TypedTransaction
    from hexbytes import HexBytes

    from gateway.schemes.evm.values import checksum

    key = await api(tui_gateway, "POST", "/v1/keys", role=Role.ADMIN,
                    json={"label": f"tui-evm-{os.urandom(3).hex()}", "algorithm": "ecdsa-secp256k1",
                          "usage": ["evm"]})
    recipient = checksum(os.urandom(20))
    usdc = "0x1c7D4B196Cb0C7B01d743Fbc6116a902379C7238"  # the Sepolia example token in the shipped registry
    pending = await api(tui_gateway, "POST", "/v1/evm/transactions", role=Role.BACKEND, headers=idem(), json={
        "key_id": key["key_id"], "chain_id": 11155111, "type": "eip1559", "gas_limit": 90_000,
        "max_fee_per_gas": "30000000000", "max_priority_fee_per_gas": "2000000000",
        "erc20": {"token": usdc, "method": "transfer", "to": recipient, "amount": str(150_000 * 10**6)}})
    assert pending["status"] == "pending_approval"
    app = teller_app(tui_gateway)
    async with app.run_test(size=(100, 40)) as pilot:
        await login(pilot, "supervisor1")
        await open_filtered(pilot, "a", ApprovalsScreen, recipient[2:12].lower())
        await wait_for(pilot, lambda: len(cell_texts(app, "#approvals-table")) == 1, what="the request")
        await pilot.press("enter")
        text = screen_text(app)
        assert f"Recipient  {recipient}" in text and "150,000.000000 USDC" in text, text
        assert f"Asset  USDC (token {usdc})" in text and "Sepolia (11155111)" in text
        assert "payload hash matches what is shown" in text
        await pilot.press("a")
        await wait_for(pilot, lambda: "Approve this evm_transaction?" in screen_text(app))
        await type_text(pilot, "treasury confirmed")
        await pilot.press("enter")
        await wait_for(pilot, lambda: has_notification(app, "Approved: executed"), what="approval")
    document = await api(tui_gateway, "GET", f"/v1/approvals/{pending['approval_id']}", role=Role.SUPERVISOR)
    raw = HexBytes(document["result"]["raw_transaction"])
    assert Account.recover_transaction(raw) == key["address"]
    fields = TypedTransaction.from_bytes(raw).as_dict()
    assert checksum(bytes(HexBytes(fields["to"]))) == usdc and fields["chainId"] == 11155111
    to, amount = decode(["address", "uint256"], bytes(HexBytes(fields["data"]))[4:])
    assert (to, amount) == (recipient.lower(), 150_000 * 10**6)


async def test_a_requester_cannot_approve_their_own_request(tui_gateway: Gateway) -> None:
    source, _, approval_id = await _pending_transfer(tui_gateway, Role.SUPERVISOR)  # made by supervisor1
    app = teller_app(tui_gateway)
    async with app.run_test(size=(80, 24)) as pilot:
        await login(pilot, "supervisor1")
        await open_filtered(pilot, "a", ApprovalsScreen, source[:12])
        await wait_for(pilot, lambda: len(cell_texts(app, "#approvals-table")) == 1)
        await pilot.press("enter", "a")
        await wait_for(pilot, lambda: "Approve this transfer?" in screen_text(app))
        await pilot.press("enter")
        await wait_for(pilot, lambda: has_notification(app, "You requested this yourself"), what="refusal")
    assert (await api(tui_gateway, "GET", f"/v1/approvals/{approval_id}", role=Role.SUPERVISOR))["status"] == "pending"

    # A teller sees only the approvals they requested (dual control: supervisor1's is not even listed),
    # and may not decide at all — not even their own.
    hidden = await tui_gateway.client.get(f"/v1/approvals/{approval_id}", headers=tui_gateway.auth(Role.TELLER))
    assert hidden.status == 404
    own_source, _, own_id = await _pending_transfer(tui_gateway, Role.TELLER)  # made by teller1
    rejecter = teller_app(tui_gateway)
    async with rejecter.run_test(size=(80, 24)) as pilot:
        await login(pilot, "teller1")
        await open_filtered(pilot, "a", ApprovalsScreen, own_source[:12])
        await wait_for(pilot, lambda: len(cell_texts(rejecter, "#approvals-table")) == 1)
        await pilot.press("enter", "x")
        await wait_for(pilot, lambda: "Reject this transfer?" in screen_text(rejecter))
        await pilot.press("enter")
        await wait_for(pilot, lambda: has_notification(rejecter, "not allowed"), what="403")
    assert (await api(tui_gateway, "GET", f"/v1/approvals/{approval_id}", role=Role.SUPERVISOR))["status"] == "pending"
    assert (await api(tui_gateway, "GET", f"/v1/approvals/{own_id}", role=Role.SUPERVISOR))["status"] == "pending"


async def test_auditor_pages_the_audit_log_and_verifies_the_chain(tui_gateway: Gateway) -> None:
    entries = (await api(tui_gateway, "GET", "/v1/audit", role=Role.AUDITOR, params={"limit": "1000"}))["entries"]
    for _ in range(max(0, 105 - len(entries)) // 2 + 1):  # more than one page of 100
        await new_wallet(tui_gateway, "Audit Trail", cash=1)
    app = teller_app(tui_gateway)
    async with app.run_test(size=(80, 24)) as pilot:
        await login(pilot, "auditor1")
        await pilot.press("u")
        await wait_for(pilot, lambda: isinstance(app.screen, AuditScreen))
        await wait_for(pilot, lambda: len(cell_texts(app, "#audit-table")) == 100, what="a page of entries")
        assert cell_texts(app, "#audit-table")[0][0] == "1"
        await pilot.press("right_square_bracket")
        await wait_for(pilot, lambda: cell_texts(app, "#audit-table")[0][0] == "101", what="second page")
        await pilot.press("v")
        await wait_for(pilot, lambda: "Chain intact" in screen_text(app), what="verification")
        assert has_notification(app, "Verified", "intact")
        await pilot.press("slash")
        await type_text(pilot, "wallets.open")
        await wait_for(pilot, lambda: all(r[3] == "wallets.open" for r in cell_texts(app, "#audit-table")))


class OlderGateway(GatewayClient):
    """The real gateway, as one without the devices and reconciliation endpoints would answer."""

    async def _send(self, method: str, path: str, **options: Any) -> Response:
        if path.startswith(("/v1/devices", "/v1/reconciliation")):
            problem = {"type": "https://ecny-gateway.dev/problems/not-found", "title": "Not found", "status": 404,
                       "detail": "no such endpoint"}
            return Response(404, "application/problem+json", json.dumps(problem).encode())
        return await super()._send(method, path, **options)


async def test_screens_whose_api_is_missing_say_so(tui_gateway: Gateway) -> None:
    """Against a gateway without the devices and reconciliation APIs, those screens show a
    notification instead of failing."""
    app = teller_app(tui_gateway, client=OlderGateway(url_of(tui_gateway)))
    async with app.run_test(size=(80, 24)) as pilot:
        await login(pilot, "supervisor1")
        await wait_for(pilot, lambda: "not offered by this gateway" in screen_text(app), what="dashboard n/a")
        await pilot.press("r")
        await wait_for(pilot, lambda: isinstance(app.screen, ReconciliationScreen))
        await wait_for(pilot, lambda: has_notification(app, "does not offer this yet"), what="notification")
        assert "no reconciliation API yet" in screen_text(app)
        await pilot.press("h")
        await wait_for(pilot, lambda: isinstance(app.screen, DevicesScreen))
        await pilot.press("g")  # nothing connected yet
        await wait_for(pilot, lambda: has_notification(app, "Connect to a hard wallet first"))


async def test_command_palette_and_colon(tui_gateway: Gateway) -> None:
    app = teller_app(tui_gateway)
    async with app.run_test(size=(80, 24)) as pilot:
        await login(pilot, "teller1")
        await pilot.press("colon")
        await wait_for(pilot, lambda: isinstance(app.screen, CommandPalette), what="command palette")
        await type_text(pilot, "go to wallets")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, WalletsScreen), what="wallets via palette")
        await pilot.press("colon")
        await wait_for(pilot, lambda: isinstance(app.screen, CommandPalette))
        await type_text(pilot, "log out")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, LoginScreen), what="logged out")
        assert "Logged out." in screen_text(app)


async def test_log_out_ends_the_session_on_the_gateway(tui_gateway: Gateway) -> None:
    """A session token outlives its logout: the teller logs out and the token still works."""
    app = teller_app(tui_gateway)
    async with app.run_test(size=(80, 24)) as pilot:
        await login(pilot, "supervisor1")
        assert app.client.session is not None
        token = {"Authorization": f"Bearer {app.client.session.token}"}
        assert (await tui_gateway.client.get("/v1/approvals", headers=token)).status == 200
        await pilot.press("colon")
        await wait_for(pilot, lambda: isinstance(app.screen, CommandPalette), what="command palette")
        await type_text(pilot, "log out")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, LoginScreen), what="logged out")
        assert app.client.session is None
        response = await tui_gateway.client.get("/v1/approvals", headers=token)
        assert response.status == 401, await response.text()  # dead on the gateway, not just forgotten
        await login(pilot, "supervisor1")  # positive control: logging in again works
        await pilot.press("a")
        await wait_for(pilot, lambda: isinstance(app.screen, ApprovalsScreen), what="approvals")


async def test_an_expired_session_returns_to_login_with_a_message(tui_gateway: Gateway) -> None:
    app = teller_app(tui_gateway)
    async with app.run_test(size=(80, 24)) as pilot:
        await login(pilot, "teller1")
        await pilot.press("w")
        await wait_for(pilot, lambda: isinstance(app.screen, WalletsScreen))
        database = runtime_app(tui_gateway)[RUNTIME].database
        assert app.client.session is not None
        # Expire this app's session only: the other tests share teller1's own session.
        token_hash = hashlib.sha256(app.client.session.token.encode()).digest()
        expired = await database.write(lambda tx: tx.execute(
            "UPDATE user_sessions SET expires_at = '2000-01-01T00:00:00Z' WHERE token_hash = ?", (token_hash,)))
        assert expired == 1
        await pilot.press("ctrl+r")  # the next call is refused
        await wait_for(pilot, lambda: isinstance(app.screen, LoginScreen), what="back to the login screen")
        assert "Your session has expired: log in again." in screen_text(app)
        assert app.client.session is None
        await login(pilot, "teller1")  # and a new login works, with fresh screens
        await pilot.press("w")
        await wait_for(pilot, lambda: isinstance(app.screen, WalletsScreen))


async def test_a_large_cash_out_shows_pending_approval_and_moves_nothing(tui_gateway: Gateway) -> None:
    """A 202 shown as a success or an error: the teller believes a ¥60,000 cash-out above the approval
    threshold was paid (and hands over the cash) or failed (and retries)."""
    wallet_id = await new_wallet(tui_gateway, "Large Cash Out", tier=2, cash=7_000_000)
    app = teller_app(tui_gateway)
    async with app.run_test(size=(80, 24)) as pilot:
        await login(pilot, "teller1")
        await open_filtered(pilot, "w", WalletsScreen, "Large Cash")
        await wait_for(pilot, lambda: [r[1] for r in cell_texts(app, "#wallets-table")] == ["Large Cash Out"],
                       what="search result")
        await pilot.press("enter", "enter")  # from the filter to the table, then open the wallet
        await wait_for(pilot, lambda: "Available ¥70,000.00" in screen_text(app), what="the wallet")
        await pilot.press("o")
        await wait_for(pilot, lambda: app.screen.query("#field-amount"))
        await type_text(pilot, "60000")
        await pilot.press("enter")
        await wait_for(pilot, lambda: "Cash out ¥60,000.00?" in screen_text(app))
        await pilot.press("y")
        await wait_for(pilot, lambda: has_notification(app, "pending approval a_"), what="pending approval")
        listed = await api(tui_gateway, "GET", "/v1/approvals", params={"status": "pending"})
        mine = [a for a in listed["approvals"] if a["kind"] == "cash_out" and a["payload"]["wallet_id"] == wallet_id]
        assert len(mine) == 1 and has_notification(app, f"pending approval {mine[0]['approval_id']}")
        assert not has_notification(app, "Cashed out") and not has_notification(app, "failed")
        await pilot.pause(0.3)
        assert "Available ¥70,000.00" in screen_text(app)
        document = await api(tui_gateway, "GET", f"/v1/wallets/{wallet_id}")
        assert document["balance_fen"] == 7_000_000

        # Positive control: below the threshold the cash-out is posted and shown as such.
        await pilot.press("o")
        await wait_for(pilot, lambda: app.screen.query("#field-amount"))
        await type_text(pilot, "100")
        await pilot.press("enter")
        await wait_for(pilot, lambda: "Cash out ¥100.00?" in screen_text(app))
        await pilot.press("y")
        await wait_for(pilot, lambda: "Available ¥69,900.00" in screen_text(app), what="new balance")
        assert has_notification(app, "Cashed out ¥100.00")


async def test_a_wallet_opened_at_tier_1_shows_its_upgrade_pending(tui_gateway: Gateway) -> None:
    """Limits lifted at opening: the teller asks for tier 1 and believes the wallet has no limits;
    it is tier 2 until a second person approves, and the screen says so."""
    app = teller_app(tui_gateway)
    async with app.run_test(size=(80, 24)) as pilot:
        await login(pilot, "teller1")
        await fill_new_wallet_form(app, pilot, "Tier One Teller", tier=1)
        await pilot.press("y")
        await wait_for(pilot, lambda: isinstance(app.screen, WalletDetailScreen), what="the new wallet")
        screen = app.screen
        assert isinstance(screen, WalletDetailScreen)
        await wait_for(pilot, lambda: has_notification(app, "tier 1 is pending approval a_"), what="pending upgrade")
        document = await api(tui_gateway, "GET", f"/v1/wallets/{screen.wallet_id}")
        assert document["tier"] == 2
        listed = await api(tui_gateway, "GET", "/v1/approvals", params={"status": "pending"})
        upgrade = [a for a in listed["approvals"]
                   if a["kind"] == "wallet_tier" and a["payload"]["wallet_id"] == screen.wallet_id]
        assert len(upgrade) == 1 and has_notification(app, upgrade[0]["approval_id"])
