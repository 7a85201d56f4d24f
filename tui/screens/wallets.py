"""Wallets: search and filter, open a new wallet, and a wallet's detail screen with its balances,
paged transactions, freeze/unfreeze, tier change and cash in/out.

Every change goes through a confirmation that says what will happen. Cash in/out carry an
idempotency key made when the teller confirms; a retry (``R``) after a transient failure sends the
same key, so the gateway posts it at most once.
"""

from __future__ import annotations

from typing import ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import DataTable, Input, Label, Static

from tui.base import ActionModal, ActionResult, FieldSpec, TellerScreen, teller
from tui.client import new_idempotency_key
from tui.format import grouped, money, parse_money, short_time, tier_summary
from tui.models import Approval, CashResult, TransactionPage, Wallet

SEARCH_DELAY = 0.25  # seconds of quiet typing before the search goes to the gateway


def _check_money(text: str) -> str | None:
    try:
        parse_money(text)
    except ValueError as error:
        return str(error)
    return None


def _check_phone(text: str) -> str | None:
    digits = text[1:] if text.startswith("+") else text
    return None if digits.isdigit() and 6 <= len(digits) <= 20 else "a phone number is 6–20 digits, + allowed first"


def _check_id_number(text: str) -> str | None:
    return None if text.isalnum() and text.isascii() and 6 <= len(text) <= 32 else "6–32 letters or digits"


def _check_kind(text: str) -> str | None:
    return None if text in ("personal", "corporate") else "personal or corporate"


