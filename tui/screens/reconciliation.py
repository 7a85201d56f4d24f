"""Reconciliation: the open discrepancies that device syncs flagged, each with its evidence, and
their resolution by a supervisor with a note (the gateway audits every resolution)."""

from __future__ import annotations

import json
from typing import ClassVar

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.message import Message
from textual.widgets import DataTable, Input, Label, Static

from tui.base import ActionModal, ActionResult, FieldSpec, TellerScreen
from tui.client import ApiError, new_idempotency_key
from tui.format import grouped, money, short_time
from tui.models import Discrepancy

RESOLUTIONS = ("post", "honour", "reject", "acknowledge")  # the gateway's ResolveRequest.resolution


class ReconciliationScreen(TellerScreen):
    SECTION = "reconciliation"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("v", "resolve", "Resolve"),
    ]
    COMMANDS_HERE: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("Resolve the selected discrepancy", "Supervisor: resolution and a note", "resolve"),
    )

    class Loaded(Message):
        def __init__(self, discrepancies: list[Discrepancy]) -> None:
            super().__init__()
            self.discrepancies = discrepancies

    class Resolved(Message):
        def __init__(self, discrepancy: Discrepancy) -> None:
            super().__init__()
            self.discrepancy = discrepancy

    def __init__(self) -> None:
        super().__init__()
        self.discrepancies: list[Discrepancy] = []
        self.available = True

    def compose(self) -> ComposeResult:
        yield from self.compose_nav()
        yield Input(placeholder="/ filter: kind, device, wallet", id="filter")
        table: DataTable[str] = DataTable(id="discrepancies-table", cursor_type="row", zebra_stripes=True)
        table.add_column("Kind", width=18, key="kind")
        table.add_column("Device", width=14, key="device")
        table.add_column("Wallet", width=19, key="wallet")
        table.add_column("Amount", width=12, key="amount")
        table.add_column("Since", width=10, key="since")
        yield table
        with VerticalScroll(id="evidence"):
            yield Static("Select a discrepancy to see its evidence.", id="evidence-text")
        yield Label("", id="reconciliation-status", markup=False)
        yield from self.compose_footer()

    def on_mount(self) -> None:
        self.query_one("#discrepancies-table").focus()
        self.load()

    def action_reload(self) -> None:
        self.load()

    @work(exclusive=True, exit_on_error=False, group="load", name="Discrepancies")
    async def load(self) -> None:
        self.post_message(self.Loaded(await self.client.discrepancies("open")))

    def worker_failed(self, name: str, error: BaseException) -> None:
        if name == "Discrepancies" and isinstance(error, ApiError) and error.kind == "not-available":
            self.available = False
            self.query_one("#reconciliation-status", Label).update(
                "This gateway has no reconciliation API yet (/v1/reconciliation/discrepancies).")

    def on_reconciliation_screen_loaded(self, event: Loaded) -> None:
        self.discrepancies = event.discrepancies
        self._render_table()

    @on(Input.Changed, "#filter")
    def _render_table(self) -> None:
        text = self.filter_text()
        table = self.query_one("#discrepancies-table", DataTable)
        table.clear()
        shown = 0
        for item in self.discrepancies:
            if text and text not in f"{item.kind} {item.device_id} {item.wallet_id}".lower():
                continue
            shown += 1
            table.add_row(item.kind[:18], item.device_id[:14], grouped(item.wallet_id) if item.wallet_id else "—",
                          money(item.amount_fen).rjust(12), short_time(item.created_at)[:10],
                          key=item.discrepancy_id)
        self.query_one("#reconciliation-status", Label).update(
            f"{shown} open discrepanc{'ies' if shown != 1 else 'y'} · v resolves (supervisor)")
        self._show_evidence()

    def selected(self) -> Discrepancy | None:
        table = self.query_one("#discrepancies-table", DataTable)
        if not table.row_count:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return next((d for d in self.discrepancies if d.discrepancy_id == key), None)

    @on(DataTable.RowHighlighted, "#discrepancies-table")
    def _show_evidence(self) -> None:
        item = self.selected()
        panel = self.query_one("#evidence-text", Static)
        if item is None:
            panel.update("No discrepancy selected.")
            return
        evidence = json.dumps(item.evidence, indent=1, ensure_ascii=False, sort_keys=True, default=str)
        panel.update(f"[b]{escape(item.kind)}[/b] · device {escape(item.device_id)} · {money(item.amount_fen)}\n"
                     f"{escape(evidence)}")

    def action_resolve(self) -> None:
        item = self.selected()
        if item is None:
            self.notify("Select a discrepancy first.", timeout=3)
            return
        summary = [("Kind", item.kind), ("Device", item.device_id),
                   ("Wallet", grouped(item.wallet_id) if item.wallet_id else "—"), ("Amount", money(item.amount_fen)),
                   ("Effect", "closes the discrepancy; the resolution and note are audited")]
        fields = [FieldSpec("resolution", "Resolution", " / ".join(RESOLUTIONS), suggestions=RESOLUTIONS,
                            max_length=64, check=lambda text: None if text in RESOLUTIONS
                            else "one of " + ", ".join(RESOLUTIONS)),
                  FieldSpec("note", "Note", "what was checked and decided", max_length=500)]
        self.app.push_screen(ActionModal("Resolve this discrepancy?", summary, fields, confirm_label="Resolve"),
                             lambda result: self._resolve(item, result))

    def _resolve(self, item: Discrepancy, result: ActionResult | None) -> None:
        if result is not None:
            self.resolve(item, result.values["resolution"], result.values["note"], new_idempotency_key())

    @work(exclusive=True, exit_on_error=False, group="resolve", name="Resolve discrepancy")
    async def resolve(self, item: Discrepancy, resolution: str, note: str, idempotency_key: str) -> None:
        resolved = await self.client.resolve_discrepancy(item.discrepancy_id, resolution, note, idempotency_key)
        self.post_message(self.Resolved(resolved))

    def on_reconciliation_screen_resolved(self, event: Resolved) -> None:
        self.notify(f"Discrepancy {event.discrepancy.discrepancy_id} resolved.", title="Resolved", markup=False)
        self.load()
