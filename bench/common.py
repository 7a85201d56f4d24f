"""Benchmark harness: a real gateway in a subprocess, and a load generator in another process.

Not a test (CI runs none of this). Everything is built from scratch in a temporary directory:

- a SoftHSM2 token made by ``softhsm/init-token.sh DIR bench`` (``SOFTHSM2_CONF`` in the server's
  environment; the PIN stays in ``DIR/bench.user-pin`` and reaches the server through ``hsm.pin_file``);
- a config file written here (free 127.0.0.1 port, SQLite file or a PostgreSQL DSN), then
  ``ecny-gateway dev-init --var DIR``, which keeps that config and provisions the keys
  (``ecny-transfers`` P-256 with usage ecny, ``audit-checkpoints``, ``raw-p256``, ...), an admin and a
  backend API client and the teller user ``teller1`` (credentials in ``DIR/dev-credentials.json``);
- ``.venv/bin/ecny-gateway serve --config DIR/gateway.toml`` as a subprocess, until ``/readyz`` is 200.

Server resources are read from /proc: CPU seconds = utime + stime of the server process and of every
live descendant (the signer workers are spawned child processes) plus the reaped children's
cutime + cstime; RSS = VmRSS of the same processes.

The load generator (:func:`run_load`) runs in a *spawned* process so that the client's Python work
never shares an interpreter (or a GIL) with the measuring process; it uses aiohttp with a connection
pool as large as the concurrency, and reports latencies, status counts and the problem documents of
failures.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VENV_BIN = ROOT / ".venv" / "bin"
GATEWAY = VENV_BIN / "ecny-gateway"
TOKEN_LABEL = "bench"
NO_UVLOOP = "import sys; sys.modules['uvloop'] = None; from gateway.cli import main; sys.exit(main(sys.argv[1:]))"
CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1


# --- /proc readings ------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (children, grandchildren, ...)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            parents.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its live descendants, plus what reaped children used."""
    total = 0
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # Fields after ')' start at index 0 = state (3rd field of stat): utime=14, stime=15, cutime=16, cstime=17.
    total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    for child in descendants(pid):
        child_fields = _stat_fields(child)
        if child_fields is not None:
            total += int(child_fields[11]) + int(child_fields[12])
    return total / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all CPUs; idle and iowait excluded), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def rss_kib(pid: int) -> int:
    """VmRSS of one process in KiB (0 when gone). psutil is not a dependency; /proc is enough."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def listening_ports(pid: int) -> list[int]:
    """TCP ports ``pid`` or its descendants listen on (from their socket fds and /proc/net/tcp[6]);
    with ``[server] processes > 1`` the HTTP processes are the supervisor's children."""
    inodes = set()
    for owner in (pid, *descendants(pid)):
        try:
            fds = os.listdir(f"/proc/{owner}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{owner}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return sorted(set(ports))


# --- the gateway under test ----------------------------------------------------------------


def _http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
          timeout: float = 10) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={
        "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read()
            return response.status, json.loads(text) if text else None
    except urllib.error.HTTPError as error:
        text = error.read()
        try:
            return error.code, json.loads(text)
        except ValueError:
            return error.code, text.decode(errors="replace")


@dataclass
class Gateway:
    """One gateway subprocess with its own token, store and credentials."""

    store: str  # "sqlite" or "postgresql"
    dsn: str
    base: Path
    conf: Path
    port: int
    process: subprocess.Popen[bytes]
    credentials: dict[str, Any]
    keys: dict[str, str] = field(default_factory=dict)  # label -> key_id
    teller_token: str = ""
    supervisor_token: str = ""
    cpus: set[int] | None = None
    log_path: Path | None = None
    loop: str = "uvloop"
    command: str = ""
    ready_s: float = 0.0  # from spawning `serve` to the first /readyz 200

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def backend(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.credentials['backend_api_key']}"}

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.credentials['admin_api_key']}"}

    def teller(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.teller_token}"}

    def supervisor(self) -> dict[str, str]:
        """supervisor1's session: the second person who approves the set-up's tier-1 wallets and cash-ins."""
        return {"Authorization": f"Bearer {self.supervisor_token}"}

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ECNY_")}
        env["SOFTHSM2_CONF"] = str(self.conf)
        return env

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def rss(self) -> dict[str, int]:
        """RSS in KiB: the main process, and the main process plus its signer workers."""
        main = rss_kib(self.pid)
        return {"main_kib": main, "total_kib": main + sum(rss_kib(c) for c in descendants(self.pid)),
                "processes": 1 + len(descendants(self.pid))}

    def request(self, method: str, path: str, body: Any = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
        try:
            return _http(method, self.url + path, body, headers)
        except OSError as exc:
            raise RuntimeError(f"{method} {path}: {exc}; {self.state()}") from exc

    def state(self) -> str:
        """The server's exit status (if it exited) and the end of its log, for error messages."""
        code = self.process.poll()
        tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path and self.log_path.exists() else ""
        return f"server {'running' if code is None else f'exited with {code}'}; log tail:\n{tail}"

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(GATEWAY), *args, "--config", str(self.base / "gateway.toml")],
                              env=self.env(), capture_output=True, text=True, timeout=120)

    def log_problems(self) -> list[str]:
        """Log lines at warning level or above (JSON lines on the server's stderr)."""
        if self.log_path is None or not self.log_path.exists():
            return []
        lines = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                level = json.loads(line).get("level", "")
            except ValueError:
                level = "" if line.startswith("ecny-gateway ") else "raw"  # the start-up banner
            if level in ("warning", "error", "critical", "exception", "raw"):
                lines.append(line)
        return lines

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def cleanup(self) -> None:
        self.stop()
        if os.environ.get("BENCH_KEEP"):
            print(f"kept {self.base} (BENCH_KEEP is set)", file=sys.stderr)
            return
        shutil.rmtree(self.base, ignore_errors=True)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so that ``finally`` blocks stop servers and delete temp dirs."""

    def handler(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def start_gateway(store: str = "sqlite", dsn: str | None = None, *, workers: int | None = None,
                  cpus: set[int] | None = None, log_level: str = "warning", extra_toml: str = "",
                  loop: str = "uvloop", processes: int = 1, ready_poll: float = 0.1) -> Gateway:
    """Make a token, write a config, provision with ``dev-init``, start ``serve``, wait for /readyz.

    ``cpus``: CPU affinity of the server (its signer workers inherit it); None = all CPUs.
    ``loop``: "uvloop" runs the real command (``serve`` installs uvloop when it is importable);
    "asyncio" runs the same ``gateway.cli.main(["serve", ...])`` with uvloop made unimportable.
    """
    base = Path(tempfile.mkdtemp(prefix=f"ecny-bench-{store}-"))
    try:
        conf = Path(subprocess.run([str(ROOT / "softhsm" / "init-token.sh"), str(base / "hsm"), TOKEN_LABEL],
                                   check=True, capture_output=True, text=True).stdout.strip())
        # Port 0: the server binds a free port itself (no race with other users' servers for a port
        # picked here); the port is then read from the server's listening socket.
        port = 0
        dsn = dsn or f"sqlite:///{base / 'gateway.db'}"
        hsm_workers = f"workers = {workers}\n" if workers else ""
        (base / "gateway.toml").write_text(
            "# written by bench/common.py\n"
            f'[server]\nhost = "127.0.0.1"\nport = {port}\nprocesses = {processes}\n'
            # One backend client drives all the load to measure capacity (up to ~25k signatures/s): no
            # per-principal limit here (the shipped default is 2,000/s per principal).
            "rate_limit_per_second = 0\n\n"
            f'[hsm]\nprofile = "softhsm"\ntoken_label = "{TOKEN_LABEL}"\n'
            f'pin_file = "{base / "hsm" / (TOKEN_LABEL + ".user-pin")}"\n{hsm_workers}\n'
            f'[store]\ndsn = "{dsn}"\n\n[logging]\nlevel = "{log_level}"\n\n'
            # The set-up funds each payer wallet with one large cash-in: above the shipped ¥50,000 threshold
            # that would wait for a second person. What is measured (transfers of 1 fen) is not affected.
            # The daily aggregate too; the tier-1 upgrade of each wallet is approved by supervisor1.
            "[approvals]\ncash_in_threshold_fen = 9223372036854775807\n"
            "cash_in_daily_threshold_fen = 9223372036854775807\n" + extra_toml,
            encoding="utf-8",
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("ECNY_")}
        env["SOFTHSM2_CONF"] = str(conf)
        init = subprocess.run([str(GATEWAY), "dev-init", "--var", str(base)], env=env, capture_output=True,
                              text=True, timeout=120)
        if init.returncode != 0:
            raise RuntimeError(f"dev-init failed:\n{init.stdout}\n{init.stderr}")
        credentials = json.loads((base / "dev-credentials.json").read_text())
        log_path = base / "server.log"
        log = open(log_path, "wb")
        def preexec() -> None:
            # Die with the harness: a harness killed by a timeout must not leave a server behind.
            import ctypes

            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
            if cpus:
                os.sched_setaffinity(0, cpus)
        command = [str(GATEWAY), "serve", "--config", str(base / "gateway.toml")]
        if loop == "asyncio":
            command = [str(VENV_BIN / "python"), "-c", NO_UVLOOP, *command[1:]]
        spawned = time.monotonic()
        process = subprocess.Popen(command, env=env,
                                   stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec)
        log.close()
        gateway = Gateway(store, dsn, base, conf, port, process, credentials, cpus=cpus, log_path=log_path,
                          loop=loop, command=" ".join(command))
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    try:
        deadline = time.monotonic() + 60
        while True:
            if gateway.port == 0:
                ports = listening_ports(process.pid)
                gateway.port = ports[0] if len(ports) == 1 else 0
            if process.poll() is not None:
                raise RuntimeError(f"gateway exited ({process.returncode}):\n{log_path.read_text()[-3000:]}")
            try:
                if gateway.port:
                    status, _ = _http("GET", gateway.url + "/readyz", timeout=2)
                    if status == 200:
                        gateway.ready_s = time.monotonic() - spawned
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway not ready after 60 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(ready_poll)
        status, listing = gateway.request("GET", "/v1/keys", headers=gateway.admin())
        if status != 200:
            raise RuntimeError(f"GET /v1/keys: {status} {listing}")
        gateway.keys = {k["label"]: k["key_id"] for k in listing["keys"]}
        status, session = gateway.request("POST", "/v1/sessions", {
            "username": "teller1", "password": credentials["users"]["teller1"]})
        if status != 201:
            raise RuntimeError(f"teller login: {status} {session}")
        gateway.teller_token = session["token"]
        status, session = gateway.request("POST", "/v1/sessions", {
            "username": "supervisor1", "password": credentials["users"]["supervisor1"]})
        if status != 201:
            raise RuntimeError(f"supervisor login: {status} {session}")
        gateway.supervisor_token = session["token"]
    except BaseException:
        gateway.cleanup()
        raise
    return gateway


class Postgres:
    """tests/pg.py's throw-away cluster, with one database for a gateway."""

    def __init__(self) -> None:
        from tests.pg import PostgresServer

        self.server = PostgresServer().start()

    def new_database(self) -> str:
        return self.server.create_database()

    def version(self) -> str:
        result = subprocess.run([str(self.server.bin / "postgres"), "--version"], capture_output=True, text=True)
        return result.stdout.strip()

    def backend_cpu_seconds(self) -> float:
        """CPU of the postmaster and all its backends (they run as their own processes)."""
        pid_file = self.server.data / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return 0.0
        return cpu_seconds(pid)

    def stop(self) -> None:
        self.server.stop()


