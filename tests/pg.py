"""A throw-away PostgreSQL cluster for the tests.

``initdb`` into a fresh temporary directory, ``pg_ctl start`` on a free loopback port with the
socket in the same directory, trust authentication for the user ``test``; stopped (immediate mode)
and deleted at the end. Durability is switched off (``fsync``, ``synchronous_commit``): nothing
here outlives the test session.

``initdb`` refuses to run as root, so as root the cluster belongs to the ``postgres`` system user
(``runuser -u postgres --``) and its directory is made traversable for it.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import uuid
from pathlib import Path
from types import TracebackType

import psycopg

USER = "test"
SERVER_OPTIONS = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries are not installed, or the cluster would not start."""


def find_binaries() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl``: the newest /usr/lib/postgresql/*/bin, else PATH."""

    def version(path: str) -> tuple[int, ...]:
        match = re.search(r"/postgresql/([\d.]+)/bin", path)
        return tuple(int(part) for part in match.group(1).split(".")) if match else ()

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version, reverse=True)
    initdb = candidates[0] if candidates else shutil.which("initdb")
    if initdb is None or not (Path(initdb).parent / "pg_ctl").exists():
        raise PostgresUnavailable(
            "PostgreSQL server binaries (initdb, pg_ctl) not found under /usr/lib/postgresql/*/bin or on PATH: "
            "install the 'postgresql' package (`make test` does)"
        )
    return Path(initdb).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _traversable_by_others(path: Path) -> bool:
    return all(parent.stat().st_mode & stat.S_IXOTH for parent in [path, *path.parents])


class PostgresServer:
    """One running cluster. Use as a context manager, or call :meth:`start` and :meth:`stop`."""

    def __init__(self) -> None:
        self.bin = find_binaries()
        self.as_root = os.geteuid() == 0
        self.base: Path | None = None
        self.port = 0
        self._running = False

    @property
    def data(self) -> Path:
        assert self.base is not None
        return self.base / "data"

    @property
    def log(self) -> Path:
        assert self.base is not None
        return self.base / "run" / "server.log"

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        # cwd: the postgres user may not be allowed into the caller's working directory.
        return subprocess.run(command, cwd=self.base, capture_output=True, text=True, timeout=60)

    def start(self) -> PostgresServer:
        base = Path(tempfile.mkdtemp(prefix="ecny-pg-"))
        self.base = base
        try:
            self._prepare(base)
            self._initdb()
            for _attempt in range(5):  # another process may take the free port before the server does
                self.port = free_port()
                if self._pg_ctl_start():
                    break
            else:
                raise PostgresUnavailable(f"PostgreSQL would not start; server log:\n{self._log_tail()}")
        except BaseException:
            self.stop()
            raise
        return self

    def _prepare(self, base: Path) -> None:
        (base / "data").mkdir(mode=0o700)
        (base / "run").mkdir(mode=0o755)
        if not self.as_root:
            return
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError as exc:
            raise PostgresUnavailable("running as root, and there is no 'postgres' user to own the cluster") from exc
        base.chmod(0o755)
        if not _traversable_by_others(base):
            raise PostgresUnavailable(f"{base}: a parent directory is not traversable by the postgres user")
        for path in (base / "data", base / "run"):
            os.chown(path, owner.pw_uid, owner.pw_gid)

    def _initdb(self) -> None:
        result = self._run(
            "initdb", "-D", str(self.data), "-A", "trust", "-U", USER, "-E", "UTF8", "--locale=C", "--no-sync"
        )
        if result.returncode != 0:
            raise PostgresUnavailable(f"initdb failed:\n{result.stdout}\n{result.stderr}")

    def _pg_ctl_start(self) -> bool:
        assert self.base is not None
        options = f"-p {self.port} -k {self.base / 'run'} -c listen_addresses=127.0.0.1 {SERVER_OPTIONS}"
        result = self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "30", "start"
        )
        self._running = result.returncode == 0
        return self._running

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return "(no log)"

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database (a unique name unless given); returns its DSN."""
        name = name or f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.dsn(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.dsn(), autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        """Stop the server (immediate mode: nothing needs to survive) and delete the cluster."""
        if self._running:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
            self._running = False
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
