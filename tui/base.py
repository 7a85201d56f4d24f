"""What every screen shares: the app's context (client, session, failure reporting), the navigation
bar, the base screen, and the one modal used for forms and confirmations.

Failures reach the user in one place, :meth:`TellerBase.report`: one wording per failure kind, a
notification and never a traceback. Screens run their I/O in ``@work(exit_on_error=False)``
workers; a worker that fails lands in :meth:`TellerScreen.on_worker_state_changed`, which reports it.
Background refreshes report a failure kind once and say so again when the gateway recovers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import structlog
from textual import on
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.suggester import SuggestFromList
from textual.widgets import Button, Footer, Input, Label, Static
from textual.worker import Worker, WorkerState

from tui.client import ApiError, GatewayClient
from tui.device import DeviceError

SECTIONS: tuple[tuple[str, str, str], ...] = (
    # (mode, key, label)
    ("dashboard", "d", "Dashboard"),
    ("wallets", "w", "Wallets"),
    ("devices", "h", "Hard wallets"),
    ("reconciliation", "r", "Reconcile"),
    ("approvals", "a", "Approvals"),
    ("audit", "u", "Audit"),
    ("risk", "k", "Risk"),
)

TITLES = {
    "unreachable": "Gateway unreachable",
    "session-expired": "Session expired",
    "unauthenticated": "Not logged in",
    "forbidden": "Not allowed",
    "not-found": "Not found",
    "not-available": "Not available on this gateway",
    "conflict": "Conflict",
    "refused": "Refused by policy",
    "rate-limited": "Slow down",
    "unavailable": "Gateway unavailable",
    "bad-request": "Rejected",
    "server-error": "Gateway error",
    "device": "Hard wallet",
    "unexpected": "Unexpected error",
}

# Problem codes that deserve their own sentence (the gateway's detail follows it).
EXPLAINED = {
    "self-approval": "You requested this yourself: another supervisor must decide it.",
    "approval-payload-mismatch": "The payload changed since it was shown: reload and check it again.",
    "approval-not-pending": "Already decided or expired.",
    "idempotency-conflict": "This action was already sent with different details.",
}

log = structlog.get_logger("tui")


class LoginPrompt(Screen[None]):
    """What a logged-out teller sees (:class:`tui.screens.login.LoginScreen`). Declared here, where
    :class:`TellerBase` finds it on the screen stack, because the screens import this module."""

    def reset(self, message: str) -> None:
        """Back here after a logout or an expired session: show ``message`` on an empty form."""
        raise NotImplementedError  # every login screen overrides it (LoginScreen does); not a stub


class TellerBase(App[None]):
    """The parts of the app that screens rely on (see :class:`tui.app.TellerApp`)."""

    def __init__(self, client: GatewayClient, refresh_seconds: float = 2.0) -> None:
        super().__init__()
        self.client = client
        self.refresh_seconds = refresh_seconds
        self._background_failure: str | None = None

    # -- failures --

    def report(self, error: BaseException, action: str = "", background: bool = False) -> None:
        """Tell the user about a failure: a notification (or the login screen, if the session expired)."""
        if isinstance(error, ApiError):
            kind = error.kind
            if kind == "session-expired":
                self.call_later(self.session_expired, "Your session has expired: log in again.")
                return
            message = error.describe()
            if error.code in EXPLAINED:
                message = f"{EXPLAINED[error.code]} ({error.detail})"
            elif kind == "not-available":
                message = f"{action or 'This'}: the gateway does not offer this yet ({error.detail})."
        elif isinstance(error, DeviceError):
            kind, message = "device", str(error)
        else:
            kind, message = "unexpected", f"{error.__class__.__name__}: {error}"
            log.error("unexpected error in the teller UI", action=action, error=repr(error))
        if background:
            if kind == self._background_failure:
                return  # said once already; said again only after a recovery
            self._background_failure = kind
        title = TITLES.get(kind, "Failed")
        if action and not background:
            title = f"{action}: {title.lower()}"
        self.notify(message, title=title, severity="warning" if kind in ("not-available", "refused") else "error",
                    timeout=8, markup=False)

    def recovered(self) -> None:
        """A background refresh succeeded: if it had been failing, say the gateway is back."""
        if self._background_failure is not None:
            self._background_failure = None
            self.notify("The gateway answers again.", title="Recovered", severity="information", timeout=5)

    async def session_expired(self, message: str) -> None:
        """Back to the login screen, with every other screen rebuilt after the next login."""
        await self._back_to_login(message, "warning")

    @property
    def role(self) -> str:
        return self.client.session.role if self.client.session else ""

    @property
    def username(self) -> str:
        return self.client.session.username if self.client.session else ""

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        if self.client.session is not None:
            for mode, key, label in SECTIONS:
                yield SystemCommand(f"Go to {label}", f"Show the {label.lower()} screen (key {key})",
                                    self._go(mode))
            yield SystemCommand("Log out", "Forget this session and return to the login screen", self.action_logout)
        yield from super().get_system_commands(screen)
        commands = getattr(screen, "COMMANDS_HERE", ())
        for title, help_text, action in commands:
            yield SystemCommand(title, help_text, self._screen_action(screen, action))

    def _go(self, mode: str) -> Callable[[], Any]:
        return lambda: self.action_go(mode)

    @staticmethod
    def _screen_action(screen: Screen[Any], action: str) -> Callable[[], Any]:
        async def run() -> None:
            await screen.run_action(action)

        return run

    async def action_go(self, mode: str) -> None:
        if self.client.session is None:
            return
        await self.switch_mode(mode)

    async def action_logout(self) -> None:
        await self.client.logout()  # DELETE /v1/sessions: the token is dead on the gateway, not just forgotten
        await self._back_to_login("Logged out.", "information")

    async def _back_to_login(self, message: str, severity: str) -> None:
        self.client.forget_session()
        if self.current_mode != "login":
            await self.switch_mode("login")
        for mode, factory in self.MODES.items():
            if mode != "login" and mode in self._screen_stacks:  # drop it so the next login starts clean
                await self.remove_mode(mode)
                self.add_mode(mode, factory)
        screen = self.screen
        while not isinstance(screen, LoginPrompt) and len(self.screen_stack) > 1:
            self.pop_screen()
            screen = self.screen_stack[-1]
        if isinstance(screen, LoginPrompt):
            screen.reset(message)
        self.notify(message, title="Session", severity="warning" if severity == "warning" else "information",
                    timeout=6)


def teller(screen: Screen[Any] | Any) -> TellerBase:
    return cast(TellerBase, screen.app)


class NavBar(Static):
    """The k9s-style top line: every section with its key, the current one highlighted, and who is in."""

    def __init__(self, current: str) -> None:
        super().__init__(id="nav")
        self.current = current

    def on_mount(self) -> None:
        parts = []
        for mode, key, label in SECTIONS:
            text = f"[b]{key}[/b] {label}"
            parts.append(f"[reverse bold]{text}[/]" if mode == self.current else text)
        user = teller(self).username
        who = f"[dim]{user}·{teller(self).role}[/]" if user else ""
        # One space between sections: all seven fit in 80 columns.
        self.update(" " + " ".join(parts) + ("  " + who if who else ""))


@dataclass
class PendingAction:
    """A money-moving action that failed for a transient reason: retried with the same idempotency key."""

    label: str
    run: Callable[[], Any]


class TellerScreen(Screen[None]):
    """A section of the app: navigation bar on top, bindings in the footer, failures reported."""

    SECTION: ClassVar[str] = ""
    COMMANDS_HERE: ClassVar[tuple[tuple[str, str, str], ...]] = ()
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("slash", "filter", "Filter", key_display="/"),
        Binding("ctrl+r", "reload", "Reload", show=False),
        Binding("R", "retry", "Retry", show=True),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.pending: PendingAction | None = None

    def compose_nav(self) -> ComposeResult:
        yield NavBar(self.SECTION)

    def compose_footer(self) -> ComposeResult:
        yield Footer(show_command_palette=False)

    @property
    def client(self) -> GatewayClient:
        return teller(self).client

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR and event.worker.error is not None:
            error = event.worker.error
            background = event.worker.group == "refresh"
            teller(self).report(error, event.worker.name, background=background)
            self.worker_failed(event.worker.name, error)

    def worker_failed(self, name: str, error: BaseException) -> None:
        """Hook: a screen resets what it showed as "in progress"."""

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "retry":
            return self.pending is not None
        if action == "filter":
            return bool(self.query("#filter"))
        return True

    def keep_for_retry(self, label: str, run: Callable[[], Any], error: BaseException | None) -> None:
        """Remember a failed money action so ``R`` sends it again with the same idempotency key."""
        if isinstance(error, ApiError) and error.transient:
            self.pending = PendingAction(label, run)
            self.notify(f"Press R to retry “{label}” — sent with the same idempotency key, it cannot post twice.",
                        title="Retry", timeout=8, markup=False)
        else:
            self.pending = None
        self.refresh_bindings()

    def action_retry(self) -> None:
        pending, self.pending = self.pending, None
        self.refresh_bindings()
        if pending is not None:
            pending.run()

    def action_filter(self) -> None:
        for widget in self.query("#filter"):
            widget.display = True
            widget.focus()

    def action_reload(self) -> None:
        """Hook: fetch the screen's data again."""

    @on(Input.Submitted, "#filter")
    def _filter_done(self) -> None:
        self.focus_next()

    def filter_text(self) -> str:
        found = self.query("#filter")
        return found.first(Input).value.strip().lower() if found else ""


