"""Audit log for auditors: entries page by page, and verification of the hash chain and its
HSM-signed checkpoints (done by the gateway; the result is shown as it reports it)."""

from __future__ import annotations

import json
from typing import ClassVar

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.message import Message
from textual.widgets import DataTable, Input, Label, Static

from tui.base import TellerScreen
from tui.models import AuditPage, AuditVerification

PAGE = 100


class AuditScreen(TellerScreen):
    SECTION = "audit"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("v", "verify", "Verify chain"),
        Binding("right_square_bracket", "page(1)", "Next page", key_display="]"),
        Binding("left_square_bracket", "page(-1)", "Prev page", key_display="["),
    ]
    COMMANDS_HERE: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("Verify the audit chain", "Hash chain and HSM-signed checkpoints", "verify"),
    )

    class PageLoaded(Message):
        def __init__(self, page: AuditPage, index: int) -> None:
            super().__init__()
            self.page = page
            self.index = index

    class Verified(Message):
        def __init__(self, report: AuditVerification) -> None:
            super().__init__()
            self.report = report

    def __init__(self) -> None:
        super().__init__()
        self.starts: list[int] = [0]  # after_seq of each page seen
        self.index = 0
        self.page: AuditPage | None = None

    def compose(self) -> ComposeResult:
        yield from self.compose_nav()
        yield Static("Chain: not verified yet — press v", id="audit-verification")
        yield Input(placeholder="/ filter this page: actor, action, decision", id="filter")
        table: DataTable[str] = DataTable(id="audit-table", cursor_type="row", zebra_stripes=True)
        table.add_column("Seq", width=6, key="seq")
        table.add_column("Time", width=16, key="ts")
        table.add_column("Actor", width=16, key="actor")
        table.add_column("Action", width=20, key="action")
        table.add_column("Decision", width=10, key="decision")
        yield table
        yield Static("", id="audit-entry")
        yield Label("", id="audit-status", markup=False)
        yield from self.compose_footer()

    def on_mount(self) -> None:
        self.query_one("#audit-table").focus()
        self.load(0)

    def action_reload(self) -> None:
        self.load(self.index)

    @work(exclusive=True, exit_on_error=False, group="load", name="Read audit log")
    async def load(self, index: int) -> None:
        self.post_message(self.PageLoaded(await self.client.audit(self.starts[index], PAGE), index))

    def on_audit_screen_page_loaded(self, event: PageLoaded) -> None:
        self.page, self.index = event.page, event.index
        if event.page.next_after_seq is not None and len(self.starts) == event.index + 1:
            self.starts.append(event.page.next_after_seq)
        self._render_table()

    @on(Input.Changed, "#filter")
    def _render_table(self) -> None:
        if self.page is None:
            return
        text = self.filter_text()
        table = self.query_one("#audit-table", DataTable)
        table.clear()
        for entry in self.page.entries:
            if text and text not in f"{entry.actor} {entry.role} {entry.action} {entry.decision}".lower():
                continue
            table.add_row(str(entry.seq), entry.ts.replace("T", " ")[:16], entry.actor[:16], entry.action[:20],
                          entry.decision[:10], key=str(entry.seq))
        entries = self.page.entries
        span = f"{entries[0].seq}–{entries[-1].seq}" if entries else "none"
        more = " · ] next" if self.page.next_after_seq is not None else ""
        self.query_one("#audit-status", Label).update(f"Page {self.index + 1}: entries {span}{more}")
        self._show_entry()

    @on(DataTable.RowHighlighted, "#audit-table")
    def _show_entry(self) -> None:
        table = self.query_one("#audit-table", DataTable)
        panel = self.query_one("#audit-entry", Static)
        if self.page is None or not table.row_count:
            panel.update("")
            return
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        entry = next((e for e in self.page.entries if str(e.seq) == key), None)
        if entry is None:
            panel.update("")
            return
        reasons = ", ".join(entry.reasons) or "—"
        result = json.dumps(entry.result, ensure_ascii=False, sort_keys=True)
        panel.update(f"[b]{entry.role}[/b] · reasons: {escape(reasons)} · key {escape(entry.key_id or '—')}\n"
                     f"[dim]{escape(result[:300])}[/]")

    def action_page(self, step: int) -> None:
        target = self.index + step
        if 0 <= target < len(self.starts):
            self.load(target)
        else:
            self.notify("No more pages that way.", timeout=3)

    def action_verify(self) -> None:
        self.query_one("#audit-verification", Static).update("Chain: verifying…")
        self.verify()

    @work(exclusive=True, exit_on_error=False, group="verify", name="Verify audit chain")
    async def verify(self) -> None:
        self.post_message(self.Verified(await self.client.verify_audit()))

    def worker_failed(self, name: str, error: BaseException) -> None:
        if name == "Verify audit chain":
            self.query_one("#audit-verification", Static).update("Chain: verification failed to run — see the notice")

    def on_audit_screen_verified(self, event: Verified) -> None:
        report = event.report
        if report.ok:
            text = (f"[green]Chain intact[/]: {report.entries} entries, {report.checkpoints} signed checkpoints, "
                    f"head {report.head_seq}")
            self.notify(f"Audit chain intact ({report.entries} entries).", title="Verified", markup=False)
        else:
            text = f"[b red]Chain BROKEN[/] at entry {report.first_bad_seq}: {escape(report.problem)}"
            self.notify(f"Audit chain broken at entry {report.first_bad_seq}: {report.problem}",
                        title="Audit chain", severity="error", timeout=15, markup=False)
        if report.warnings:
            text += f" [yellow]({escape('; '.join(report.warnings))})[/]"
        self.query_one("#audit-verification", Static).update(text)