class WaitSampler:
    """Samples pg_stat_activity every ``interval`` s in a thread: what the gateway's backends wait for."""

    def __init__(self, dsn: str, interval: float = 0.05) -> None:
        import threading

        self.dsn = dsn
        self.interval = interval
        self.samples = 0
        self.active = 0
        self.waits: dict[str, int] = {}
        self.counters_start: Any = None
        self.counters_end: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WaitSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        import psycopg

        database = self.dsn.rsplit("/", 1)[-1]
        counters = ("SELECT xact_commit, xact_rollback, tup_inserted, tup_updated FROM pg_stat_database "
                    "WHERE datname = %s")
        with psycopg.connect(self.dsn, autocommit=True) as connection:
            self.counters_start = connection.execute(counters, (database,)).fetchone()
            while not self._stop.wait(self.interval):
                rows = connection.execute(
                    "SELECT state, wait_event_type, wait_event FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
                    (database,)).fetchall()
                self.samples += 1
                for state, wait_type, wait_event in rows:
                    if state == "idle":
                        continue
                    self.active += 1
                    key = f"{wait_type}:{wait_event}" if wait_type else "running"
                    self.waits[key] = self.waits.get(key, 0) + 1
            connection.execute("SELECT pg_stat_clear_snapshot()")
            self.counters_end = connection.execute(counters, (database,)).fetchone()

    def summary(self) -> dict[str, Any]:
        per_sample = {k: round(v / self.samples, 2) for k, v in sorted(self.waits.items(), key=lambda kv: -kv[1])}
        deltas = {}
        if self.counters_start and self.counters_end:
            names = ("commits", "rollbacks", "rows_inserted", "rows_updated")
            deltas = {n: int(b) - int(a) for n, a, b in zip(names, self.counters_start, self.counters_end, strict=True)}
        return {"samples": self.samples, "mean_non_idle_backends": round(self.active / max(1, self.samples), 2),
                "mean_backends_by_wait": per_sample, "counters": deltas}


