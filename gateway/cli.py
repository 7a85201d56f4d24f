"""``ecny-gateway`` — the command line (docs/spec.md §3).

Every command takes ``--config FILE`` (or ``ECNY_CONFIG``); settings can be overridden by
``ECNY_<SECTION>__<KEY>`` variables. Secrets never come from arguments: the HSM PIN from
``ECNY_HSM__PIN`` or ``hsm.pin_file``, new passwords from a prompt or standard input. Errors are
one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import logging
import os
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher

from gateway import __version__, logs
from gateway.attest.alliance import AllianceSync
from gateway.audit import witness
from gateway.audit.chain import AuditEntry, append, chain_now
from gateway.audit.verify import TRUST_PINNED, pinned_key, verify_store
from gateway.auth.credentials import add_client, add_user, list_clients, revoke_client, rotate_client
from gateway.auth.roles import CLIENT_ONLY_ROLES, Role
from gateway.auth.users import (
    disable_user,
    enable_user,
    end_sessions,
    list_users,
    set_password,
    set_role,
    user_document,
)
from gateway.config import Settings, load_settings, read_private_file
from gateway.errors import ConfigError, GatewayError, ValidationFailed
from gateway.hardwallet.simulator import add_command as add_device_sim  # `device-sim` (issue 4)
from gateway.hsm.doctor import diagnose
from gateway.hsm.pool import SignerPool
from gateway.hsm.profile import load_named_profile
from gateway.key_lifecycle import AdoptionRequest, adopt_key, adoption_uri, disable_key, generate_key, rotate_key
from gateway.keys import Usage, get_key, list_keys
from gateway.ledger.engines import open_database
from gateway.ledger.journal import check_invariants
from gateway.ledger.store import Database, Tx
from gateway.metrics import Metrics
from gateway.monitor.worker import RiskMonitor
from gateway.offline.invariants import check_offline_entries
from gateway.signing import Algorithm

EXIT_ERROR = 2
EXIT_AUDIT_BROKEN = 1
EXIT_INTERNAL = 70
"""An unexpected exception: one line naming it (``ECNY_TRACEBACK=1`` re-raises it for a developer)."""


def _actor() -> AuditEntry:
    user = os.environ.get("SUDO_USER") or os.environ.get("USER") or "unknown"
    return AuditEntry(actor=f"cli:{user}", role="admin", action="", decision="allowed")


def _settings(args: argparse.Namespace) -> Settings:
    path = args.config or os.environ.get("ECNY_CONFIG")
    settings = load_settings(Path(path) if path else None)
    if getattr(args, "db", None):
        settings.store.dsn = args.db
    return settings


def _existing_store(settings: Settings) -> Settings:
    """For the commands that check a store: a SQLite file that does not exist is refused, never created
    (a mistyped path would otherwise be made, migrated, and reported sound)."""
    dsn = settings.store.dsn
    if dsn.startswith("sqlite:///") and dsn != "sqlite:///:memory:":
        path = Path(dsn.removeprefix("sqlite:///"))
        if not path.is_file():
            raise ConfigError(f"store.dsn: no database at {path}")
    return settings


async def _with_database(settings: Settings, work: Callable[[Database], Awaitable[Any]]) -> Any:
    database = await open_database(settings.store.dsn)
    try:
        await database.migrate()
        result = await work(database)
        await chain_now(database)  # PostgreSQL: chain the audit entries the command staged
        return result
    finally:
        await database.close()


async def _with_pool(settings: Settings, work: Callable[[Any, Any], Awaitable[Any]]) -> Any:
    from gateway.app import pool_settings  # start-up cost: the whole HTTP API (~0.35 s) only when the HSM is used

    profile = load_named_profile(settings.hsm.profile)
    options = pool_settings(settings, profile)
    options.workers = 1
    pool = await SignerPool.start(profile, options)
    try:
        return await work(pool, profile)
    finally:
        await pool.close()


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


@contextlib.contextmanager
def _progress(args: argparse.Namespace, description: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr, told (done, total); drawn only when stderr is a terminal and
    the output is not ``--json`` (a pipe or a log gets no control characters)."""
    if getattr(args, "json", False) or not sys.stderr.isatty():
        yield lambda _done, _total: None
        return
    from rich.console import Console  # start-up cost: only commands that draw a bar load rich
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(file=sys.stderr), transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


