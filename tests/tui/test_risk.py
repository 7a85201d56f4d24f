"""The Risk screen and the dashboard's risk tile, driven like a supervisor would (Textual pilot), against
a canned gateway whose answers have the shapes of GET /v1/risk/events and POST …/acknowledge."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rich.text import Text
from textual.widgets import DataTable, Static

from tests.tui.canned import RISK_EVENTS, CannedClient
from tests.tui.conftest import has_notification, type_text, wait_for
from tui.app import make_app
from tui.base import ActionModal
from tui.screens.dashboard import DashboardScreen
from tui.screens.risk import RiskScreen


def _app(role: str = "supervisor", refresh: float = 0.2) -> Any:
    return make_app(client=CannedClient(role), refresh_seconds=refresh)


def _rows(app: Any) -> list[list[str]]:
    table = app.screen.query_one("#risk-table", DataTable)
    return [[str(cell) for cell in table.get_row_at(i)] for i in range(table.row_count)]


def _evidence(app: Any) -> str:
    return str(app.screen.query_one("#risk-evidence-text", Static).render())


async def _open_risk(pilot: Any) -> None:
    await pilot.app.switch_mode("dashboard")  # as after a login (the canned client holds a session)
    await pilot.press("k")
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, RiskScreen) and len(_rows(pilot.app)) >= 4,
                   what="the risk list")


async def test_risk_list_newest_first_coloured_with_evidence() -> None:
    """Positive control: the events are listed newest first, each severity in its colour, and the selected
    event's evidence (transfer ids, devices) is shown in full."""
    app = _app()
    async with app.run_test(size=(100, 30)) as pilot:
        await _open_risk(pilot)
        rows = _rows(app)
        assert [row[0] for row in rows] == ["4", "3", "2", "1"]
        assert [row[2] for row in rows] == ["low", "critical", "medium", "high"]
        assert [row[6] for row in rows] == ["open", "open", "ack'd", "open"]
        table = app.screen.query_one("#risk-table", DataTable)
        critical = table.get_row_at(1)[2]
        assert isinstance(critical, Text) and "#c62828" in str(critical.style)
        assert "repeated-refusals" in _evidence(app) and "refusals" in _evidence(app)
        await pilot.press("down")
        await wait_for(pilot, lambda: "d_sim03" in _evidence(app), what="the critical event's evidence")
        assert "payee-of-frozen-devices" in _evidence(app) and "120000" in _evidence(app)
        await pilot.press("down", "down")
        await wait_for(pilot, lambda: "t_a6" in _evidence(app), what="the structuring evidence")


async def test_new_events_appear_while_the_screen_is_open() -> None:
    """Live list: an event the gateway finds after the screen opened shows up at the top by itself, read
    with the cursor (after=<highest seq seen>), not by reading everything again."""
    app = _app()
    async with app.run_test(size=(100, 30)) as pilot:
        await _open_risk(pilot)
        client: CannedClient = app.client
        client.risk_feed.append({**RISK_EVENTS[0], "seq": 5, "event_id": "r_0005", "rule": "velocity",
                                   "severity": "critical", "ts": "2025-01-03T12:00:00.000000Z",
                                   "evidence": {"count": 40, "window": "PT1M"}})
        await wait_for(pilot, lambda: _rows(app)[0][0] == "5", what="the new event on top")
        assert _rows(app)[0][2] == "critical"
        afters = [query.get("after") for path, query in client.queries if path == "/v1/risk/events"]
        assert afters[0] == "0" and "4" in afters


async def test_supervisor_acknowledges_an_open_event() -> None:
    """Positive control: acknowledge asks for confirmation, sends POST …/acknowledge with the note and shows
    the event as the gateway now has it."""
    app = _app("supervisor")
    async with app.run_test(size=(100, 30)) as pilot:
        await _open_risk(pilot)
        await pilot.press("a")
        await wait_for(pilot, lambda: isinstance(app.screen, ActionModal), what="the confirmation")
        await type_text(pilot, "called the branch")
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, RiskScreen) and _rows(app)[0][6] == "ack'd",
                       what="the acknowledged status")
        client: CannedClient = app.client
        posts = [(path, body) for method, path, body in client.sent if method == "POST"]
        assert posts == [("/v1/risk/events/r_0004/acknowledge", b'{"note": "called the branch"}')]
        assert has_notification(app, "acknowledged")
        assert "supervisor1" in _evidence(app)


async def test_a_refused_acknowledgement_is_shown_and_nothing_changes() -> None:
    """A teller silencing a risk alert: the gateway refuses (403) and the screen says so; the event stays
    open in the list."""
    app = _app("teller")
    async with app.run_test(size=(100, 30)) as pilot:
        await _open_risk(pilot)
        await pilot.press("a")
        await wait_for(pilot, lambda: isinstance(app.screen, ActionModal), what="the confirmation")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: has_notification(app, "not allowed"), what="the refusal")
        assert _rows(app)[0][6] == "open"


async def test_an_event_already_acknowledged_is_not_sent_again() -> None:
    """Acknowledging twice would audit a second, meaningless decision: the screen says it is done already."""
    app = _app("supervisor")
    async with app.run_test(size=(100, 30)) as pilot:
        await _open_risk(pilot)
        await pilot.press("down", "down")  # seq 2, acknowledged
        await pilot.press("a")
        await wait_for(pilot, lambda: has_notification(app, "acknowledged already"), what="the notice")
        assert not isinstance(app.screen, ActionModal)
        assert not [sent for sent in app.client.sent if sent[0] == "POST"]


async def test_filter_narrows_the_list() -> None:
    app = _app()
    async with app.run_test(size=(100, 30)) as pilot:
        await _open_risk(pilot)
        await pilot.press("slash")
        await type_text(pilot, "critical")
        await wait_for(pilot, lambda: [row[0] for row in _rows(app)] == ["3"], what="the filtered list")


async def test_dashboard_tile_counts_the_last_day_by_severity() -> None:
    """The dashboard tile counts the events of the last 24 hours per severity and names the newest; for a
    role the gateway refuses it says so instead of showing zeros."""
    app = _app("supervisor", refresh=3600)
    async with app.run_test(size=(100, 30)) as pilot:
        await app.switch_mode("dashboard")
        await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen), what="the dashboard")
        screen: DashboardScreen = app.screen
        screen.now = lambda: datetime(2025, 1, 3, 18, 0, tzinfo=UTC)
        screen.risk_cursor = 0
        screen.refresh_now()
        tile = lambda: str(screen.query_one("#risk-summary", Static).render())  # noqa: E731
        await wait_for(pilot, lambda: "1 critical" in tile(), what="the risk tile")
        assert "1 high" in tile() and "1 medium" in tile() and "1 low" in tile() and "0 info" in tile()
        assert "repeated-refusals" in tile()
        screen.now = lambda: datetime(2025, 1, 5, 18, 0, tzinfo=UTC)  # two days later: nothing recent
        screen.refresh_now()
        await wait_for(pilot, lambda: "none in 24 h" in tile(), what="the tile emptied")
