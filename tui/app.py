"""ecny-teller: ``make_app(gateway_url)`` builds the app (tests drive it with ``App.run_test()``);
``main()`` is the console script.

Sections are Textual modes, each with its own screen stack, reached by one key (shown on the top
line), by ``:`` or ctrl+p (the command palette). Logging out or an expired session returns to the
login screen and drops every other section's screens, so the next user starts clean.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable
from typing import Any, ClassVar

from textual.binding import Binding, BindingType
from textual.screen import Screen

from tui import hangup
from tui.base import SECTIONS, TellerBase
from tui.client import DEFAULT_GATEWAY, GatewayClient
from tui.screens.approvals import ApprovalsScreen
from tui.screens.audit import AuditScreen
from tui.screens.dashboard import DashboardScreen
from tui.screens.devices import DevicesScreen
from tui.screens.login import LoginScreen
from tui.screens.reconciliation import ReconciliationScreen
from tui.screens.risk import RiskScreen
from tui.screens.wallets import WalletsScreen

SECTION_SCREENS: dict[str, Callable[[], Screen[Any]]] = {
    "dashboard": DashboardScreen,
    "wallets": WalletsScreen,
    "devices": DevicesScreen,
    "reconciliation": ReconciliationScreen,
    "approvals": ApprovalsScreen,
    "audit": AuditScreen,
    "risk": RiskScreen,
}


class TellerApp(TellerBase):
    CSS_PATH = "teller.tcss"
    TITLE = "ecny-teller"
    DEFAULT_MODE = "login"
    MODES: ClassVar[dict[str, str | Callable[[], Screen[Any]]]] = {"login": LoginScreen, **SECTION_SCREENS}
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("colon", "command_palette", "Commands", key_display=":"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
        *(Binding(key, f"go('{mode}')", label, show=False) for mode, key, label in SECTIONS),
    ]

    def on_mount(self) -> None:
        if self.is_headless:  # tests: no terminal to lose
            return
        # A handler replaces an inherited "ignore SIGHUP" (nohup): without a terminal there is no teller.
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.hang_up)
        self.set_interval(hangup.CHECK_SECONDS, self._check_terminal, name="terminal watch")

    def _check_terminal(self) -> None:
        if sys.__stdin__ is not None and hangup.terminal_lost(sys.__stdin__.fileno()):
            self.hang_up()

    def hang_up(self) -> None:
        """The terminal is gone: exit (and end the process if the exit hangs on the dead terminal)."""
        hangup.end_after_grace()
        self.exit(return_code=hangup.HANGUP_STATUS)

    async def on_unmount(self) -> None:
        await self.client.close()


def make_app(gateway_url: str = DEFAULT_GATEWAY, *, client: GatewayClient | None = None,
             refresh_seconds: float = 2.0, timeout: float = 10.0) -> TellerApp:
    """The teller app for ``gateway_url`` (or for a given client, e.g. a test double)."""
    return TellerApp(client or GatewayClient(gateway_url, timeout=timeout), refresh_seconds=refresh_seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ecny-teller", description="Teller terminal for the e-CNY gateway")
    parser.add_argument("--gateway", default=DEFAULT_GATEWAY, metavar="URL",
                        help=f"the gateway's base URL (default {DEFAULT_GATEWAY})")
    parser.add_argument("--refresh", type=float, default=2.0, metavar="SECONDS",
                        help="dashboard refresh interval (default 2)")
    args = parser.parse_args(argv)
    app = make_app(args.gateway, refresh_seconds=max(0.5, args.refresh))
    app.run()
    return app.return_code or 0


if __name__ == "__main__":
    raise SystemExit(main())