# --- commands -------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    # Start-up cost: aiohttp and the whole HTTP API (~0.35 s) load only for `serve`, not every command.
    from aiohttp import web

    from gateway.app import make_app, ssl_context

    settings = _settings(args)
    logs.configure(settings.logging.level)
    server = settings.server
    scheme = "https" if server.tls_cert else "http"
    if args.child is None and server.processes > 1:
        return _supervise(args, settings, scheme)
    try:
        import uvloop  # optional: the faster event loop where it is installed

        uvloop.install()
    except ImportError:
        pass
    if args.child is None:
        print(f"ecny-gateway {__version__} on {scheme}://{server.host}:{server.port}", flush=True)
    web.run_app(
        make_app(settings, process_index=args.child or 0),
        host=server.host,
        port=server.port,
        reuse_port=args.child is not None,
        ssl_context=ssl_context(settings),
        access_log=logging.getLogger("aiohttp.access") if server.access_log else None,
        print=None,
        shutdown_timeout=10,
    )
    return 0


def _supervise(args: argparse.Namespace, settings: Settings, scheme: str) -> int:
    """``[server] processes > 1``: migrate once, bind once, run the HTTP processes (gateway.supervisor)."""
    # Start-up cost: only `serve` with processes > 1 needs it.
    from gateway.supervisor import Supervisor, child_command, reserve_port

    asyncio.run(_migrate(settings))
    server = settings.server
    try:
        sock = reserve_port(server.host, server.port)
    except OSError as exc:
        raise ConfigError(f"server: cannot listen on {server.host}:{server.port}: {exc.strerror}") from exc
    port = sock.getsockname()[1]
    print(f"ecny-gateway {__version__} on {scheme}://{server.host}:{port} ({server.processes} processes)",
          flush=True)
    config = args.config or os.environ.get("ECNY_CONFIG")
    return Supervisor(child_command(str(Path(config).resolve()) if config else None), server.processes, sock).run()


async def _migrate(settings: Settings, progress: Callable[[int, int], None] | None = None) -> list[str]:
    database = await open_database(settings.store.dsn)
    try:
        return await database.migrate(progress)
    finally:
        await database.close()


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    with _progress(args, "migrating") as progress:
        applied = asyncio.run(_migrate(settings, progress))
    if args.json:
        _print_json({"applied": applied})
    else:
        print(f"applied: {', '.join(applied)}" if applied else "schema is up to date")
    return 0


def cmd_keys_generate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    try:
        algorithm = Algorithm(args.algorithm)
        usages = frozenset(Usage(u.strip()) for u in args.usage.split(",") if u.strip())
    except ValueError as exc:
        raise ValidationFailed(str(exc)) from exc

    async def work(database: Database) -> dict[str, Any]:
        async def with_pool(pool: Any, profile: Any) -> dict[str, Any]:
            entry = _actor()
            entry.action = "keys.create"
            record = await generate_key(database, pool, profile, args.label, algorithm, usages, entry)
            return record.document()

        result: dict[str, Any] = await _with_pool(settings, with_pool)
        return result

    _print_json(asyncio.run(_with_database(settings, work)))
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    settings = _settings(args)
    records = asyncio.run(_with_database(settings, lambda db: db.read(list_keys)))
    if args.json:
        _print_json({"keys": [record.document() for record in records]})
        return 0
    for record in records:
        print(f"{record.key_id}  {record.algorithm.value:16} {','.join(sorted(record.usages)):20} {record.label}")
    return 0


def cmd_keys_show(args: argparse.Namespace) -> int:
    settings = _settings(args)
    record = asyncio.run(_with_database(settings, lambda db: db.read(lambda tx: get_key(tx, args.key_id))))
    document = record.document()
    if args.json:
        _print_json(document)
        return 0
    print(document["public_key_pem"], end="")
    if "address" in document:
        print(f"address: {document['address']}")
    print(f"key_id: {record.key_id}\nlabel: {record.label}\nalgorithm: {record.algorithm.value}\n"
          f"usage: {','.join(sorted(record.usages))}")
    return 0


