"""Several HTTP processes on one port (``[server] processes = N``).

One Python process serves HTTP on one core at most (one GIL for the event loop and the store's
threads). With ``processes > 1`` the ``serve`` command becomes a small supervisor, the pre-fork
model of gunicorn and nginx:

- it runs the store's migrations once and reserves the port (``port = 0`` still means one port:
  the supervisor binds it, without listening, and gives the number to its children);
- it starts N children (``ecny-gateway serve --child N``), each a complete gateway with its own
  event loop, store connections and signer workers, each listening on the port with
  ``SO_REUSEPORT``: the kernel spreads new connections over the children by a hash of the
  client's address and port, and stops sending any to a child that has died;
- it restarts a child that dies (at most once per ``RESPAWN_INTERVAL`` per child) and, on SIGTERM
  or SIGINT, stops them all (each finishes its requests and signs its audit checkpoint).

What the children share goes through the store: idempotency records, wallet locks, nonces and the
audit chain (SQLite: an ``flock`` gate around every write transaction; PostgreSQL: advisory locks),
exactly as for several gateway instances on one database; so do sessions (never cached: a logout
or an ended session holds at once in every child). What stays per process: the API key cache
(revocation takes effect within ``auth.credential_cache_seconds`` in every child), the rate
limiters (each child gets ``rate_limit_per_second / N`` and ``login_rate_per_second / N``), its
share of ``auth.password_checks_max`` and its tally of anonymous refusals. Metrics are summed across children
through prometheus-client's multiprocess mode (a private directory made by the supervisor).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from types import FrameType

import structlog
from prometheus_client import multiprocess

from gateway.metrics import METRICS_DIR_ENV
from gateway.monitor.process import NUDGE_ADDRESS_ENV

RESPAWN_INTERVAL = 1.0
STOP_TIMEOUT = 20.0
POLL_INTERVAL = 0.2


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) with ``SO_REUSEPORT``: holds the port, ``port = 0`` picks one, and the
    children's listening sockets join it. A socket that does not listen is given no connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


@dataclass
class _Child:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0


@dataclass
class Supervisor:
    """Runs ``command + ["--child", index]`` ``processes`` times and keeps them running."""

    command: list[str]
    processes: int
    sock: socket.socket
    children: list[_Child] = field(default_factory=list)
    stopping: bool = False

    def run(self) -> int:
        log = structlog.get_logger("gateway.supervisor")
        metrics_dir = tempfile.mkdtemp(prefix="ecny-metrics-")
        env = dict(os.environ)
        env[METRICS_DIR_ENV] = metrics_dir
        env[NUDGE_ADDRESS_ENV] = f"ecny-gateway-risk-{uuid.uuid4().hex}"  # every child nudges the one evaluator
        env["ECNY_SERVER__PORT"] = str(self.sock.getsockname()[1])
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.children = [_Child(i) for i in range(self.processes)]
            for child in self.children:
                self._start(child, env)
            while not self.stopping:
                time.sleep(POLL_INTERVAL)
                for child in self.children:
                    if self.stopping or child.process is None or child.process.poll() is None:
                        continue
                    code = child.process.returncode
                    log.error("HTTP process exited; restarting it", index=child.index, pid=child.process.pid,
                              exit_code=code)
                    _mark_dead(child.process.pid, metrics_dir)
                    wait = RESPAWN_INTERVAL - (time.monotonic() - child.started)
                    if wait > 0:
                        time.sleep(wait)
                    if not self.stopping:
                        self._start(child, env)
            return self._stop_all()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.sock.close()
            shutil.rmtree(metrics_dir, ignore_errors=True)

    def _start(self, child: _Child, env: dict[str, str]) -> None:
        child.process = subprocess.Popen([*self.command, "--child", str(child.index)], env=env)
        child.started = time.monotonic()

    def _stop(self, _signum: int, _frame: FrameType | None) -> None:
        self.stopping = True

    def _stop_all(self) -> int:
        live = [c.process for c in self.children if c.process is not None and c.process.poll() is None]
        for process in live:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for process in live:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return 0


def _mark_dead(pid: int, metrics_dir: str) -> None:
    """Drop a dead child's live gauges from the shared metrics."""
    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]


def child_command(config: str | None) -> list[str]:
    """The command line of one child (the same interpreter and the same configuration)."""
    command = [sys.executable, "-m", "gateway.cli", "serve"]
    if config:
        command += ["--config", config]
    return command