def postgres_version_offline() -> str:
    try:
        from tests.pg import find_binaries

        result = subprocess.run([str(find_binaries() / "postgres"), "--version"], capture_output=True, text=True)
        return result.stdout.strip()
    except Exception as exc:
        return f"unavailable ({exc})"


# --- load generation ------------------------------------------------------------------------


@dataclass
class LoadSpec:
    """What the load process does. ``kind``: "transfers", "cash" (cash-ins of ``amount_fen`` to the first
    wallet of each pair, as the teller: pass ``gateway.teller()`` in ``headers``), "sign" or "batch"."""

    url: str
    kind: str
    concurrency: int
    duration: float
    warmup: float = 1.0
    headers: dict[str, str] = field(default_factory=dict)
    # transfers: one (payer, payee) pair list per client; amount in fen
    pairs: list[list[tuple[str, str]]] = field(default_factory=list)
    amount_fen: int = 1
    # sign / batch
    key_id: str = ""
    batch_size: int = 100
    cpus: set[int] | None = None


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _drive(spec: LoadSpec, started: Callable[[], None]) -> dict[str, Any]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=spec.concurrency, limit_per_host=spec.concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    problems: dict[str, dict[str, Any]] = {}  # "status type" -> {count, detail examples}
    exceptions: dict[str, int] = {}
    warm_ops = warm_ok = 0
    loop = asyncio.get_running_loop()
    begin = loop.time()
    measure_from = begin + spec.warmup
    stop_at = measure_from + spec.duration
    measuring = False
    cpu_at_start = [0.0]

    def body_for(client: int, n: int) -> tuple[str, dict[str, Any], dict[str, str]]:
        if spec.kind == "transfers":
            pairs = spec.pairs[client]
            payer, payee = pairs[n % len(pairs)]
            return "/v1/transfers", {"from_wallet": payer, "to_wallet": payee, "amount_fen": spec.amount_fen}, {
                "Idempotency-Key": os.urandom(16).hex()}
        if spec.kind == "cash":
            wallet = spec.pairs[client][n % len(spec.pairs[client])][0]
            return f"/v1/wallets/{wallet}/cash-in", {"amount_fen": spec.amount_fen}, {
                "Idempotency-Key": os.urandom(16).hex()}
        if spec.kind == "sign":
            return f"/v1/keys/{spec.key_id}/sign", {"digest": os.urandom(32).hex()}, {}
        return "/v1/sign/batch", {"key_id": spec.key_id,
                                  "digests": [os.urandom(32).hex() for _ in range(spec.batch_size)]}, {}

    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     headers={**spec.headers, "Content-Type": "application/json"}) as session:

        async def client(index: int) -> None:
            nonlocal warm_ops, warm_ok, measuring
            n = 0
            while True:
                now = loop.time()
                if now >= stop_at:
                    return
                if not measuring and now >= measure_from:
                    measuring = True
                    cpu_at_start[0] = _own_cpu()
                    started()
                path, body, headers = body_for(index, n)
                n += 1
                counted = now >= measure_from
                t0 = time.perf_counter()
                try:
                    async with session.post(spec.url + path, data=json.dumps(body), headers=headers) as response:
                        raw = await response.read()
                        status = response.status
                except Exception as exc:
                    if counted:
                        name = type(exc).__name__
                        exceptions[name] = exceptions.get(name, 0) + 1
                    continue
                elapsed = time.perf_counter() - t0
                if not counted:
                    warm_ops += 1
                    if 200 <= status < 300:
                        warm_ok += 1
                    continue
                latencies.append(elapsed)
                statuses[status] = statuses.get(status, 0) + 1
                if status >= 300:
                    try:
                        document = json.loads(raw)
                        kind = str(document.get("type", "?")).rsplit("/", 1)[-1]
                        detail = str(document.get("detail", ""))[:300]
                    except ValueError:
                        kind, detail = "non-json", raw[:300].decode(errors="replace")
                    entry = problems.setdefault(f"{status} {kind}", {"count": 0, "details": []})
                    entry["count"] += 1
                    if detail not in entry["details"] and len(entry["details"]) < 3:
                        entry["details"].append(detail)

        measure_begin = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(spec.concurrency)))
        wall = time.perf_counter() - measure_begin - spec.warmup

    ok = sum(count for status, count in statuses.items() if 200 <= status < 300)
    return {
        "requests": len(latencies),
        "ok": ok,
        "wall_s": wall,
        "rate": len(latencies) / wall if wall > 0 else 0.0,
        "ok_rate": ok / wall if wall > 0 else 0.0,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p90_ms": percentile(latencies, 0.90) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "max_ms": max(latencies) * 1000 if latencies else float("nan"),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "problems": problems,
        "exceptions": exceptions,
        "warmup_requests": warm_ops,
        "warmup_ok": warm_ok,
        "client_cpu_s": _own_cpu() - cpu_at_start[0],
    }