def _usages(text: str) -> frozenset[Usage]:
    try:
        return frozenset(Usage(u.strip()) for u in text.split(",") if u.strip())
    except ValueError as exc:
        raise ValidationFailed(f"--usage: {exc}; use {','.join(u.value for u in Usage)}") from exc


def _key_entry(action: str) -> AuditEntry:
    entry = _actor()
    entry.action = action
    return entry


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    settings = _settings(args)

    async def work(database: Database) -> dict[str, Any]:
        async def with_pool(pool: Any, profile: Any) -> dict[str, Any]:
            record = await rotate_key(database, pool, profile, args.key_id, _key_entry("keys.rotate"))
            return record.document()

        result: dict[str, Any] = await _with_pool(settings, with_pool)
        return result

    _print_json(asyncio.run(_with_database(settings, work)))
    return 0


def cmd_keys_disable(args: argparse.Namespace) -> int:
    settings = _settings(args)

    async def work(database: Database) -> dict[str, Any]:
        record = await disable_key(database, args.key_id, _key_entry("keys.disable"))
        return record.document()

    _print_json(asyncio.run(_with_database(settings, work)))
    return 0


def cmd_keys_adopt(args: argparse.Namespace) -> int:
    settings = _settings(args)
    request = AdoptionRequest(args.uri, _usages(args.usage))
    uri = adoption_uri(request.uri)  # a bad URI fails before the HSM is opened
    if uri.pin_source is not None or uri.module_path is not None or uri.module_name is not None:
        print("ecny-gateway: note: pin-source, module-name and module-path in --uri are ignored; the key is looked "
              "for in the configured token with the configured module and PIN", file=sys.stderr)

    async def work(database: Database) -> dict[str, Any]:
        async def with_pool(pool: Any, profile: Any) -> dict[str, Any]:
            record = await adopt_key(database, pool, profile, request, _key_entry("keys.adopt"))
            return record.document()

        result: dict[str, Any] = await _with_pool(settings, with_pool)
        return result

    _print_json(asyncio.run(_with_database(settings, work)))
    return 0


def _role(text: str) -> Role:
    try:
        return Role(text)
    except ValueError:
        raise ValidationFailed(f"unknown role {text!r}; use one of {[r.value for r in Role]}") from None


def cmd_clients_add(args: argparse.Namespace) -> int:
    settings = _settings(args)
    role = _role(args.role)

    def work(tx: Tx) -> str:
        key = add_client(tx, args.name, role, args.owner)
        entry = _actor()
        entry.action, entry.result = "clients.add", {"name": args.name, "role": role.value,
                                                     "owner": args.owner or args.name}
        append(tx, [entry])
        return key

    key = asyncio.run(_with_database(settings, lambda db: db.write(work)))
    print("API key (shown once; only its hash is stored):", file=sys.stderr)
    print(key)
    return 0


def cmd_clients_list(args: argparse.Namespace) -> int:
    settings = _settings(args)
    rows = asyncio.run(_with_database(settings, lambda db: db.read(list_clients)))
    if args.json:
        _print_json({"clients": rows})
        return 0
    for row in rows:
        state = f"revoked {row['revoked_at']}" if row["revoked_at"] else "active"
        print(f"{row['name']:24} {row['role']:10} {row['owner']:16} ecny_{row['key_prefix']}_…  {state}")
    return 0


def cmd_clients_revoke(args: argparse.Namespace) -> int:
    settings = _settings(args)

    def work(tx: Tx) -> None:
        revoke_client(tx, args.name)
        entry = _actor()
        entry.action, entry.result = "clients.revoke", {"name": args.name}
        append(tx, [entry])

    asyncio.run(_with_database(settings, lambda db: db.write(work)))
    print(f"revoked {args.name}")
    return 0


def cmd_clients_rotate(args: argparse.Namespace) -> int:
    """A new key for an active client, printed once on stdout; the old key is revoked in the same
    transaction (only the new key's hash is stored)."""
    settings = _settings(args)

    def work(tx: Tx) -> str:
        key = rotate_client(tx, args.name)
        entry = _actor()
        entry.action, entry.result = "clients.rotate", {"name": args.name, "key_prefix": key.split("_")[1]}
        append(tx, [entry])
        return key

    key = asyncio.run(_with_database(settings, lambda db: db.write(work)))
    print(f"new API key for {args.name} (shown once; the old key is revoked):", file=sys.stderr)
    print(key)
    return 0


