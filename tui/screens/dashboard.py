"""Dashboard: HSM and store health, signing rate, pending approvals, open discrepancies and the last 24
hours' risk events per severity.

A timer starts one refresh worker every ``refresh_seconds``; an exclusive worker replaces a refresh
still waiting on a slow gateway, so input is never blocked and requests never pile up. The rate is
the change in ``ecny_signatures_total`` between two samples divided by the time between them. Risk events
are read incrementally (``GET /v1/risk/events?after=``, a few pages per refresh) and counted while they are
less than a day old.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import ClassVar

from textual import work
from textual.app import ComposeResult
from textual.containers import Grid, Vertical
from textual.message import Message
from textual.widgets import Label, Sparkline, Static

from tui.base import TellerScreen, teller
from tui.client import ApiError, gather_results
from tui.format import SEVERITY_STYLES, short_time
from tui.models import MetricsSample, Readiness, RiskEvent

HISTORY = 60  # samples kept for the sparkline
RISK_WINDOW = timedelta(hours=24)
RISK_PAGES = 5  # per refresh: a long backlog is caught up over several refreshes
RISK_PAGE = 200


@dataclass(frozen=True)
class RiskRead:
    """Risk events read in one refresh, and the cursor after them."""

    events: tuple[RiskEvent, ...]
    cursor: int


def risk_since(now: datetime) -> str:
    """The start of the tile's window, written as the gateway writes times (so the two compare as text)."""
    return (now - RISK_WINDOW).astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def risk_tile(events: dict[str, RiskEvent], now: datetime) -> str:
    """The tile's text: events less than ``RISK_WINDOW`` old per severity (most alarming first), and the newest."""
    since = risk_since(now)
    recent = [e for e in events.values() if e.ts >= since]
    parts = []
    for severity in reversed(SEVERITY_STYLES):
        count = sum(1 for e in recent if e.severity == severity)
        style = SEVERITY_STYLES[severity] if count else "dim"
        parts.append(f"[{style}]● {count} {severity}[/]")
    newest = max(recent, key=lambda e: e.seq, default=None)
    last = f"newest: {newest.rule} ({newest.severity}) {short_time(newest.ts)}" if newest else "none in 24 h"
    return "  ".join(parts) + f"\n[dim]{last} · k opens the list[/]"


@dataclass(frozen=True)
class Snapshot:
    readiness: Readiness | ApiError
    metrics: MetricsSample | ApiError
    pending_approvals: int | ApiError
    open_discrepancies: int | ApiError
    taken_at: float
    risk: RiskRead | ApiError | None = None


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
        self.risk_events: dict[str, RiskEvent] = {}  # less than a day old, by event id
        self.risk_cursor = 0
        self.now: Callable[[], datetime] = lambda: datetime.now(UTC)

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
            with Vertical(classes="card", id="card-risk") as card:
                card.border_title = "Risk events · 24 h"
                yield Static("…", id="risk-summary")
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

        async def risk() -> RiskRead:
            cursor = self.risk_cursor
            found: list[RiskEvent] = []
            for _ in range(RISK_PAGES):
                page = await client.risk_events(cursor, RISK_PAGE, timeout=timeout)
                found += page.events
                cursor = max([cursor, *(event.seq for event in page.events)])
                if page.next_after is None or not page.events:
                    break
            return RiskRead(tuple(found), cursor)

        readiness, metrics, approvals, open_discrepancies, risk_read = await gather_results(
            client.readiness(timeout=timeout), client.metrics(timeout=timeout), pending(), discrepancies(), risk())
        snapshot = Snapshot(readiness, metrics, approvals, open_discrepancies, time.monotonic(), risk_read)
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
        self._show_risk(snapshot.risk)

    def _show_risk(self, read: RiskRead | ApiError | None) -> None:
        tile = self.query_one("#risk-summary", Static)
        if isinstance(read, ApiError):
            tile.update(self._count(read))
            return
        now = self.now()
        if read is not None:
            self.risk_cursor = max(self.risk_cursor, read.cursor)
            self.risk_events.update((event.event_id, event) for event in read.events)
        since = risk_since(now)
        self.risk_events = {key: e for key, e in self.risk_events.items() if e.ts >= since}
        tile.update(risk_tile(self.risk_events, now))

    @staticmethod
    def _count(value: int | ApiError) -> str:
        if isinstance(value, int):
            return f"[b]{value}[/b]"
        if value.kind == "not-available":
            return "[dim]n/a — not offered by this gateway[/]"
        if value.kind == "forbidden":
            return "[dim]n/a — not for this role[/]"
        return f"[yellow]? {value.detail}[/]"
