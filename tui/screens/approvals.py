"""Approvals (maker-checker): the decoded payload of each request — wallets and amounts, or chain,
token, recipient and amount — and approve/reject by a supervisor other than the requester.

The decision is bound to the payload shown: the hash sent is computed here from the decoded payload,
so the gateway refuses it if what it would execute differs from what the supervisor read. Whether
the user may decide (and not decide their own request) is the API's call; a refusal is shown.
"""

from __future__ import annotations

from typing import ClassVar

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.message import Message
from textual.widgets import DataTable, Input, Label, Static

from tui.base import ActionModal, ActionResult, FieldSpec, TellerScreen, teller
from tui.client import new_idempotency_key
from tui.format import describe_payload, payload_summary, short_time
from tui.models import Approval

STATUSES = ("pending", "all")


class ApprovalsScreen(TellerScreen):
    SECTION = "approvals"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("a", "decide(True)", "Approve"),
        Binding("x", "decide(False)", "Reject"),
        Binding("s", "toggle_status", "Pending/all"),
    ]
    COMMANDS_HERE: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("Approve the selected request", "Shows the decoded payload first", "decide(True)"),
        ("Reject the selected request", "Shows the decoded payload first", "decide(False)"),
        ("Show pending or all approvals", "Toggle the list", "toggle_status"),
    )

    class Loaded(Message):
        def __init__(self, approvals: list[Approval]) -> None:
            super().__init__()
            self.approvals = approvals

    class Decided(Message):
        def __init__(self, approval: Approval, approved: bool) -> None:
            super().__init__()
            self.approval = approval
            self.approved = approved

    def __init__(self) -> None:
        super().__init__()
        self.status = "pending"
        self.approvals: list[Approval] = []

    def compose(self) -> ComposeResult:
        yield from self.compose_nav()
        yield Input(placeholder="/ filter: kind, wallet, requester", id="filter")
        table: DataTable[str] = DataTable(id="approvals-table", cursor_type="row", zebra_stripes=True)
        table.add_column("Kind", width=10, key="kind")
        table.add_column("What", width=34, key="what")
        table.add_column("Requested by", width=14, key="by")
        table.add_column("Status", width=9, key="status")
        yield table
        with VerticalScroll(id="approval-detail"):
            yield Static("Select a request to see what it does.", id="approval-payload")
        yield Label("", id="approvals-status", markup=False)
        yield from self.compose_footer()

    def on_mount(self) -> None:
        self.query_one("#approvals-table").focus()
        self.load()

    def on_screen_resume(self) -> None:
        if self.approvals:
            self.load()

    def action_reload(self) -> None:
        self.load()

    def action_toggle_status(self) -> None:
        self.status = STATUSES[(STATUSES.index(self.status) + 1) % len(STATUSES)]
        self.load()

    @work(exclusive=True, exit_on_error=False, group="load", name="Load approvals")
    async def load(self) -> None:
        self.post_message(self.Loaded(await self.client.approvals(self.status)))

    def on_approvals_screen_loaded(self, event: Loaded) -> None:
        self.approvals = event.approvals
        self._render_table()

    @on(Input.Changed, "#filter")
    def _filtered(self) -> None:
        self._render_table()

    def _render_table(self) -> None:
        table = self.query_one("#approvals-table", DataTable)
        text = self.filter_text()
        table.clear()
        shown = 0
        for approval in self.approvals:
            what = payload_summary(approval.kind, approval.payload)
            haystack = " ".join([approval.kind, what, approval.requested_by, approval.status,
                                 *map(str, approval.payload.values())]).lower()
            if text and text not in haystack:
                continue
            shown += 1
            table.add_row(approval.kind[:10], what[:34], approval.requested_by[:14], approval.status,
                          key=approval.approval_id)
        self.query_one("#approvals-status", Label).update(
            f"{shown} {self.status} approval{'s' if shown != 1 else ''} · s toggles pending/all")
        self._show_selected()

    def selected(self) -> Approval | None:
        table = self.query_one("#approvals-table", DataTable)
        if not table.row_count:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return next((a for a in self.approvals if a.approval_id == key), None)

    @on(DataTable.RowHighlighted, "#approvals-table")
    def _highlighted(self) -> None:
        self._show_selected()

    def _show_selected(self) -> None:
        approval = self.selected()
        panel = self.query_one("#approval-payload", Static)
        if approval is None:
            panel.update("No request selected.")
            return
        lines = [f"[b]{escape(label)}[/b]  {escape(value)}" for label, value in
                 describe_payload(approval.kind, approval.payload)]
        check = ("[green]payload hash matches what is shown[/]" if approval.hash_matches
                 else "[b red]payload hash does NOT match what is shown: do not approve[/]")
        lines.append(f"[dim]{approval.kind} · requested by {escape(approval.requested_by)} · expires "
                     f"{short_time(approval.expires_at)} · {check}[/]")
        if approval.status != "pending":
            lines.append(f"[dim]{approval.status} by {escape(approval.decided_by or '?')}"
                         f"{' — ' + escape(approval.note) if approval.note else ''}[/]")
        panel.update("\n".join(lines))

    def action_decide(self, approve: bool) -> None:
        approval = self.selected()
        if approval is None:
            self.notify("Select a request first.", timeout=3)
            return
        if approval.status != "pending":
            self.notify(f"This request is {approval.status}.", severity="warning", timeout=4)
            return
        if not approval.hash_matches:
            self.notify("The payload's hash does not match what is shown; refusing to send a decision.",
                        severity="error", title="Payload mismatch")
            return
        verb = "Approve" if approve else "Reject"
        summary = [*describe_payload(approval.kind, approval.payload), ("Requested by", approval.requested_by),
                   ("Effect", "the operation is executed now" if approve else "the operation will not happen")]
        self.app.push_screen(
            ActionModal(f"{verb} this {approval.kind}?", summary,
                        [FieldSpec("note", "Note", "for the audit log", required=False, max_length=500)],
                        confirm_label=verb, danger=not approve),
            lambda result: self._decided(approval, approve, result))

    def _decided(self, approval: Approval, approve: bool, result: ActionResult | None) -> None:
        if result is not None:
            self.decide(approval, approve, result.values.get("note", ""), new_idempotency_key())

    @work(exclusive=True, exit_on_error=False, group="decide", name="Decision")
    async def decide(self, approval: Approval, approve: bool, note: str, idempotency_key: str) -> None:
        decided = await self.client.decide(approval, approve, note, idempotency_key)
        self.post_message(self.Decided(decided, approve))

    def on_approvals_screen_decided(self, event: Decided) -> None:
        approval = event.approval
        if event.approved:
            text = f"Approved: {approval.status}."
            if approval.status == "failed" and approval.result:
                text += f" Reasons: {', '.join(map(str, approval.result.get('reasons', [])))}"
        else:
            text = "Rejected."
        self.notify(text, title=payload_summary(approval.kind, approval.payload), markup=False)
        self.load()


__all__ = ["ApprovalsScreen", "teller"]