def _read_new_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("new password: ")
    if first != getpass.getpass("again: "):
        raise ValidationFailed("the passwords differ")
    return first


def cmd_users_add(args: argparse.Namespace) -> int:
    settings = _settings(args)
    role = _role(args.role)
    if role in CLIENT_ONLY_ROLES:
        raise ValidationFailed(f"{role.value} is a role for API clients; use 'clients add'")
    password = _read_new_password(args.password_stdin)
    hasher = PasswordHasher()

    def work(tx: Tx) -> None:
        add_user(tx, hasher, args.username, role, password, args.owner)
        entry = _actor()
        entry.action, entry.result = "users.add", {"username": args.username, "role": role.value,
                                                   "owner": args.owner or args.username}
        append(tx, [entry])

    asyncio.run(_with_database(settings, lambda db: db.write(work)))
    print(f"added {args.username} ({role.value})")
    return 0


def _administer_user(username: str, args: argparse.Namespace, action: str,
                     change: Callable[[Tx, str], dict[str, Any]]) -> dict[str, Any]:
    """Run ``change`` on ``username`` with its audit entry in one transaction (gateway/auth/users.py:
    live sessions see it from their next request). Returns what ``change`` returned."""
    settings = _settings(args)

    def work(tx: Tx) -> dict[str, Any]:
        result = change(tx, username)
        entry = _actor()
        entry.action, entry.result = action, {"username": username, **result}
        append(tx, [entry])
        return result

    result: dict[str, Any] = asyncio.run(_with_database(settings, lambda db: db.write(work)))
    return result


def cmd_users_disable(args: argparse.Namespace) -> int:
    result = _administer_user(args.username, args, "users.disable",
                              lambda tx, name: {"sessions_ended": disable_user(tx, name)})
    print(f"disabled {args.username}; {result['sessions_ended']} session(s) ended")
    return 0


def cmd_users_enable(args: argparse.Namespace) -> int:
    def change(tx: Tx, name: str) -> dict[str, Any]:
        enable_user(tx, name)
        return {}

    _administer_user(args.username, args, "users.enable", change)
    print(f"enabled {args.username}")
    return 0


def cmd_users_set_role(args: argparse.Namespace) -> int:
    role = _role(args.role)
    _administer_user(args.username, args, "users.set_role",
                     lambda tx, name: {"previous_role": set_role(tx, name, role), "role": role.value})
    print(f"{args.username} is now {role.value} (live sessions too)")
    return 0


def cmd_users_list(args: argparse.Namespace) -> int:
    settings = _settings(args)
    rows = asyncio.run(_with_database(settings, lambda db: db.read(list_users)))
    if args.json:
        _print_json({"users": rows})
        return 0
    for row in rows:
        state = f"disabled {row['disabled_at']}" if row["disabled_at"] else "active"
        print(f"{row['username']:24} {row['role']:10} {row['owner']:16} {row['live_sessions']:3} session(s)  {state}")
    return 0


def cmd_users_passwd(args: argparse.Namespace) -> int:
    """A new password (from a prompt, or one line of stdin with --password-stdin; never argv); the
    user's sessions end."""
    settings = _settings(args)
    asyncio.run(_with_database(settings, lambda db: db.read(lambda tx: user_document(tx, args.username))))
    password = _read_new_password(args.password_stdin)
    hasher = PasswordHasher()
    result = _administer_user(args.username, args, "users.passwd",
                              lambda tx, name: {"sessions_ended": set_password(tx, hasher, name, password)})
    print(f"password of {args.username} changed; {result['sessions_ended']} session(s) ended")
    return 0