class WalletsScreen(TellerScreen):
    SECTION = "wallets"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("n", "open_wallet", "New wallet"),
        Binding("enter", "show_wallet", "Open", show=True),
    ]
    COMMANDS_HERE: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("Open a new wallet", "Holder, phone, tier and kind; confirmed before it is opened", "open_wallet"),
        ("Search wallets", "Focus the filter (/)", "filter"),
    )

    class Loaded(Message):
        def __init__(self, wallets: list[Wallet]) -> None:
            super().__init__()
            self.wallets = wallets

    class Opened(Message):
        def __init__(self, wallet: Wallet) -> None:
            super().__init__()
            self.wallet = wallet

    def __init__(self) -> None:
        super().__init__()
        self.wallets: list[Wallet] = []

    def compose(self) -> ComposeResult:
        yield from self.compose_nav()
        yield Input(placeholder="/ search: wallet id, holder name or phone", id="filter")
        table: DataTable[str] = DataTable(id="wallets-table", cursor_type="row", zebra_stripes=True)
        table.add_column("Wallet id", width=19, key="id")
        table.add_column("Holder", width=20, key="holder")
        table.add_column("Tier", width=4, key="tier")
        table.add_column("Status", width=7, key="status")
        table.add_column("Balance", width=15, key="balance")
        yield table
        yield Label("", id="wallets-status", markup=False)
        yield from self.compose_footer()

    def on_mount(self) -> None:
        self.query_one("#wallets-table").focus()
        self.search("")

    def on_screen_resume(self) -> None:
        if self.wallets:
            self.search(self.filter_text(), delay=0)

    def action_reload(self) -> None:
        self.search(self.filter_text(), delay=0)

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.search(event.value.strip())

    @on(Input.Submitted, "#filter")
    def _filter_submitted(self) -> None:
        self.query_one("#wallets-table").focus()

    @work(exclusive=True, exit_on_error=False, group="search", name="Search wallets")
    async def search(self, query: str, delay: float = SEARCH_DELAY) -> None:
        if delay:
            import asyncio

            await asyncio.sleep(delay)  # a newer keystroke cancels this exclusive worker first
        wallets = await self.client.search_wallets(query.replace(" ", "") if query.replace(" ", "").isdigit()
                                                   else query)
        self.post_message(self.Loaded(wallets))

    def on_wallets_screen_loaded(self, event: Loaded) -> None:
        self.wallets = event.wallets
        table = self.query_one("#wallets-table", DataTable)
        table.clear()
        for wallet in event.wallets:
            table.add_row(grouped(wallet.wallet_id), wallet.holder_name[:20], str(wallet.tier), wallet.status,
                          money(wallet.balance_fen).rjust(15), key=wallet.wallet_id)
        query = self.filter_text()
        shown = f"{len(event.wallets)} wallet{'s' if len(event.wallets) != 1 else ''}"
        self.query_one("#wallets-status", Label).update(shown + (f" matching “{query}”" if query else ""))

    @on(DataTable.RowSelected, "#wallets-table")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value:
            self.app.push_screen(WalletDetailScreen(event.row_key.value))

    def action_show_wallet(self) -> None:
        table = self.query_one("#wallets-table", DataTable)
        if table.row_count:
            key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
            if key:
                self.app.push_screen(WalletDetailScreen(key))

    def action_open_wallet(self) -> None:
        fields = [
            FieldSpec("holder_name", "Holder name", "as on the identity document", max_length=128),
            FieldSpec("phone", "Phone", "13800138000", restrict=r"\+?[0-9]*", max_length=21, check=_check_phone),
            FieldSpec("id_number", "Identity number", "6–32 letters or digits", required=False,
                      restrict=r"[0-9A-Za-z]*", max_length=32, check=_check_id_number),
            FieldSpec("tier", "Tier (1–4)", "4", value="4", restrict=r"[1-4]?", max_length=1),
            FieldSpec("kind", "Kind", "personal or corporate", value="personal", suggestions=("personal", "corporate"),
                      check=_check_kind),
        ]
        self.app.push_screen(ActionModal("Open a new wallet", fields=fields, confirm_label="Next"), self._confirm_open)

    def _confirm_open(self, result: ActionResult | None) -> None:
        if result is None:
            return
        values = result.values
        summary = [("Holder", values["holder_name"]), ("Phone", values["phone"]),
                   ("Identity no.", values["id_number"] or "—"), ("Kind", values["kind"]),
                   ("Tier", tier_summary(int(values["tier"]))),
                   ("Result", "a new wallet with a 16-digit id, balance ¥0.00")]

        def confirmed(answer: ActionResult | None) -> None:
            if answer is not None:
                self.open_wallet(values, new_idempotency_key())

        self.app.push_screen(ActionModal("Open this wallet?", summary, confirm_label="Open wallet"), confirmed)

    @work(exclusive=True, exit_on_error=False, group="open", name="Open wallet")
    async def open_wallet(self, values: dict[str, str], idempotency_key: str) -> None:
        wallet = await self.client.open_wallet(values["holder_name"], values["phone"], int(values["tier"]),
                                               values["kind"], values["id_number"] or None, idempotency_key)
        self.post_message(self.Opened(wallet))

    def on_wallets_screen_opened(self, event: Opened) -> None:
        self.notify(f"Wallet {grouped(event.wallet.wallet_id)} opened for {event.wallet.holder_name}.",
                    title="Wallet opened", markup=False)
        upgrade = event.wallet.tier_approval
        if upgrade is not None:
            self.notify(f"It is tier {event.wallet.tier} for now: tier 1 is pending approval {upgrade.approval_id} "
                        "(a supervisor decides it).", title="Pending approval", markup=False, timeout=15)
        self.app.push_screen(WalletDetailScreen(event.wallet.wallet_id))