def _load_process(spec: LoadSpec, connection: Any) -> None:
    if spec.cpus:
        os.sched_setaffinity(0, spec.cpus)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        result = asyncio.run(_drive(spec, lambda: connection.send(("started", time.time()))))
        connection.send(("result", result))
    except BaseException as exc:
        connection.send(("error", repr(exc)))
    finally:
        connection.close()


def run_load(spec: LoadSpec, gateway: Gateway, *, extra_cpu: Callable[[], float] | None = None) -> dict[str, Any]:
    """Run ``spec`` in a spawned process; sample the server's CPU over the measured window."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_load_process, args=(spec, child), daemon=True)
    process.start()
    child.close()
    cpu_start = extra_start = busy_start = None
    result: dict[str, Any] | None = None
    error = None
    while result is None and error is None:
        if not parent.poll(spec.warmup + spec.duration + 60):
            error = "load process timed out"
            break
        try:
            kind, value = parent.recv()
        except EOFError:
            error = "load process died"
            break
        if kind == "started":
            busy_start = machine_busy_seconds()
            cpu_start = gateway.cpu_seconds()
            extra_start = extra_cpu() if extra_cpu else None
        elif kind == "result":
            result = value
        else:
            error = value
    cpu_end = gateway.cpu_seconds()
    busy_end = machine_busy_seconds()
    extra_end = extra_cpu() if extra_cpu else None
    process.join(10)
    if process.is_alive():
        process.kill()
    if error is not None or result is None:
        raise RuntimeError(f"load generator failed: {error}")
    server_cpu = cpu_end - (cpu_start if cpu_start is not None else cpu_end)
    result["server_cpu_s"] = server_cpu
    result["server_cpu_ms_per_request"] = 1000 * server_cpu / result["requests"] if result["requests"] else None
    result["server_cpu_utilisation"] = server_cpu / result["wall_s"] / NCPU if result["wall_s"] else None
    if extra_cpu is not None and extra_start is not None and extra_end is not None:
        result["store_cpu_s"] = extra_end - extra_start
        result["store_cpu_ms_per_request"] = (1000 * (extra_end - extra_start) / result["requests"]
                                              if result["requests"] else None)
    if busy_start is not None:
        # Busy CPU of the whole machine minus the server, the load generator and the store: other
        # work sharing the cores (other users' jobs), which the figures above had to compete with.
        other = busy_end - busy_start - server_cpu - result["client_cpu_s"] - result.get("store_cpu_s", 0.0)
        result["other_cpu_s"] = max(0.0, other)
        result["machine_busy_fraction"] = (busy_end - busy_start) / result["wall_s"] / NCPU
    result["server_rss"] = gateway.rss()
    return result


# --- set-up over HTTP -----------------------------------------------------------------------


async def _open_wallets_async(gateway: Gateway, count: int, tier: int, cash_in_fen: int,
                              fund: set[int]) -> list[str]:
    import aiohttp

    headers = {**gateway.teller(), "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=16)
    semaphore = asyncio.Semaphore(16)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def approve(approval: dict[str, Any]) -> None:
            """Dual control: tier 1 and large cash-ins wait for a second person (supervisor1)."""
            async with session.post(f"{gateway.url}/v1/approvals/{approval['approval_id']}/approve",
                                    data=json.dumps({"payload_hash": approval["payload_hash"], "note": "bench"}),
                                    headers=gateway.supervisor()) as response:
                if response.status != 200:
                    raise RuntimeError(f"approve: {response.status} {await response.text()}; {gateway.state()}")

        async def one(index: int) -> str:
            async with semaphore:
                body = {"holder_name": f"Bench Holder {index}", "phone": "13800138000", "tier": tier,
                        "kind": "personal"}
                async with session.post(gateway.url + "/v1/wallets", data=json.dumps(body)) as response:
                    if response.status != 201:
                        raise RuntimeError(f"open wallet: {response.status} {await response.text()}; {gateway.state()}")
                    opened = await response.json()
                    wallet_id: str = opened["wallet_id"]
                if opened.get("tier_approval"):
                    await approve(opened["tier_approval"])
                if index in fund:
                    async with session.post(f"{gateway.url}/v1/wallets/{wallet_id}/cash-in",
                                            data=json.dumps({"amount_fen": cash_in_fen}),
                                            headers={"Idempotency-Key": os.urandom(16).hex()}) as response:
                        if response.status == 202:
                            await approve(await response.json())
                        elif response.status != 200:
                            raise RuntimeError(f"cash-in: {response.status} {await response.text()}; "
                                               f"{gateway.state()}")
                return wallet_id

        return list(await asyncio.gather(*(one(i) for i in range(count))))


def open_wallets(gateway: Gateway, count: int, *, tier: int = 1, cash_in_fen: int = 10**12,
                 funded: int | None = None) -> list[str]:
    """Open ``count`` wallets as the teller; cash in ``cash_in_fen`` to the first ``funded`` of them."""
    fund = set(range(count if funded is None else funded))
    try:
        return asyncio.run(_open_wallets_async(gateway, count, tier, cash_in_fen, fund))
    except OSError as exc:  # aiohttp's connection errors are OSErrors
        raise RuntimeError(f"opening wallets: {exc!r}; {gateway.state()}") from exc


# --- reporting helpers ----------------------------------------------------------------------


def machine() -> dict[str, str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    kernel = os.uname().release
    return {"nproc": str(NCPU), "cpu": model, "ram": memory, "kernel": kernel}


def versions() -> dict[str, str]:
    from importlib.metadata import version

    found = {"python": sys.version.split()[0]}
    for package in ("aiohttp", "python-pkcs11", "uvloop", "psycopg"):
        try:
            found[package] = version(package)
        except Exception:
            found[package] = "not installed"
    try:
        result = subprocess.run(["softhsm2-util", "--version"], capture_output=True, text=True)
        found["softhsm2"] = result.stdout.strip() or result.stderr.strip()
    except OSError:
        found["softhsm2"] = "not found"
    found["postgresql"] = postgres_version_offline()
    try:
        result = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
        found["wrk"] = (result.stdout or result.stderr).splitlines()[0].strip()
    except (OSError, IndexError):
        found["wrk"] = "not installed"
    return found


def affinity_plan(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """(server CPUs, client CPUs). With ``pin`` on a machine of 2+ CPUs: client on the last CPU,
    server on the others — on 2 cores that leaves the server (and its signer workers) one core."""
    if not pin or NCPU < 2:
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    return set(cpus[:-1]), {cpus[-1]}