def cmd_sessions_end(args: argparse.Namespace) -> int:
    result = _administer_user(args.user, args, "users.end_sessions",
                              lambda tx, name: {"sessions_ended": end_sessions(tx, name)})
    print(f"ended {result['sessions_ended']} session(s) of {args.user}")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Exit 0 only when every entry and checkpoint verifies against the trusted keys (and the witness)."""
    settings = _existing_store(_settings(args))
    pinned = [pinned_key(spec) for spec in args.public_key or []]
    witnessed = None
    if args.witness:
        witnessed, witness_warnings = witness.read(Path(args.witness))
        for warning in witness_warnings:
            print(f"warning: {warning}", file=sys.stderr)
    if not pinned:
        print("WARNING: no --public-key: trusting the key table of the database being verified. This is NOT an "
              "outsider-grade verification; pin the audit key with --public-key KEY_ID=PEM_FILE.", file=sys.stderr)

    async def run(progress: Callable[[int, int], None]) -> Any:
        database = await open_database(settings.store.dsn)
        try:
            return await verify_store(database, "cli:audit-verify", pinned, witnessed, progress)
        finally:
            await database.close()

    with _progress(args, "verifying the audit chain") as progress:
        report = asyncio.run(run(progress))
    if args.json:
        _print_json({**report.document(), "witnessed": report.witnessed if witnessed is not None else None,
                     "pinned_keys": sorted(key.key_id for key in pinned)})
        return 0 if report.ok else EXIT_AUDIT_BROKEN
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if witnessed is None:
        print("warning: no --witness: a chain whose last entries were deleted together with the checkpoints after "
              "them verifies; pass --witness FILE ([audit] witness_file, or a collector's copy) to catch a cut tail",
              file=sys.stderr)
    if report.ok:
        trust = (f"pinned keys {', '.join(sorted(key.key_id for key in pinned))}" if report.trust == TRUST_PINNED
                 else "key table, not outsider-grade")
        witnessed_text = f", {report.witnessed} witnessed checkpoints present" if witnessed is not None else ""
        print(f"audit chain intact: {report.entries} entries, {report.checkpoints} signed checkpoints "
              f"(last at {report.last_checkpoint_seq}{witnessed_text}; trust: {trust})")
        return 0
    print(f"audit chain BROKEN at entry {report.first_bad_seq}: {report.problem}")
    return EXIT_AUDIT_BROKEN


def cmd_ledger_check(args: argparse.Namespace) -> int:
    settings = _existing_store(_settings(args))
    checks = [check_invariants, check_offline_entries]

    with _progress(args, "checking the ledger") as progress:
        def run_checks(tx: Tx) -> list[str]:
            found: list[str] = []
            for done, check in enumerate(checks):
                progress(done, len(checks))
                found += check(tx)
            progress(len(checks), len(checks))
            return found

        problems = asyncio.run(_with_database(settings, lambda db: db.read(run_checks)))
    if args.json:
        _print_json({"ok": not problems, "problems": problems})
        return EXIT_AUDIT_BROKEN if problems else 0
    for problem in problems:
        print(problem)
    if problems:
        print(f"ledger BROKEN: {len(problems)} problem(s)")
        return EXIT_AUDIT_BROKEN
    print("ledger sound: every entry balances, balances equal postings, no wallet is negative, "
          "offline reserves match their devices")
    return 0


def cmd_risk_monitor(args: argparse.Namespace) -> int:
    """The risk evaluator as a process of its own, beside HTTP processes configured with ``[risk] monitor =
    false``: their GIL then serves requests only. One evaluator at a time still holds the lease; with no
    in-process nudge it finds new signals every ``[risk] poll_seconds``. Runs until SIGTERM or SIGINT."""
    settings = _settings(args)
    logs.configure(settings.logging.level)
    settings = settings.model_copy(update={"risk": settings.risk.model_copy(update={"monitor": True})})

    async def evaluate(database: Database) -> None:
        monitor = RiskMonitor(database, settings, Metrics())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        monitor.start()
        print("ecny-gateway risk monitor: evaluating", flush=True)
        try:
            await stop.wait()
        finally:
            await monitor.close()

    asyncio.run(_with_database(settings, evaluate))
    return 0


MIN_ALLIANCE_KEY_BYTES = 32


def _read_alliance_key(source: str | None) -> bytes:
    """The alliance key's value, hex, from a 0600 file or standard input — never an argument."""
    if source is not None and source != "-":
        text = read_private_file(Path(source), "--from-file")
    else:
        text = sys.stdin.readline().strip()
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise ValidationFailed("the alliance key must be hex (e.g. `openssl rand -hex 32`)") from None
    if len(value) < MIN_ALLIANCE_KEY_BYTES:
        raise ValidationFailed(f"the alliance key must be at least {MIN_ALLIANCE_KEY_BYTES} bytes")
    return value


