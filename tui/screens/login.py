"""Login: username and password in, a session token out (kept by the client, never shown)."""

from __future__ import annotations

from typing import ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Center, Vertical
from textual.message import Message
from textual.widgets import Button, Footer, Input, Label, Static
from textual.worker import Worker, WorkerState

from tui.base import LoginPrompt, teller
from tui.client import ApiError
from tui.models import Session


class LoginScreen(LoginPrompt):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("ctrl+q", "app.quit", "Quit")]

    class LoggedIn(Message):
        def __init__(self, session: Session) -> None:
            super().__init__()
            self.session = session

    def __init__(self) -> None:
        super().__init__()
        self.message = ""

    def compose(self) -> ComposeResult:
        with Center():
            with Vertical(id="login-box"):
                yield Static("[b]e-CNY teller[/b]", id="login-title")
                yield Label(teller(self).client.base_url, id="login-gateway", markup=False)
                yield Input(placeholder="username", id="username", max_length=64)
                yield Input(placeholder="password", id="password", password=True, max_length=1024)
                yield Button("Log in", id="login", variant="primary")
                yield Label(self.message, id="login-message", markup=False)
        yield Footer(show_command_palette=False)

    def on_mount(self) -> None:
        self.query_one("#username", Input).focus()

    def reset(self, message: str) -> None:
        """Back here after a logout or an expired session: empty form, cursor in the username."""
        self.show_message(message)
        if self.is_mounted:
            self.query_one("#username", Input).value = ""
            self.query_one("#password", Input).value = ""
            self.query_one("#login", Button).disabled = False
            self.query_one("#username", Input).focus()

    def show_message(self, text: str) -> None:
        self.message = text
        if self.is_mounted:
            self.query_one("#login-message", Label).update(text)

    @on(Input.Submitted, "#username")
    def _to_password(self) -> None:
        self.query_one("#password", Input).focus()

    @on(Input.Submitted, "#password")
    @on(Button.Pressed, "#login")
    def submit(self) -> None:
        username = self.query_one("#username", Input).value.strip()
        password = self.query_one("#password", Input).value
        if not username or not password:
            self.show_message("Enter a username and a password.")
            return
        self.show_message("Logging in…")
        self.query_one("#login", Button).disabled = True
        self.log_in(username, password)

    @work(exclusive=True, exit_on_error=False, name="Log in")
    async def log_in(self, username: str, password: str) -> None:
        try:
            session = await teller(self).client.login(username, password)
        except BaseException:
            self.query_one("#login", Button).disabled = False
            raise
        self.post_message(self.LoggedIn(session))

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR and event.worker.error is not None:
            error = event.worker.error
            if isinstance(error, ApiError) and error.status == 401:
                self.show_message("Wrong username or password.")
            elif isinstance(error, ApiError) and error.code == "login-throttled":
                self.show_message(f"Too many attempts: {error.detail.rpartition('; ')[2]}.")
            else:
                self.show_message("Could not log in: see the notification.")
                teller(self).report(error, "Log in")

    async def on_login_screen_logged_in(self, event: LoggedIn) -> None:
        self.query_one("#password", Input).value = ""
        self.query_one("#login", Button).disabled = False
        self.show_message("")
        await teller(self).action_go("dashboard")
