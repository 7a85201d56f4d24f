"""Dashboard: HSM and store health, signing rate, pending approvals and open discrepancies.

A timer starts one refresh worker every ``refresh_seconds``; an exclusive worker replaces a refresh
still waiting on a slow gateway, so input is never blocked and requests never pile up. The rate is
the change in ``ecny_signatures_total`` between two samples divided by the time between them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

from textual import work
from textual.app import ComposeResult
from textual.containers import Grid, Vertical
from textual.message import Message
from textual.widgets import Label, Sparkline, Static

from tui.base import TellerScreen, teller
from tui.client import ApiError, gather_results
from tui.models import MetricsSample, Readiness

HISTORY = 60  # samples kept for the sparkline


@dataclass(frozen=True)
class Snapshot:
    readiness: Readiness | ApiError
    metrics: MetricsSample | ApiError
    pending_approvals: int | ApiError
    open_discrepancies: int | ApiError
    taken_at: float


class DashboardScreen(TellerScreen):
    SECTION = "dashboard"
    COMMANDS_HERE: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("Refresh dashboard", "Fetch health, metrics and counts now", "reload"),
    )

    class Refreshed(Message):
        def __init__(self, snapshot: Snapshot) -> None:
            super().__init__()
            self.snapshot = snapshot

    def __init__(self) -> None:
        super().__init__()
        self.rates: list[float] = []
        self.previous: tuple[float, float] | None = None  # (taken_at, signatures_total)

    def compose(self) -> ComposeResult:
        yield from self.compose_nav()
        with Grid(id="dashboard-grid"):
            with Vertical(classes="card", id="card-health") as card:
                card.border_title = "Health"
                yield Static("HSM    …", id="hsm-state")
                yield Static("Store  …", id="store-state")
            with Vertical(classes="card", id="card-rate") as card:
                card.border_title = "Signing rate"
                yield Sparkline([], id="rate-sparkline", summary_function=max)
                yield Static("… sig/s", id="rate-text")
            with Vertical(classes="card", id="card-approvals") as card:
                card.border_title = "Pending approvals"
                yield Static("…", id="approvals-count", classes="big-number")
            with Vertical(classes="card", id="card-discrepancies") as card:
                card.border_title = "Open discrepancies"
                yield Static("…", id="discrepancies-count", classes="big-number")
        yield Label(self._status_line(), id="dashboard-status", markup=False)
        yield from self.compose_footer()

    def _status_line(self) -> str:
        app = teller(self)
        return f"Gateway {app.client.base_url} · refreshed every {app.refresh_seconds:g} s"

    def on_mount(self) -> None:
        self.refresh_now()
        self.set_interval(teller(self).refresh_seconds, self.refresh_now)

    def action_reload(self) -> None:
        self.refresh_now()

    def refresh_now(self) -> None:
        self.refresh_dashboard()

    @work(exclusive=True, exit_on_error=False, group="refresh", name="Dashboard")
    async def refresh_dashboard(self) -> None:
        client = self.client
        timeout = max(1.0, min(5.0, teller(self).refresh_seconds * 2))

        async def pending() -> int:
            return len(await client.approvals("pending"))

        async def discrepancies() -> int:
            return len(await client.discrepancies("open"))

        readiness, metrics, approvals, open_discrepancies = await gather_results(
            client.readiness(timeout=timeout), client.metrics(timeout=timeout), pending(), discrepancies())
        snapshot = Snapshot(readiness, metrics, approvals, open_discrepancies, time.monotonic())
        # Being unreachable or logged out is a failure of the whole refresh (reported once, by kind).
        for part in (readiness, metrics, approvals):
            if isinstance(part, ApiError) and part.kind in ("unreachable", "session-expired", "unavailable"):
                if not (part.kind == "unavailable" and isinstance(readiness, Readiness)):
                    raise part
        self.post_message(self.Refreshed(snapshot))

    def on_dashboard_screen_refreshed(self, event: Refreshed) -> None:
        snapshot = event.snapshot
        teller(self).recovered()
        readiness = snapshot.readiness
        if isinstance(readiness, Readiness):
            hsm = (f"[green]● ready[/] {readiness.hsm_workers_up}/{readiness.hsm_workers} workers"
                   if readiness.hsm_ready else f"[red]● down[/] {readiness.hsm_detail or 'not ready'}")
            store = "[green]● ready[/]" if readiness.store_ready else "[red]● down[/]"
        else:
            hsm = store = f"[yellow]? {readiness.detail}[/]"
        self.query_one("#hsm-state", Static).update(f"HSM    {hsm}")
        self.query_one("#store-state", Static).update(f"Store  {store}")

        metrics = snapshot.metrics
        if isinstance(metrics, MetricsSample):
            if self.previous is not None:
                elapsed = snapshot.taken_at - self.previous[0]
                delta = metrics.signatures_total - self.previous[1]
                if elapsed > 0 and delta >= 0:  # a restarted gateway resets its counters: skip that sample
                    self.rates = [*self.rates, delta / elapsed][-HISTORY:]
            self.previous = (snapshot.taken_at, metrics.signatures_total)
            self.query_one("#rate-sparkline", Sparkline).data = list(self.rates)
            last = self.rates[-1] if self.rates else 0.0
            peak = max(self.rates) if self.rates else 0.0
            self.query_one("#rate-text", Static).update(
                f"{last:,.1f} sig/s now · peak {peak:,.1f} · {metrics.signatures_total:,.0f} total")
        else:
            self.query_one("#rate-text", Static).update(f"metrics: {metrics.detail}")

        self.query_one("#approvals-count", Static).update(self._count(snapshot.pending_approvals))
        self.query_one("#discrepancies-count", Static).update(self._count(snapshot.open_discrepancies))

    @staticmethod
    def _count(value: int | ApiError) -> str:
        if isinstance(value, int):
            return f"[b]{value}[/b]"
        if value.kind == "not-available":
            return "[dim]n/a — not offered by this gateway[/]"
        if value.kind == "forbidden":
            return "[dim]n/a — not for this role[/]"
        return f"[yellow]? {value.detail}[/]"