@dataclass(frozen=True)
class FieldSpec:
    """One input of an :class:`ActionModal`."""

    name: str
    label: str
    placeholder: str = ""
    value: str = ""
    required: bool = True
    restrict: str | None = None
    max_length: int = 0
    password: bool = False
    suggestions: tuple[str, ...] = ()
    check: Callable[[str], str | None] | None = None  # returns an error message, or None when valid


@dataclass
class ActionResult:
    values: dict[str, str] = field(default_factory=dict)


class ActionModal(ModalScreen[ActionResult | None]):
    """A confirmation that says what will happen (``summary``), with optional inputs.

    ``enter`` on the last field (or the confirm button, or ctrl+s) submits; ``escape`` cancels.
    With no fields, ``y`` confirms and ``n`` cancels as well.
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+s", "submit", "Confirm"),
        Binding("y", "confirm_key", "Yes", show=False),
        Binding("n", "cancel_key", "No", show=False),
    ]

    def __init__(self, title: str, summary: Iterable[tuple[str, str]] = (), fields: Iterable[FieldSpec] = (),
                 confirm_label: str = "Confirm", note: str = "", danger: bool = False) -> None:
        super().__init__()
        self.title_text = title
        self.summary = list(summary)
        self.fields = list(fields)
        self.confirm_label = confirm_label
        self.note = note
        self.danger = danger

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="danger" if self.danger else ""):
            yield Label(self.title_text, id="dialog-title")
            if self.summary:
                with VerticalScroll(id="dialog-summary"):
                    for label, value in self.summary:
                        with Horizontal(classes="summary-row"):
                            yield Label(label, classes="summary-label")
                            yield Label(value, classes="summary-value", markup=False)
            for spec in self.fields:
                yield Label(spec.label + ("" if spec.required else " (optional)"), classes="field-label")
                yield Input(
                    value=spec.value, placeholder=spec.placeholder, id=f"field-{spec.name}", restrict=spec.restrict,
                    max_length=spec.max_length, password=spec.password,
                    suggester=SuggestFromList(spec.suggestions, case_sensitive=False) if spec.suggestions else None,
                )
            yield Label(self.note, id="dialog-note", markup=False)
            with Horizontal(id="dialog-buttons"):
                yield Button(self.confirm_label, id="confirm", variant="error" if self.danger else "primary")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        if self.fields:
            self.query_one(f"#field-{self.fields[0].name}", Input).focus()
        else:
            self.query_one("#confirm", Button).focus()

    def _values(self) -> dict[str, str] | None:
        values: dict[str, str] = {}
        for spec in self.fields:
            value = self.query_one(f"#field-{spec.name}", Input).value.strip()
            problem = None
            if spec.required and not value:
                problem = f"{spec.label} is required"
            elif value and spec.check is not None:
                problem = spec.check(value)
            if problem:
                self.query_one("#dialog-note", Label).update(problem)
                self.query_one(f"#field-{spec.name}", Input).focus()
                return None
            values[spec.name] = value
        return values

    def action_submit(self) -> None:
        values = self._values()
        if values is not None:
            self.dismiss(ActionResult(values))

    def action_cancel(self) -> None:
        self.dismiss(None)

    def action_confirm_key(self) -> None:
        if not self.fields:
            self.action_submit()

    def action_cancel_key(self) -> None:
        if not self.fields:
            self.dismiss(None)

    @on(Button.Pressed, "#confirm")
    def _confirm(self) -> None:
        self.action_submit()

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(None)

    @on(Input.Submitted)
    def _next_field(self, event: Input.Submitted) -> None:
        event.stop()
        inputs = list(self.query(Input))
        if event.input is inputs[-1]:
            self.action_submit()
        else:
            inputs[inputs.index(event.input) + 1].focus()
