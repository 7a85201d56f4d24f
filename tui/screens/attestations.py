"""Trade-finance attestations: search this bank's attestations by document number, verify an attestation
file (this bank's or an alliance member's; the gateway checks it against the keys it trusts), and the
refused second financings ("duplicate hits"), newest first."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import ClassVar

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.message import Message
from textual.widgets import DataTable, Input, Label, Static

from tui.base import TellerScreen
from tui.models import Attestation, AttestationVerdict, FinancingHit

COSE_SIGN1_TAG_BYTE = 0xD2  # CBOR tag 18: a file holding the raw COSE_Sign1 rather than its base64
MAX_FILE_BYTES = 1 << 20


def read_attestation_file(path: Path) -> str:
    """The attestation in ``path`` as base64: the file holds raw COSE_Sign1 bytes or their base64 text.

    Raises:
        ValueError: unreadable, too large, or neither form.
    """
    try:
        data = path.expanduser().read_bytes()[: MAX_FILE_BYTES + 1]
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"{path} is larger than an attestation can be")
    if data[:1] == bytes([COSE_SIGN1_TAG_BYTE]):
        return base64.b64encode(data).decode()
    text = data.decode("ascii", "replace").strip()
    try:
        base64.b64decode(text, validate=True)
    except ValueError:
        raise ValueError(f"{path} holds neither a COSE_Sign1 nor its base64") from None
    return text


def _amount(minor: int, currency: str) -> str:
    return f"{minor // 100:,}.{minor % 100:02d} {currency}"


class AttestationsScreen(TellerScreen):
    SECTION = "attestations"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("v", "focus_verify", "Verify a file"),
    ]
    COMMANDS_HERE: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("Verify an attestation file", "Check a COSE_Sign1 attestation against the trusted keys", "focus_verify"),
    )

    class Found(Message):
        def __init__(self, attestations: list[Attestation], number: str) -> None:
            super().__init__()
            self.attestations = attestations
            self.number = number

    class HitsLoaded(Message):
        def __init__(self, hits: list[FinancingHit]) -> None:
            super().__init__()
            self.hits = hits

    class Verified(Message):
        def __init__(self, verdict: AttestationVerdict, path: str) -> None:
            super().__init__()
            self.verdict = verdict
            self.path = path

    def compose(self) -> ComposeResult:
        yield from self.compose_nav()
        yield Input(placeholder="/ document number — Enter searches this bank's attestations", id="filter")
        found: DataTable[str] = DataTable(id="attestation-table", cursor_type="row", zebra_stripes=True)
        for label, width in (("Type", 18), ("Purpose", 8), ("Number", 20), ("Issuer tax id", 18),
                             ("Amount", 18), ("Member", 10), ("Created", 16)):
            found.add_column(label, width=width)
        yield found
        yield Input(placeholder="v attestation file (COSE_Sign1 or base64) — Enter verifies", id="verify-file")
        yield Static("", id="verdict")
        yield Label("Duplicate financing hits (newest first)", id="hits-title", markup=False)
        hits: DataTable[str] = DataTable(id="hits-table", cursor_type="row", zebra_stripes=True)
        for label, width in (("Time", 16), ("Type", 18), ("Number", 20), ("Financed by", 12),
                             ("Financed at", 16), ("Refused for", 16)):
            hits.add_column(label, width=width)
        yield hits
        yield Label("", id="attestations-status", markup=False)
        yield from self.compose_footer()

    def on_mount(self) -> None:
        self.query_one("#filter", Input).focus()
        self.load_hits()

    def action_reload(self) -> None:
        self.load_hits()

    def action_focus_verify(self) -> None:
        self.query_one("#verify-file", Input).focus()

    @work(exclusive=True, exit_on_error=False, group="hits", name="Read duplicate hits")
    async def load_hits(self) -> None:
        self.post_message(self.HitsLoaded(await self.client.financing_hits()))

    def on_attestations_screen_hits_loaded(self, event: HitsLoaded) -> None:
        table = self.query_one("#hits-table", DataTable)
        table.clear()
        for hit in event.hits:
            table.add_row(hit.ts.replace("T", " ")[:16], hit.document_type, hit.document_number[:20],
                          hit.financed_by[:12], hit.financed_at.replace("T", " ")[:16], hit.requested_by[:16],
                          key=hit.hit_id)

    @on(Input.Submitted, "#filter")
    def _search(self, event: Input.Submitted) -> None:
        number = event.value.strip()
        if number:
            self.search(number)

    @work(exclusive=True, exit_on_error=False, group="search", name="Search attestations")
    async def search(self, number: str) -> None:
        self.post_message(self.Found(await self.client.search_attestations(number=number), number))

    def on_attestations_screen_found(self, event: Found) -> None:
        table = self.query_one("#attestation-table", DataTable)
        table.clear()
        for item in event.attestations:
            table.add_row(item.document_type, item.purpose, item.number[:20], item.issuer_tax_id[:18],
                          _amount(item.amount_minor, item.currency), item.member_id[:10],
                          item.created_at.replace("T", " ")[:16], key=item.attestation_id)
        self.query_one("#attestations-status", Label).update(
            f"{len(event.attestations)} attestation(s) of {event.number}")

    @on(Input.Submitted, "#verify-file")
    def _verify(self, event: Input.Submitted) -> None:
        path = event.value.strip()
        if not path:
            return
        try:
            attestation = read_attestation_file(Path(path))
        except ValueError as exc:
            self.notify(str(exc), title="Verify", severity="warning", timeout=8, markup=False)
            return
        self.verify(attestation, path)

    @work(exclusive=True, exit_on_error=False, group="verify", name="Verify attestation")
    async def verify(self, attestation: str, path: str) -> None:
        self.post_message(self.Verified(await self.client.verify_attestation(attestation), path))

    def on_attestations_screen_verified(self, event: Verified) -> None:
        verdict = event.verdict
        fields = verdict.claims.get("fields") if isinstance(verdict.claims.get("fields"), dict) else {}
        assert isinstance(fields, dict)
        what = (f"{verdict.claims.get('document_type', '?')} {fields.get('number', '?')} · "
                f"{verdict.claims.get('purpose', '?')} · member {verdict.issuer or '?'}")
        if verdict.valid:
            text = f"[green]Valid[/]: {escape(what)} · key {escape(verdict.kid)}"
        else:
            text = f"[b red]NOT valid[/] ({escape(verdict.reason)}): {escape(what)}"
        self.query_one("#verdict", Static).update(text)