class WalletDetailScreen(TellerScreen):
    """One wallet: balances, status, and its transactions page by page."""

    SECTION = "wallets"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back"),
        Binding("i", "cash('in')", "Cash in"),
        Binding("o", "cash('out')", "Cash out"),
        Binding("f", "freeze", "Freeze/unfreeze"),
        Binding("t", "tier", "Tier"),
        Binding("right_square_bracket", "page(1)", "Next page", key_display="]"),
        Binding("left_square_bracket", "page(-1)", "Prev page", key_display="["),
    ]
    COMMANDS_HERE: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("Cash in", "Credit this wallet", "cash('in')"),
        ("Cash out", "Debit this wallet", "cash('out')"),
        ("Freeze or unfreeze", "Change this wallet's status", "freeze"),
        ("Change tier", "Move this wallet to another tier", "tier"),
    )

    class WalletLoaded(Message):
        def __init__(self, wallet: Wallet) -> None:
            super().__init__()
            self.wallet = wallet

    class PageLoaded(Message):
        def __init__(self, page: TransactionPage, index: int) -> None:
            super().__init__()
            self.page = page
            self.index = index

    class CashPosted(Message):
        def __init__(self, direction: str, result: CashResult | Approval) -> None:
            super().__init__()
            self.direction = direction
            self.result = result

    class TierPending(Message):
        def __init__(self, approval: Approval, tier: int) -> None:
            super().__init__()
            self.approval = approval
            self.tier = tier

    class WalletChanged(Message):
        def __init__(self, wallet: Wallet, what: str) -> None:
            super().__init__()
            self.wallet = wallet
            self.what = what

    def __init__(self, wallet_id: str) -> None:
        super().__init__()
        self.wallet_id = wallet_id
        self.wallet: Wallet | None = None
        self.cursors: list[str | None] = [None]  # cursor of each page seen; page i starts at cursors[i]
        self.page_index = 0
        self.next_cursor: str | None = None

    def compose(self) -> ComposeResult:
        yield from self.compose_nav()
        with Vertical(id="wallet-head"):
            yield Static(f"Wallet [b]{grouped(self.wallet_id)}[/b]", id="wallet-title")
            with Horizontal(id="wallet-balances"):
                yield Static("Available …", id="balance-available", classes="balance")
                yield Static("Offline reserve …", id="balance-reserve", classes="balance")
            yield Static("", id="wallet-facts")
        table: DataTable[str] = DataTable(id="transactions-table", cursor_type="row", zebra_stripes=True)
        table.add_column("Date", width=16, key="date")
        table.add_column("Kind", width=10, key="kind")
        table.add_column("Account", width=7, key="account")
        table.add_column("Amount", width=14, key="amount")
        table.add_column("Reference", width=22, key="reference")
        yield table
        yield Label("", id="transactions-status", markup=False)
        yield from self.compose_footer()

    def on_mount(self) -> None:
        self.query_one("#transactions-table").focus()
        self.reload()

    def action_reload(self) -> None:
        self.reload()

    def reload(self) -> None:
        self.load_wallet()
        self.load_page(self.page_index)

    def action_back(self) -> None:
        self.app.pop_screen()

    @work(exclusive=True, exit_on_error=False, group="wallet", name="Load wallet")
    async def load_wallet(self) -> None:
        self.post_message(self.WalletLoaded(await self.client.wallet(self.wallet_id)))

    @work(exclusive=True, exit_on_error=False, group="page", name="Load transactions")
    async def load_page(self, index: int) -> None:
        page = await self.client.transactions(self.wallet_id, self.cursors[index])
        self.post_message(self.PageLoaded(page, index))

    def on_wallet_detail_screen_wallet_loaded(self, event: WalletLoaded) -> None:
        wallet = self.wallet = event.wallet
        status = {"active": "[green]active[/]", "frozen": "[b red]FROZEN[/]", "closed": "[dim]closed[/]"}.get(
            wallet.status, wallet.status)
        self.query_one("#wallet-title", Static).update(
            f"Wallet [b]{grouped(wallet.wallet_id)}[/b] · {_escape(wallet.holder_name)} · {status}")
        self.query_one("#balance-available", Static).update(f"Available [b]{money(wallet.balance_fen)}[/b]")
        self.query_one("#balance-reserve", Static).update(
            f"Offline reserve [b]{money(wallet.offline_reserve_fen)}[/b]")
        facts = f"Tier {wallet.tier} · {wallet.kind} · phone {wallet.phone}"
        if wallet.id_number:
            facts += f" · ID {wallet.id_number}"
        if wallet.status_reason:
            facts += f" · reason: {wallet.status_reason}"
        self.query_one("#wallet-facts", Static).update(_escape(facts))

    def on_wallet_detail_screen_page_loaded(self, event: PageLoaded) -> None:
        self.page_index = event.index
        self.next_cursor = event.page.next_cursor
        if event.page.next_cursor and len(self.cursors) == event.index + 1:
            self.cursors.append(event.page.next_cursor)
        table = self.query_one("#transactions-table", DataTable)
        table.clear()
        for item in event.page.transactions:
            table.add_row(short_time(item.created_at), item.kind, item.account, money(item.amount_fen).rjust(14),
                          item.reference[:22], key=str(item.posting_id))
        more = " · ] next page" if event.page.next_cursor else ""
        back = " · [ previous page" if event.index else ""
        count = len(event.page.transactions)
        self.query_one("#transactions-status", Label).update(
            f"Transactions page {event.index + 1} ({count} posting{'s' if count != 1 else ''}){more}{back}")

    def action_page(self, step: int) -> None:
        target = self.page_index + step
        if target < 0 or target >= len(self.cursors) or (step > 0 and not self.next_cursor):
            self.notify("No more pages that way.", timeout=3)
            return
        self.load_page(target)

    # -- cash --

    def action_cash(self, direction: str) -> None:
        verb = "Cash in" if direction == "in" else "Cash out"
        self.app.push_screen(
            ActionModal(f"{verb} — wallet {grouped(self.wallet_id)}",
                        fields=[FieldSpec("amount", "Amount in yuan", "100.00", restrict=r"[0-9.,¥]*",
                                          max_length=20, check=_check_money)],
                        confirm_label="Next"),
            lambda result: self._confirm_cash(direction, result))

    def _confirm_cash(self, direction: str, result: ActionResult | None) -> None:
        if result is None:
            return
        amount = parse_money(result.values["amount"])
        wallet = self.wallet
        verb = "Cash in" if direction == "in" else "Cash out"
        summary = [("Wallet", grouped(self.wallet_id)), ("Holder", wallet.holder_name if wallet else "?"),
                   ("Amount", money(amount))]
        if wallet is not None:
            after = wallet.balance_fen + (amount if direction == "in" else -amount)
            summary.append(("Balance", f"{money(wallet.balance_fen)} → {money(after)}"))
            if direction == "in":
                summary.append(("Takes", f"cash {money(amount)} from the customer"))
            else:
                summary.append(("Gives", f"cash {money(amount)} to the customer"))

        def confirmed(answer: ActionResult | None) -> None:
            if answer is not None:
                self.cash(direction, amount, new_idempotency_key())

        self.app.push_screen(ActionModal(f"{verb} {money(amount)}?", summary, confirm_label=verb), confirmed)

    @work(exclusive=True, exit_on_error=False, group="cash", name="Cash")
    async def cash(self, direction: str, amount: int, idempotency_key: str) -> None:
        try:
            result = await self.client.cash(direction, self.wallet_id, amount, idempotency_key)
        except Exception as error:
            verb = "Cash in" if direction == "in" else "Cash out"
            self.keep_for_retry(f"{verb} {money(amount)}", lambda: self.cash(direction, amount, idempotency_key),
                                error)
            raise
        self.post_message(self.CashPosted(direction, result))

    def on_wallet_detail_screen_cash_posted(self, event: CashPosted) -> None:
        result = event.result
        if isinstance(result, Approval):  # above a threshold: requested, not carried out
            verb = "Cash in" if event.direction == "in" else "Cash out"
            amount = result.payload.get("amount_fen")
            self.notify(f"{verb} {money(amount) if isinstance(amount, int) else ''} is pending approval "
                        f"{result.approval_id}: nothing moved yet; a supervisor decides it.",
                        title="Pending approval", markup=False, timeout=15)
        else:
            verb = "Cashed in" if event.direction == "in" else "Cashed out"
            self.notify(f"{verb} {money(result.amount_fen)}. New balance {money(result.balance_fen)}.",
                        title="Posted", markup=False)
        self.pending = None
        self.refresh_bindings()
        self.reload()

    # -- status and tier --

    def action_freeze(self) -> None:
        wallet = self.wallet
        if wallet is None:
            return
        if wallet.status == "closed":
            self.notify("A closed wallet stays closed.", severity="warning")
            return
        freeze = wallet.status == "active"
        target = "frozen" if freeze else "active"
        summary = [("Wallet", grouped(wallet.wallet_id)), ("Holder", wallet.holder_name),
                   ("Status", f"{wallet.status} → {target}"),
                   ("Effect", "it can neither send nor receive until unfrozen" if freeze
                    else "it can send and receive again (supervisors only)")]
        title = "Freeze this wallet?" if freeze else "Unfreeze this wallet?"
        self.app.push_screen(
            ActionModal(title, summary, [FieldSpec("reason", "Reason", "why (goes to the audit log)", max_length=500)],
                        confirm_label="Freeze" if freeze else "Unfreeze", danger=freeze),
            lambda result: self._set_status(target, result))

    def _set_status(self, status: str, result: ActionResult | None) -> None:
        if result is not None:
            self.change_status(status, result.values["reason"], new_idempotency_key())

    @work(exclusive=True, exit_on_error=False, group="status", name="Change status")
    async def change_status(self, status: str, reason: str, idempotency_key: str) -> None:
        wallet = await self.client.set_status(self.wallet_id, status, reason, idempotency_key)
        self.post_message(self.WalletChanged(wallet, "frozen" if status == "frozen" else "unfrozen"))

    def action_tier(self) -> None:
        wallet = self.wallet
        if wallet is None:
            return
        self.app.push_screen(
            ActionModal(f"Change tier — now {tier_summary(wallet.tier)}",
                        fields=[FieldSpec("tier", "New tier (1–4)", "1–4", restrict=r"[1-4]?", max_length=1)],
                        confirm_label="Next"),
            self._confirm_tier)

    def _confirm_tier(self, result: ActionResult | None) -> None:
        wallet = self.wallet
        if result is None or wallet is None:
            return
        tier = int(result.values["tier"])
        summary = [("Wallet", grouped(wallet.wallet_id)), ("Tier", f"{wallet.tier} → {tier}"),
                   ("Limits", tier_summary(tier)), ("Balance", money(wallet.balance_fen))]

        def confirmed(answer: ActionResult | None) -> None:
            if answer is not None:
                self.change_tier(tier, new_idempotency_key())

        self.app.push_screen(ActionModal(f"Move to tier {tier}?", summary, confirm_label="Change tier"), confirmed)

    @work(exclusive=True, exit_on_error=False, group="tier", name="Change tier")
    async def change_tier(self, tier: int, idempotency_key: str) -> None:
        wallet = await self.client.set_tier(self.wallet_id, tier, idempotency_key)
        if isinstance(wallet, Approval):  # an upgrade to tier 1 waits for a second person
            self.post_message(self.TierPending(wallet, tier))
        else:
            self.post_message(self.WalletChanged(wallet, f"moved to tier {tier}"))

    def on_wallet_detail_screen_tier_pending(self, event: TierPending) -> None:
        self.notify(f"Tier {event.tier} is pending approval {event.approval.approval_id}: the wallet keeps its "
                    "tier until a supervisor approves it.", title="Pending approval", markup=False, timeout=15)

    def on_wallet_detail_screen_wallet_changed(self, event: WalletChanged) -> None:
        self.notify(f"Wallet {grouped(event.wallet.wallet_id)} {event.what}.", title="Done", markup=False)
        self.post_message(self.WalletLoaded(event.wallet))


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


__all__ = ["WalletDetailScreen", "WalletsScreen", "teller"]
