"""Hard wallets: pick a serial port (the system's, or a typed path such as a simulator's pty), read
the device, register it to a wallet, load offline value, sync its payment log with a progress bar,
and unload it. The serial link is reached only through :mod:`tui.device`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, ClassVar

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import DataTable, Input, Label, ProgressBar, Static

from tui.base import ActionModal, ActionResult, FieldSpec, TellerScreen
from tui.client import ApiError, new_idempotency_key
from tui.device import DeviceInfo, DeviceSession, PortInfo, list_ports
from tui.format import grouped, is_wallet_id, money, normalise_wallet_id, parse_money
from tui.models import Approval, DeviceRecord


def _check_wallet(text: str) -> str | None:
    return None if is_wallet_id(text) else "16 digits whose last is a Luhn check digit"


def _check_money(text: str) -> str | None:
    try:
        parse_money(text)
    except ValueError as error:
        return str(error)
    return None


class DevicesScreen(TellerScreen):
    SECTION = "devices"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("c", "connect", "Connect"),
        Binding("g", "register", "Register"),
        Binding("e", "recertify", "Certify again", show=False),  # a rare act: in the palette, not the footer
        Binding("l", "load", "Load"),
        Binding("s", "sync", "Sync"),
        Binding("x", "unload", "Unload"),
        Binding("p", "scan", "Rescan ports"),
    ]
    COMMANDS_HERE: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("Connect to the hard wallet", "Open the port and read the device", "connect"),
        ("Register the hard wallet", "Bind it to a wallet with an HSM-signed certificate", "register"),
        ("Certify the hard wallet again", "A new certificate under today's voucher key (after a rotation)",
         "recertify"),
        ("Load the hard wallet", "Move value from the wallet to the device", "load"),
        ("Sync the hard wallet", "Upload its offline payment log for reconciliation", "sync"),
        ("Unload the hard wallet", "Final statement: its value goes back to the wallet", "unload"),
    )

    class PortsListed(Message):
        def __init__(self, ports: list[PortInfo]) -> None:
            super().__init__()
            self.ports = ports

    class Connected(Message):
        def __init__(self, info: DeviceInfo, record: DeviceRecord | None, note: str) -> None:
            super().__init__()
            self.info = info
            self.record = record
            self.note = note

    class Done(Message):
        """An operation finished: ``text`` says what happened."""

        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    def __init__(self) -> None:
        super().__init__()
        self.device: DeviceSession | None = None
        self.info: DeviceInfo | None = None
        self.record: DeviceRecord | None = None

    def compose(self) -> ComposeResult:
        yield from self.compose_nav()
        with Horizontal(id="devices-top"):
            with Vertical(id="ports-pane"):
                table: DataTable[str] = DataTable(id="ports-table", cursor_type="row")
                table.add_column("Port", width=14, key="port")
                table.add_column("Description", width=16, key="description")
                yield table
                yield Input(placeholder="or type a path: /dev/pts/3", id="port-path")
            with Vertical(id="device-pane") as pane:
                pane.border_title = "Device"
                yield Static("Not connected. Choose a port and press c.", id="device-info")
        yield ProgressBar(total=100, show_eta=False, id="sync-progress")
        yield Label("", id="sync-stage", markup=False)
        yield from self.compose_footer()

    def on_mount(self) -> None:
        self.query_one("#ports-table").focus()
        self.action_scan()

    async def on_unmount(self) -> None:
        await self._disconnect()

    async def _disconnect(self) -> None:
        if self.device is not None:
            device, self.device = self.device, None
            try:
                await device.close()
            except Exception:  # closing a port that went away: nothing left to do
                pass

    def action_scan(self) -> None:
        self.scan()

    @work(exclusive=True, exit_on_error=False, group="ports", name="List serial ports")
    async def scan(self) -> None:
        self.post_message(self.PortsListed(await asyncio.to_thread(list_ports)))

    def on_devices_screen_ports_listed(self, event: PortsListed) -> None:
        table = self.query_one("#ports-table", DataTable)
        table.clear()
        for port in event.ports:
            table.add_row(port.device[-14:], port.description[:16], key=port.device)
        if not event.ports:
            self.query_one("#port-path", Input).placeholder = "no serial ports found: type a path (/dev/pts/N)"

    @on(DataTable.RowSelected, "#ports-table")
    def _port_chosen(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value:
            self.query_one("#port-path", Input).value = event.row_key.value
            self.action_connect()

    @on(Input.Submitted, "#port-path")
    def _path_typed(self) -> None:
        self.action_connect()

    def _path(self) -> str:
        path = self.query_one("#port-path", Input).value.strip()
        if path:
            return path
        table = self.query_one("#ports-table", DataTable)
        if table.row_count:
            return str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value or "")
        return ""

    def action_connect(self) -> None:
        path = self._path()
        if not path:
            self.notify("Choose a port or type its path.", timeout=4)
            return
        self._stage(f"Connecting to {path}…", 0)
        self.connect(path)

    @work(exclusive=True, exit_on_error=False, group="device", name="Connect")
    async def connect(self, path: str) -> None:
        await self._disconnect()
        device = await DeviceSession.open(path)
        try:
            info = await device.info()
        except BaseException:
            await device.close()
            raise
        self.device = device
        record, note = await self._gateway_record(info.device_id)
        self.post_message(self.Connected(info, record, note))

    async def _gateway_record(self, device_id: str) -> tuple[DeviceRecord | None, str]:
        try:
            return await self.client.device(device_id), ""
        except ApiError as error:
            if error.kind == "not-available":
                return None, "this gateway has no devices API yet"
            if error.status == 404:
                return None, "not registered"
            raise

    def on_devices_screen_connected(self, event: Connected) -> None:
        self.info, self.record = event.info, event.record
        self._stage(f"Connected to {self.device.path if self.device else '?'}", 0)
        self._show()

    def _show(self, note: str = "") -> None:
        info = self.info
        if info is None:
            return
        record = self.record
        gateway = (f"{record.status} · wallet {grouped(record.wallet_id)}" if record is not None
                   else note or "not registered")
        lines = [
            f"[b]{escape(info.device_id)}[/b] · {escape(info.model or 'unknown model')}",
            f"Wallet   {grouped(info.wallet_id) if info.wallet_id else '—'}",
            f"Offline  [b]{money(info.offline_balance_fen)}[/b] · counter {info.counter}",
            f"Cert     {'yes' if info.certified else 'no'}",
            f"Gateway  {escape(gateway)}",
        ]
        self.query_one("#device-info", Static).update("\n".join(lines))

    def _stage(self, text: str, progress: float | None = None) -> None:
        self.query_one("#sync-stage", Label).update(text)
        if progress is not None:
            self.query_one("#sync-progress", ProgressBar).update(progress=progress)

    @staticmethod
    def _then(answer: ActionResult | None, action: Callable[[], object]) -> None:
        if answer is not None:
            action()

    def _need_device(self) -> DeviceSession | None:
        if self.device is None or self.info is None:
            self.notify("Connect to a hard wallet first (c).", timeout=4)
            return None
        return self.device

    def worker_failed(self, name: str, error: BaseException) -> None:
        self._stage(f"{name} failed — see the notification")

    # -- register --

    def action_register(self) -> None:
        if self._need_device() is None or self.info is None:
            return
        info = self.info
        fields = [FieldSpec("wallet_id", "Wallet id", "16 digits", value=info.wallet_id, restrict=r"[0-9 ]*",
                            max_length=19, check=_check_wallet),
                  FieldSpec("model", "Model", "device model", value=info.model, max_length=64)]
        self.app.push_screen(ActionModal(f"Register {info.device_id}", fields=fields, confirm_label="Next"),
                             self._confirm_register)

    def _confirm_register(self, result: ActionResult | None) -> None:
        if result is None or self.info is None:
            return
        wallet_id = normalise_wallet_id(result.values["wallet_id"])
        model = result.values["model"]
        summary = [("Device", self.info.device_id), ("Model", model), ("Wallet", grouped(wallet_id)),
                   ("Effect", "the HSM signs a certificate binding this device's key to the wallet")]
        self.app.push_screen(
            ActionModal("Register this hard wallet?", summary, confirm_label="Register"),
            lambda answer: self._then(answer, lambda: self.register(wallet_id, model, new_idempotency_key())))

    @work(exclusive=True, exit_on_error=False, group="device", name="Register")
    async def register(self, wallet_id: str, model: str, idempotency_key: str) -> None:
        device, info = self.device, self.info
        assert device is not None and info is not None
        self._stage("Registering with the gateway…", 30)
        registration = await self.client.register_device(wallet_id, info.device_id, info.public_key_pem, model,
                                                         idempotency_key)
        self._stage("Writing the certificate to the device…", 70)
        await device.install_certificate(registration.certificate, registration.issuer_key_pem)
        await self._refresh_device()
        self.post_message(self.Done(f"Registered {info.device_id} to wallet {grouped(wallet_id)}."))

    # -- certify again --

    def action_recertify(self) -> None:
        if self._need_device() is None or self.info is None:
            return
        summary = [("Device", self.info.device_id),
                   ("Effect", "the HSM signs a new certificate under the voucher key that signs now; the device "
                              "takes it only with the endorsements from the key it pins")]
        self.app.push_screen(ActionModal("Certify this hard wallet again?", summary, confirm_label="Certify"),
                             lambda answer: self._then(answer, self.recertify))

    @work(exclusive=True, exit_on_error=False, group="device", name="Certify again")
    async def recertify(self) -> None:
        device, info = self.device, self.info
        assert device is not None and info is not None
        self._stage("Asking the gateway for a new certificate…", 30)
        registration = await self.client.recertify_device(info.device_id)
        self._stage("Writing the certificate to the device…", 70)
        await device.install_certificate(registration.certificate, registration.issuer_key_pem,
                                         registration.endorsements)
        await self._refresh_device()
        self.post_message(self.Done(f"Certified {info.device_id} again under key {registration.document.get('kid')} "
                                    f"({len(registration.endorsements)} endorsements)."))

    async def _refresh_device(self) -> None:
        device = self.device
        if device is None:
            return
        info = await device.info()
        record, note = await self._gateway_record(info.device_id)
        self.post_message(self.Connected(info, record, note))

    # -- load --

    def action_load(self) -> None:
        if self._need_device() is None or self.info is None:
            return
        self.app.push_screen(
            ActionModal(f"Load {self.info.device_id}", fields=[
                FieldSpec("amount", "Amount in yuan", "100.00", restrict=r"[0-9.,¥]*", max_length=20,
                          check=_check_money)], confirm_label="Next"),
            self._confirm_load)

    def _confirm_load(self, result: ActionResult | None) -> None:
        if result is None or self.info is None:
            return
        amount = parse_money(result.values["amount"])
        info = self.info
        wallet = info.wallet_id or (self.record.wallet_id if self.record else "")
        summary = [("Device", info.device_id), ("Wallet", grouped(wallet) if wallet else "—"),
                   ("Amount", money(amount)),
                   ("Device balance",
                    f"{money(info.offline_balance_fen)} → {money(info.offline_balance_fen + amount)}"),
                   ("Effect", "moves the amount from the wallet to its offline reserve; the device gets a voucher")]
        self.app.push_screen(ActionModal(f"Load {money(amount)}?", summary, confirm_label="Load"),
                             lambda answer: self._then(answer, lambda: self.load(amount, new_idempotency_key())))

    @work(exclusive=True, exit_on_error=False, group="device", name="Load")
    async def load(self, amount: int, idempotency_key: str) -> None:
        device, info = self.device, self.info
        assert device is not None and info is not None
        self._stage("Asking the gateway for a voucher…", 30)
        try:
            voucher = await self.client.load_device(info.device_id, amount, idempotency_key)
        except Exception as error:
            self.keep_for_retry(f"Load {money(amount)}", lambda: self.load(amount, idempotency_key), error)
            raise
        if isinstance(voucher, Approval):  # above a threshold: requested, nothing moved, no voucher yet
            self.post_message(self.Done(f"Load of {money(amount)} onto {info.device_id} is pending approval "
                                        f"{voucher.approval_id}: nothing moved yet; a supervisor decides it."))
            return
        self._stage("Writing the voucher to the device…", 70)
        try:
            await device.load(voucher.voucher)
        except Exception as error:
            # The voucher is issued; the same idempotency key returns it again, so a retry only re-writes it.
            from tui.client import GatewayUnreachable

            self.keep_for_retry(f"Load {money(amount)}", lambda: self.load(amount, idempotency_key),
                                GatewayUnreachable(str(error)))
            raise
        await self._refresh_device()
        self.post_message(self.Done(f"Loaded {money(amount)} (load #{voucher.load_seq}) onto {info.device_id}."))

    # -- sync --

    def action_sync(self) -> None:
        if self._need_device() is None:
            return
        self.sync(new_idempotency_key())

    @work(exclusive=True, exit_on_error=False, group="device", name="Sync")
    async def sync(self, idempotency_key: str) -> None:
        device, info = self.device, self.info
        assert device is not None and info is not None
        self._stage("Reading the payment log…", 0)

        def progress(done: int, total: int) -> None:
            self._stage(f"Reading the payment log… {done:,}/{total:,} bytes", 60 * done / max(total, 1))

        log_export = await device.export_log(progress)
        self._stage(f"Uploading {len(log_export):,} bytes to the gateway…", 65)
        report = await self.client.sync_device(info.device_id, log_export, idempotency_key)
        self._stage("Acknowledging the log on the device…", 90)
        ack = report.get("ack")
        if isinstance(ack, str) and ack:
            import base64

            await device.ack_log(base64.b64decode(ack))
        await self._refresh_device()
        self.post_message(self.Done("Synced: " + _report_text(report)))

    # -- unload --

    def action_unload(self) -> None:
        if self._need_device() is None or self.info is None:
            return
        info = self.info
        summary = [("Device", info.device_id), ("Offline balance", money(info.offline_balance_fen)),
                   ("Effect", "the device signs a final statement and stops spending; "
                              "its remaining value returns to the wallet")]
        self.app.push_screen(ActionModal("Unload this hard wallet?", summary, confirm_label="Unload", danger=True),
                             lambda answer: self._then(answer, lambda: self.unload(new_idempotency_key())))

    @work(exclusive=True, exit_on_error=False, group="device", name="Unload")
    async def unload(self, idempotency_key: str) -> None:
        device, info = self.device, self.info
        assert device is not None and info is not None
        self._stage("Asking the device for its final statement…", 30)
        statement = await device.unload()
        self._stage("Handing the statement to the gateway…", 70)
        result = await self.client.unload_device(info.device_id, statement, idempotency_key)
        await self._refresh_device()
        self.post_message(self.Done("Unloaded: " + _report_text(result)))

    def on_devices_screen_done(self, event: Done) -> None:
        self._stage(event.text, 100)
        self.pending = None
        self.refresh_bindings()
        self.notify(event.text, title="Hard wallet", markup=False)


def _report_text(report: dict[str, Any]) -> str:
    parts = []
    payments = report.get("payments")
    if isinstance(payments, dict):
        parts.append(f"{payments.get('posted', 0)} payment(s) posted, {payments.get('held', 0)} held")
    for name, label in (("posted_fen", "posted"), ("held_fen", "held"), ("returned_fen", "returned")):
        if isinstance(report.get(name), int):
            parts.append(f"{label} {money(report[name])}")
    if isinstance(report.get("discrepancies"), list):
        parts.append(f"{len(report['discrepancies'])} discrepanc{'y' if len(report['discrepancies']) == 1 else 'ies'}")
    if report.get("replayed"):
        parts.append("already synced before: nothing changed")
    return ", ".join(parts) or "done"