def cmd_alliance_import_key(args: argparse.Namespace) -> int:
    """Key ceremony: store the alliance's HMAC key in this bank's HSM (sensitive, not extractable)."""
    settings = _settings(args)
    label = args.label or settings.alliance.hmac_key_label
    value = _read_alliance_key(args.from_file)

    async def work(database: Database) -> dict[str, bool]:
        async def with_pool(pool: Any, _profile: Any) -> dict[str, bool]:
            attributes: dict[str, bool] = await pool.import_secret(label, value)
            return attributes

        attributes: dict[str, bool] = await _with_pool(settings, with_pool)
        entry = _actor()
        entry.action, entry.result = "alliance.import_key", {"label": label, "attributes": attributes}
        await database.write(lambda tx: append(tx, [entry]))
        return attributes

    attributes = asyncio.run(_with_database(settings, work))
    print(f"imported the alliance key as {label!r}: " + ", ".join(f"{k}={v}" for k, v in sorted(attributes.items())))
    return 0


def cmd_alliance_sync(args: argparse.Namespace) -> int:
    """Pull every configured peer's fingerprints once (or one peer's); exit 1 if any pull failed."""
    settings = _settings(args)
    if args.peer is not None and args.peer not in {peer.member_id for peer in settings.alliance.peers}:
        raise ValidationFailed(f"no peer {args.peer!r} in [alliance] peers")
    reports = asyncio.run(_with_database(settings, lambda db: AllianceSync(db, settings.alliance).sync_all(args.peer)))
    for report in reports:
        state = "ok" if report.ok else f"REFUSED ({report.code}): {report.error}"
        print(f"{report.member_id}: {report.stored} new fingerprint(s), cursor {report.cursor}, head {report.head}; "
              f"{state}")
    if not reports:
        print("no peers configured ([alliance] peers)")
    return 0 if all(report.ok for report in reports) else EXIT_AUDIT_BROKEN


def cmd_hsm_doctor(args: argparse.Namespace) -> int:
    """The device against the profile (gateway/hsm/doctor.py); exit 1 when any check finds a problem."""
    settings = _settings(args)
    name = args.profile or settings.hsm.profile
    profile = load_named_profile(name)
    module_path = settings.hsm.module or profile.module.path
    token_label = settings.hsm.token_label or profile.token.resolved_label()
    report = diagnose(profile, module_path, token_label, None if args.no_login else settings.hsm.read_pin())
    if args.json:
        _print_json(report.document())
    else:
        print(f"profile {name} ({profile.name}), module {module_path}, token {token_label!r}")
        for check in report.checks:
            print(f"{check.status.upper():8} {check.check}: {check.detail}")
        print("HSM matches the profile" if report.ok else "HSM does NOT match the profile")
    return 0 if report.ok else EXIT_AUDIT_BROKEN


def cmd_dev_init(args: argparse.Namespace) -> int:
    from gateway.devinit import dev_init  # start-up cost: it loads the HTTP API (~0.3 s) for the signer pool

    return dev_init(Path(args.var))


# --- parser ---------------------------------------------------------------------------------


