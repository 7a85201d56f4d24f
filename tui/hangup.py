"""Leaving when the terminal goes: SIGHUP, or a terminal that hung up without one.

A teller whose terminal is gone (a killed tmux session, a closed window or SSH connection) has no
one left to serve, but Textual's input thread keeps polling the dead terminal, which answers at
once: a core spun at full speed, forever. SIGHUP usually ends a process then, but not when it was
started with SIGHUP ignored (``nohup``, some job runners) — so the terminal itself is also
watched, and either way the app exits. Should the exit itself hang on the dead terminal (restoring
it writes to it), the process ends after a short grace period anyway.
"""

from __future__ import annotations

import os
import select
import threading

#: How often the terminal is checked for a hang-up.
CHECK_SECONDS = 1.0
#: How long a clean exit may take once the terminal is gone before the process ends regardless.
EXIT_GRACE_SECONDS = 3.0
#: The exit status of a process ended by a hang-up (128 + SIGHUP), as a shell reports it.
HANGUP_STATUS = 129

_GONE = select.POLLHUP | select.POLLERR | select.POLLNVAL


def terminal_lost(fd: int) -> bool:
    """True when the terminal on ``fd`` has hung up (its pty master is closed) or ``fd`` is no longer open."""
    poller = select.poll()
    poller.register(fd, 0)  # hang-up, error and invalid fd are reported whatever is asked for
    return any(events & _GONE for _, events in poller.poll(0))


def end_after_grace(seconds: float = EXIT_GRACE_SECONDS) -> None:
    """End the process after ``seconds`` unless it has ended by then (a daemon timer: a clean exit
    before it fires ends the timer too)."""
    timer = threading.Timer(seconds, os._exit, (HANGUP_STATUS,))
    timer.daemon = True
    timer.start()
