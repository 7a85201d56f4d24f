"""Risk: the events the gateway's risk monitor found, live (polled with ``GET /v1/risk/events?after=``),
newest first and coloured by severity; the selected event's evidence; acknowledgement by a supervisor or
an auditor (the gateway decides who may, and audits it)."""

from __future__ import annotations

import json
from typing import ClassVar

from rich.markup import escape
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.message import Message
from textual.widgets import DataTable, Input, Label, Static

from tui.base import ActionModal, ActionResult, FieldSpec, TellerScreen, teller
from tui.client import ApiError, new_idempotency_key
from tui.format import severity_style, short_time
from tui.models import RiskEvent

PAGE = 200
PAGES_PER_POLL = 10  # a long backlog is caught up over several polls, never in one long request chain
KEPT = 1000  # the newest events kept in memory and shown


class RiskScreen(TellerScreen):
    SECTION = "risk"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("a", "acknowledge", "Acknowledge"),
    ]
    COMMANDS_HERE: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("Acknowledge the selected risk event", "Supervisor or auditor: seen, being looked at", "acknowledge"),
        ("Fetch risk events now", "Poll the gateway for new risk events", "reload"),
    )

    class Polled(Message):
        def __init__(self, events: list[RiskEvent], cursor: int) -> None:
            super().__init__()
            self.events = events
            self.cursor = cursor

    class Acknowledged(Message):
        def __init__(self, event: RiskEvent) -> None:
            super().__init__()
            self.event = event

    def __init__(self) -> None:
        super().__init__()
        self.events: dict[str, RiskEvent] = {}
        self.cursor = 0  # the highest seq read
        self.available = True

    def compose(self) -> ComposeResult:
        yield from self.compose_nav()
        yield Input(placeholder="/ filter: severity, rule, subject, status", id="filter")
        table: DataTable[str | Text] = DataTable(id="risk-table", cursor_type="row", zebra_stripes=True)
        table.add_column("Seq", width=4, key="seq")
        table.add_column("Time", width=11, key="ts")
        table.add_column("Severity", width=8, key="severity")
        table.add_column("Rule", width=15, key="rule")
        table.add_column("Sc.", width=3, key="score")
        table.add_column("Subject", width=14, key="subject")
        table.add_column("Status", width=8, key="status")
        yield table
        with VerticalScroll(id="risk-evidence"):
            yield Static("Select an event to see its evidence.", id="risk-evidence-text")
        yield Label("", id="risk-status", markup=False)
        yield from self.compose_footer()

    def on_mount(self) -> None:
        self.query_one("#risk-table").focus()
        self.poll()
        self.set_interval(teller(self).refresh_seconds, self.poll)

    def action_reload(self) -> None:
        self.poll()

    @work(exclusive=True, exit_on_error=False, group="refresh", name="Risk events")
    async def poll(self) -> None:
        found: list[RiskEvent] = []
        cursor = self.cursor
        for _ in range(PAGES_PER_POLL):
            page = await self.client.risk_events(cursor, PAGE)
            found += page.events
            if page.events:
                cursor = max(cursor, max(event.seq for event in page.events))
            if page.next_after is None or not page.events:
                break
        self.post_message(self.Polled(found, cursor))

    def worker_failed(self, name: str, error: BaseException) -> None:
        if name == "Risk events" and isinstance(error, ApiError) and error.kind == "not-available":
            self.available = False
            self.query_one("#risk-status", Label).update("This gateway has no risk events API (/v1/risk/events).")

    def on_risk_screen_polled(self, message: Polled) -> None:
        teller(self).recovered()
        self.cursor = message.cursor
        if not message.events and self.events:
            return
        for event in message.events:
            self.events[event.event_id] = event
        if len(self.events) > KEPT:
            newest = sorted(self.events.values(), key=lambda e: e.seq)[-KEPT:]
            self.events = {event.event_id: event for event in newest}
        self._render_table()

    def shown(self) -> list[RiskEvent]:
        text = self.filter_text()
        events = sorted(self.events.values(), key=lambda e: e.seq, reverse=True)
        return [e for e in events if not text or text in f"{e.severity} {e.rule} {e.subject} {e.status}".lower()]

    @on(Input.Changed, "#filter")
    def _render_table(self) -> None:
        table = self.query_one("#risk-table", DataTable)
        selected = self.selected()
        table.clear()
        events = self.shown()
        for event in events:
            table.add_row(str(event.seq), short_time(event.ts)[-11:], Text(event.severity, style=severity_style(
                event.severity)), event.rule[:15], str(event.score), event.subject[:14], self._status(event),
                key=event.event_id)
        if selected is not None and selected.event_id in self.events:
            row = next((i for i, e in enumerate(events) if e.event_id == selected.event_id), None)
            if row is not None:
                table.move_cursor(row=row)
        counts = {severity: sum(1 for e in self.events.values() if e.severity == severity and e.status == "open")
                  for severity in ("critical", "high")}
        self.query_one("#risk-status", Label).update(
            f"{len(events)} shown · open: {counts['critical']} critical, {counts['high']} high · "
            f"polled every {teller(self).refresh_seconds:g} s · a acknowledges")
        self._show_evidence()

    @staticmethod
    def _status(event: RiskEvent) -> Text:
        label = {"acknowledged": "ack'd"}.get(event.status, event.status)
        return Text(label[:8], style="bold" if event.status == "open" else "dim")

    def selected(self) -> RiskEvent | None:
        table = self.query_one("#risk-table", DataTable)
        if not table.row_count:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return self.events.get(str(key))

    @on(DataTable.RowHighlighted, "#risk-table")
    def _show_evidence(self) -> None:
        event = self.selected()
        panel = self.query_one("#risk-evidence-text", Static)
        if event is None:
            panel.update("No risk event selected." if self.available else "")
            return
        evidence = json.dumps(event.evidence, indent=1, ensure_ascii=False, sort_keys=True, default=str)
        style = severity_style(event.severity)
        severity = f"[{style}]{escape(event.severity)}[/]" if style else escape(event.severity)
        panel.update(f"{severity} [b]{escape(event.rule)}[/b] v{event.rule_version} · score {event.score} · "
                     f"{escape(event.subject)} · {escape(event.status)}"
                     f"{' · ' + escape(event.assignee) if event.assignee else ''} · {escape(event.ts)}\n"
                     f"{escape(evidence)}")

    def action_acknowledge(self) -> None:
        event = self.selected()
        if event is None:
            self.notify("Select a risk event first.", timeout=3)
            return
        if event.status != "open":
            self.notify(f"This event is {event.status} already.", timeout=4, markup=False)
            return
        summary = [("Event", f"#{event.seq} {event.rule} ({event.severity}, score {event.score})"),
                   ("Subject", event.subject), ("Effect", "marks it acknowledged; the gateway audits who did")]
        fields = [FieldSpec("note", "Note", "what is being looked at", required=False, max_length=500)]
        self.app.push_screen(ActionModal("Acknowledge this risk event?", summary, fields, confirm_label="Acknowledge"),
                             lambda result: self._acknowledge(event, result))

    def _acknowledge(self, event: RiskEvent, result: ActionResult | None) -> None:
        if result is not None:
            self.acknowledge(event, result.values.get("note", ""), new_idempotency_key())

    @work(exclusive=True, exit_on_error=False, group="acknowledge", name="Acknowledge risk event")
    async def acknowledge(self, event: RiskEvent, note: str, idempotency_key: str) -> None:
        answered = await self.client.acknowledge_risk_event(event.event_id, note, idempotency_key)
        if answered is None:  # the gateway said yes without the document: show what it did
            answered = RiskEvent(event.seq, event.event_id, event.ts, event.rule, event.rule_version, event.severity,
                                 event.score, event.subject, event.evidence, "acknowledged", event.assignee)
        self.post_message(self.Acknowledged(answered))

    def on_risk_screen_acknowledged(self, message: Acknowledged) -> None:
        self.events[message.event.event_id] = message.event
        self.notify(f"Risk event #{message.event.seq} acknowledged.", title="Acknowledged", markup=False)
        self._render_table()