JSON_HELP = "print one JSON document on stdout (no progress bar, no table)"
OWNER_HELP = ("the person behind the identity (default: its name); dual control treats identities with one "
              "owner as one person")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ecny-gateway", description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"ecny-gateway {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="TOML settings file (default: $ECNY_CONFIG)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help=JSON_HELP)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", parents=[common], help="run the gateway")
    serve.add_argument("--child", type=int, help=argparse.SUPPRESS)  # HTTP process N of `serve` (gateway.supervisor)
    serve.set_defaults(run=cmd_serve)
    migrate = commands.add_parser("migrate", parents=[common], help="create or upgrade the schema")
    migrate.add_argument("--db", help="store DSN (sqlite:///path or postgresql://…)")
    migrate.add_argument("--json", action="store_true", help=JSON_HELP)
    migrate.set_defaults(run=cmd_migrate)

    keys = commands.add_parser("keys", help="HSM keys").add_subparsers(dest="keys_command", required=True)
    generate = keys.add_parser("generate", parents=[common], help="generate a key pair inside the HSM")
    generate.add_argument("--label", required=True)
    generate.add_argument("--algorithm", required=True, choices=[a.value for a in Algorithm])
    generate.add_argument("--usage", required=True, help="comma-separated: " + ",".join(u.value for u in Usage))
    generate.set_defaults(run=cmd_keys_generate)
    keys.add_parser("list", parents=[common, as_json], help="list keys").set_defaults(run=cmd_keys_list)
    show = keys.add_parser("show", parents=[common, as_json], help="public key PEM (and EVM address)")
    show.add_argument("key_id")
    show.set_defaults(run=cmd_keys_show)
    rotate = keys.add_parser("rotate", parents=[common], help="make the next version of a key (inside the HSM) "
                             "the active one; older versions only verify")
    rotate.add_argument("key_id", help="any version of the key family")
    rotate.set_defaults(run=cmd_keys_rotate)
    disable = keys.add_parser("disable", parents=[common], help="stop a key version: it signs nothing; its "
                              "signatures still verify")
    disable.add_argument("key_id")
    disable.set_defaults(run=cmd_keys_disable)
    adopt = keys.add_parser("adopt", parents=[common], help="register an existing private key of the token, after "
                            "checking it is private, sensitive and not extractable")
    adopt.add_argument("--uri", required=True, help="RFC 7512 URI of the key, e.g. 'pkcs11:token=T;object=L;id=%%01…' "
                       "(no pin-value: the PIN comes from hsm.pin_file or ECNY_HSM__PIN)")
    adopt.add_argument("--usage", required=True, help="comma-separated: " + ",".join(u.value for u in Usage))
    adopt.set_defaults(run=cmd_keys_adopt)

    clients = commands.add_parser("clients", help="API clients").add_subparsers(dest="clients_command", required=True)
    add = clients.add_parser("add", parents=[common], help="create a client; prints its API key once")
    add.add_argument("--name", required=True)
    add.add_argument("--role", required=True, choices=[r.value for r in Role])
    add.add_argument("--owner", help=OWNER_HELP)
    add.set_defaults(run=cmd_clients_add)
    clients.add_parser("list", parents=[common, as_json], help="list clients").set_defaults(run=cmd_clients_list)
    revoke = clients.add_parser("revoke", parents=[common], help="revoke a client's key")
    revoke.add_argument("name")
    revoke.set_defaults(run=cmd_clients_revoke)
    rotate = clients.add_parser("rotate", parents=[common],
                                help="a new key for a client, printed once; its old key is revoked")
    rotate.add_argument("name")
    rotate.set_defaults(run=cmd_clients_rotate)

    users = commands.add_parser("users", help="users of the teller UI").add_subparsers(dest="users_command",
                                                                                      required=True)
    user_add = users.add_parser("add", parents=[common], help="add a user (password from a prompt)")
    user_add.add_argument("--username", required=True)
    user_add.add_argument("--role", required=True, choices=[r.value for r in Role if r not in CLIENT_ONLY_ROLES])
    user_add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    user_add.add_argument("--owner", help=OWNER_HELP)
    user_add.set_defaults(run=cmd_users_add)
    user_disable = users.add_parser("disable", parents=[common], help="disable a user and end their sessions")
    user_disable.add_argument("username")
    user_disable.set_defaults(run=cmd_users_disable)
    user_enable = users.add_parser("enable", parents=[common], help="let a disabled user log in again")
    user_enable.add_argument("username")
    user_enable.set_defaults(run=cmd_users_enable)
    set_role = users.add_parser("set-role", parents=[common], help="change a user's role (live sessions at once)")
    set_role.add_argument("username")
    set_role.add_argument("role", choices=[r.value for r in Role if r not in CLIENT_ONLY_ROLES])
    set_role.set_defaults(run=cmd_users_set_role)
    users.add_parser("list", parents=[common, as_json], help="list users").set_defaults(run=cmd_users_list)
    passwd = users.add_parser("passwd", parents=[common],
                              help="set a user's password (from a prompt or stdin) and end their sessions")
    passwd.add_argument("username")
    passwd.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    passwd.set_defaults(run=cmd_users_passwd)

    sessions = commands.add_parser("sessions", help="teller UI sessions").add_subparsers(
        dest="sessions_command", required=True)
    sessions_end = sessions.add_parser("end", parents=[common], help="end every session of a user")
    sessions_end.add_argument("--user", required=True, help="username whose sessions end")
    sessions_end.set_defaults(run=cmd_sessions_end)

    audit = commands.add_parser("audit", help="audit log").add_subparsers(dest="audit_command", required=True)
    verify = audit.add_parser("verify", parents=[common], help="verify the chain and its signed checkpoints")
    verify.add_argument("--db", help="store DSN (default: the configured store)")
    verify.add_argument(
        "--public-key", action="append", metavar="KEY_ID=PEM_FILE",
        help="trust this audit public key (P-256, Ed25519 or SM2 PEM, or the SM2 point block of `keys show`); "
             "the pinned keys are the whole trust set, the key table is then not trusted (repeatable)",
    )
    verify.add_argument(
        "--witness", metavar="FILE",
        help="checkpoint witness ([audit] witness_file, or a collector's copy of GET /v1/audit/checkpoints): "
             "fails when the chain ends before, or disagrees with, a witnessed checkpoint",
    )
    verify.add_argument("--json", action="store_true", help=JSON_HELP)
    verify.set_defaults(run=cmd_audit_verify)

    ledger = commands.add_parser("ledger", help="the double-entry ledger").add_subparsers(
        dest="ledger_command", required=True
    )
    check = ledger.add_parser("check", parents=[common], help="check the ledger's invariants")
    check.add_argument("--db", help="store DSN (default: the configured store)")
    check.add_argument("--json", action="store_true", help=JSON_HELP)
    check.set_defaults(run=cmd_ledger_check)

    hsm = commands.add_parser("hsm", help="the HSM").add_subparsers(dest="hsm_command", required=True)
    doctor = hsm.add_parser("doctor", parents=[common, as_json],
                            help="check slots, token, mechanisms and key attributes against the profile")
    doctor.add_argument("--profile", help="profile name or file (default: hsm.profile)")
    doctor.add_argument("--no-login", action="store_true",
                        help="no PIN: skip the login and the key attribute checks")
    doctor.set_defaults(run=cmd_hsm_doctor)


    risk = commands.add_parser("risk", help="risk monitoring").add_subparsers(dest="risk_command", required=True)
    risk_monitor = risk.add_parser(
        "monitor", parents=[common],
        help="evaluate the risk rules in a process of its own (beside HTTP processes with [risk] monitor = false)")
    risk_monitor.set_defaults(run=cmd_risk_monitor)

    alliance = commands.add_parser("alliance", help="trade-finance alliance").add_subparsers(
        dest="alliance_command", required=True)
    import_key = alliance.add_parser(
        "import-key", parents=[common],
        help="key ceremony: store the alliance HMAC key (hex, from --from-file or standard input) in the HSM")
    import_key.add_argument("--from-file", metavar="FILE",
                            help="file holding the key in hex (mode 0600); default or '-': standard input")
    import_key.add_argument("--label", help="CKA_LABEL (default: [alliance] hmac_key_label)")
    import_key.set_defaults(run=cmd_alliance_import_key)
    alliance_sync = alliance.add_parser("sync", parents=[common], help="pull the peers' fingerprint batches now")
    alliance_sync.add_argument("--peer", metavar="MEMBER_ID", help="only this peer")
    alliance_sync.set_defaults(run=cmd_alliance_sync)

    add_device_sim(commands)

    dev = commands.add_parser("dev-init", help="development set-up used by `make run`")
    dev.add_argument("--var", default="var", help="folder for the token, database and credentials")
    dev.set_defaults(run=cmd_dev_init)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
        return code
    except GatewayError as error:
        print(f"ecny-gateway: {error.detail}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `… --json | head`: the reader has gone; nothing to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as error:  # a file named on the command line or in the settings
        where = f": {error.filename}" if error.filename else ""
        print(f"ecny-gateway: {error.strerror or error}{where}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as error:  # a bug: one line, never a traceback (it may quote settings)
        if os.environ.get("ECNY_TRACEBACK"):
            raise
        print(f"ecny-gateway: unexpected {type(error).__name__}: {error} (set ECNY_TRACEBACK=1 to see where)",
              file=sys.stderr)
        return EXIT_INTERNAL


def random_password() -> str:
    return secrets.token_urlsafe(18)


if __name__ == "__main__":
    sys.exit(main())
