"""The aiohttp application: ``make_app(settings)``.

Each resource the application holds (store, signer pool, audit log, refusal tally) is opened in
a cleanup context of its own and reached through a typed ``AppKey``; ``app[RUNTIME]`` puts them
together for the endpoints. There is no module-level state.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from gateway.api import approvals as approvals_api
from gateway.api import attestations as attestations_api
from gateway.api import audit as audit_api
from gateway.api import devices as devices_api
from gateway.api import docs as docs_api
from gateway.api import evm as evm_api
from gateway.api import evm_rpc as evm_rpc_api
from gateway.api import keys as keys_api
from gateway.api import probes as probes_api
from gateway.api import risk as risk_api
from gateway.api import risk_delivery as risk_delivery_api
from gateway.api import sessions as sessions_api
from gateway.api import transfers as transfers_api
from gateway.api import users as users_api
from gateway.api import wallets as wallets_api
from gateway.api.endpoints import IDEMPOTENCY, LOGIN_LIMITER, RATE_LIMITER, Endpoint, RateLimiter, guarded
from gateway.api.idempotency import InFlight
from gateway.api.middleware import problem_middleware
from gateway.api.openapi import ENDPOINTS_KEY
from gateway.approvals.workflow import Approvals
from gateway.attest.alliance import AllianceSync
from gateway.attest.attestations import Attestations
from gateway.audit.chain import AuditLog
from gateway.audit.refusals import RefusalTally
from gateway.audit.witness import witness_path
from gateway.auth.credentials import Authenticator
from gateway.auth.throttle import LoginThrottle, PasswordCheckGate
from gateway.config import Settings
from gateway.evm.messages import EvmMessages
from gateway.evm.rpc import EvmRpc
from gateway.evm.transactions import APPROVAL_KIND as EVM_APPROVAL_KIND
from gateway.evm.transactions import EvmTransactions
from gateway.evm.typed_data import APPROVAL_KIND as TYPED_DATA_APPROVAL_KIND
from gateway.evm.typed_data import EvmTypedData
from gateway.hsm.pool import PoolSettings, SignerPool
from gateway.hsm.profile import HsmProfile, load_named_profile
from gateway.hsm.signer import CountedSigner
from gateway.keys import KeyDirectory, Usage, flag_raw_not_exclusive, raw_not_exclusive_keys
from gateway.ledger.engines import open_database
from gateway.ledger.house import HouseFolder
from gateway.ledger.store import Database
from gateway.metrics import Metrics
from gateway.monitor.process import NUDGE_ADDRESS_ENV, EvaluatorProcess, NudgeSender
from gateway.monitor.webhooks import WebhookDelivery, WebhookEndpoint
from gateway.monitor.worker import RiskMonitor
from gateway.offline.devices import Devices, register_offline_approvals
from gateway.runtime import RUNTIME, Runtime
from gateway.wallets.accounts import Wallets


def all_endpoints() -> list[Endpoint]:
    return [
        *probes_api.ENDPOINTS,
        *sessions_api.ENDPOINTS,
        *users_api.ENDPOINTS,
        *keys_api.ENDPOINTS,
        *wallets_api.ENDPOINTS,
        *transfers_api.ENDPOINTS,
        *approvals_api.ENDPOINTS,
        *devices_api.ENDPOINTS,
        *evm_api.ENDPOINTS,
        *evm_rpc_api.ENDPOINTS,
        *audit_api.ENDPOINTS,
        *attestations_api.ENDPOINTS,
        *docs_api.ENDPOINTS,
        *risk_delivery_api.ENDPOINTS,
        *risk_api.ENDPOINTS,
    ]


def pool_settings(settings: Settings, profile: HsmProfile, process_index: int = 0) -> PoolSettings:
    """The signer pool of one HTTP process: with ``[server] processes = N`` the configured signer
    workers are shared out between the N processes, at least one each."""
    hsm = settings.hsm
    total = hsm.workers or profile.sessions.workers
    processes = settings.server.processes
    share = total // processes + (1 if process_index < total % processes else 0)
    return PoolSettings(
        module_path=hsm.module or profile.module.path,
        token_label=hsm.token_label or profile.token.resolved_label(),
        pin=hsm.read_pin(),
        workers=max(1, share),
        max_batch=hsm.max_batch,
        token_attributes={} if hsm.token_label else profile.token.match_attributes(),
    )


def password_check_slots(settings: Settings) -> int:
    """This HTTP process's share of ``auth.password_checks_max`` (default 2 × CPU cores), at least one."""
    total = settings.auth.password_checks_max or 2 * (os.cpu_count() or 1)
    return max(1, total // settings.server.processes)


STORE = web.AppKey("store", Database)
"""The store, open and migrated (``store_context``)."""
HSM_PROFILE = web.AppKey("hsm_profile", HsmProfile)
"""The HSM family profile the signer pool was started with (``signer_context``)."""
SIGNER_POOL = web.AppKey("signer_pool", SignerPool)
"""This HTTP process's signer workers (``signer_context``)."""
AUDIT_LOG = web.AppKey("audit_log", AuditLog)
"""The audit log with its checkpoint ticker (``audit_context``)."""
REFUSAL_TALLY = web.AppKey("refusal_tally", RefusalTally)
"""The counted anonymous refusals (``refusal_context``)."""
METRICS = web.AppKey("metrics", Metrics)
"""This application's Prometheus registry (made with the application: nothing to close)."""
WEBHOOK_DELIVERY = web.AppKey("webhook_delivery", WebhookDelivery)
"""This process's loop delivering risk events to ``[[risk_webhooks]]`` (``webhook_delivery_context``)."""
RISK_MONITOR = web.AppKey("risk_monitor", RiskMonitor)
RISK_EVALUATOR = web.AppKey("risk_evaluator", EvaluatorProcess)  # only where it was started
"""The risk rules' evaluator of this process (``monitor_context``)."""

Context = Callable[[web.Application], AsyncIterator[None]]


def store_context(settings: Settings) -> Context:
    """Open and migrate the store; flag keys whose records were written around the gateway."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        database = await open_database(settings.store.dsn, settings.store.pool_size)
        try:
            await database.migrate()
            for record in await database.read(raw_not_exclusive_keys):
                flag_raw_not_exclusive(record)
            app[STORE] = database
            yield
        finally:
            await database.close()

    return context


def house_context(settings: Settings) -> Context:
    """PostgreSQL: fold the bank accounts' pending amounts on a schedule, and once more at shutdown."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        folder = HouseFolder(app[STORE], settings.store.house_fold_seconds)
        await folder.start()
        try:
            yield
        finally:
            await folder.close()

    return context


def signer_context(settings: Settings, process_index: int) -> Context:
    """Load the HSM profile and start this process's share of the signer workers."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        profile = load_named_profile(settings.hsm.profile)
        pool = await SignerPool.start(profile, pool_settings(settings, profile, process_index))
        try:
            app[HSM_PROFILE] = profile
            app[SIGNER_POOL] = pool
            yield
        finally:
            await pool.close()

    return context


def audit_context(settings: Settings) -> Context:
    """The audit log: grouped entries and signed, witnessed checkpoints (a last one at shutdown)."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        metrics = app[METRICS]
        audit = AuditLog(
            app[STORE], CountedSigner(app[SIGNER_POOL], metrics.signatures, Usage.AUDIT),
            settings.audit.checkpoint_every, settings.audit.flush_max, settings.audit.key_id,
            settings.audit.checkpoint_seconds, on_head=metrics.audit_head.set,
            witness_file=witness_path(settings.audit.witness_file, settings.store.dsn),
        )
        await audit.start()
        try:
            app[AUDIT_LOG] = audit
            yield
        finally:
            await audit.close()

    return context


def refusal_context(settings: Settings) -> Context:
    """Count anonymous refusals; what is counted is written before the audit log closes (contexts
    close in reverse order)."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        refusals = RefusalTally(app[AUDIT_LOG], settings.audit.refusal_window_seconds)
        refusals.start()
        try:
            app[REFUSAL_TALLY] = refusals
            yield
        finally:
            await refusals.close()

    return context


def monitor_context(settings: Settings, process_index: int) -> Context:
    """The risk monitor: evaluates committed signals off the request path (docs/risk.md) — in a task of
    this process, or (``[risk] evaluator = "process"``) in the evaluator process the first HTTP process
    starts, this process's monitor then only watching the signer; stopped before the signer pool and the
    store close."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        elsewhere = settings.risk.monitor and settings.risk.evaluator == "process"
        here = settings.model_copy(update={"risk": settings.risk.model_copy(update={"monitor": False})}) \
            if elsewhere else settings
        monitor = RiskMonitor(app[STORE], here, app[METRICS], app[SIGNER_POOL])
        monitor.start()
        # Several HTTP processes: the supervisor named the socket where every process nudges the evaluator.
        nudge_address = os.environ.get(NUDGE_ADDRESS_ENV) if elsewhere else None
        evaluator = EvaluatorProcess(settings, monitor, nudge_address) if elsewhere and process_index == 0 else None
        sender = NudgeSender(nudge_address, settings.risk.settle_seconds) \
            if nudge_address and process_index > 0 else None
        try:
            if evaluator is not None:
                evaluator.start()
                app[RISK_EVALUATOR] = evaluator
            if sender is not None:
                monitor.forward = sender.nudge
            app[RISK_MONITOR] = monitor
            yield
        finally:
            if evaluator is not None:
                await evaluator.close()
            if sender is not None:
                monitor.forward = None
                sender.close()
            await monitor.close()

    return context


def runtime_context(settings: Settings) -> Context:
    """Put together what the endpoints reach through ``app[RUNTIME]`` (nothing of its own to close)."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        database, profile, pool, metrics = app[STORE], app[HSM_PROFILE], app[SIGNER_POOL], app[METRICS]
        approvals = Approvals(settings.approvals)
        keys = KeyDirectory()
        wallets = Wallets(database, CountedSigner(pool, metrics.signatures, Usage.ECNY), profile, settings, approvals)
        evm_signer = CountedSigner(pool, metrics.signatures, Usage.EVM)
        evm = EvmTransactions(database, evm_signer, settings, keys, wallets)
        typed_data = EvmTypedData(database, evm_signer, settings, keys, wallets, evm)
        messages = EvmMessages(database, CountedSigner(pool, metrics.signatures, Usage.MESSAGE), keys)
        evm_rpc = EvmRpc(settings, database, keys, evm, typed_data, messages, app[AUDIT_LOG], metrics)
        runtime = Runtime(
            settings=settings,
            profile=profile,
            database=database,
            signer=pool,
            authenticator=Authenticator(
                database, settings.auth.session_ttl_seconds, settings.auth.credential_cache_seconds,
                LoginThrottle(settings.auth.login_max_attempts, settings.auth.login_lockout_seconds,
                              settings.auth.login_lockout_max_seconds, settings.auth.login_window_seconds),
                PasswordCheckGate(password_check_slots(settings), settings.auth.password_checks_waiting_max),
            ),
            audit=app[AUDIT_LOG],
            metrics=metrics,
            wallets=wallets,
            evm=evm,
            typed_data=typed_data,
            approvals=approvals,
            refusals=app[REFUSAL_TALLY],
            attestations=Attestations(database, CountedSigner(pool, metrics.signatures, Usage.ATTEST), pool, profile,
                                      settings.alliance, keys),
            monitor=app[RISK_MONITOR],
            evm_rpc=evm_rpc,
            keys=keys,
        )
        approvals.register(EVM_APPROVAL_KIND, evm)
        approvals.register(TYPED_DATA_APPROVAL_KIND, typed_data)
        register_offline_approvals(approvals, Devices.of(runtime))
        app[RUNTIME] = runtime
        try:
            yield
        finally:
            await evm_rpc.close()  # the upstream node's HTTP session, if one was opened

    return context


def alliance_context(settings: Settings, process_index: int) -> Context:
    """Pull the alliance peers' fingerprints on a schedule, in the first HTTP process only (one puller is
    enough; storing is idempotent should two ever run)."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        sync = AllianceSync(app[STORE], settings.alliance, app[METRICS])
        if process_index == 0:
            sync.start()
        try:
            yield
        finally:
            await sync.close()

    return context


def webhook_delivery_context(settings: Settings) -> Context:
    """Deliver risk events to the configured webhooks. Every secret is read first: a missing or weak one
    stops the start (ConfigError naming the setting), before anything is sent."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        endpoints = [WebhookEndpoint.from_settings(webhook) for webhook in settings.risk_webhooks]
        attempts = app[METRICS].risk_webhook_attempts
        delivery = WebhookDelivery(app[STORE], endpoints, settings.risk_delivery,
                                   on_outcome=lambda endpoint, outcome: attempts.labels(endpoint, outcome).inc())
        delivery.start()
        try:
            app[WEBHOOK_DELIVERY] = delivery
            yield
        finally:
            await delivery.close()

    return context


async def _end_risk_streams(app: web.Application) -> None:
    monitor = app.get(RISK_MONITOR)
    if monitor is not None:
        await monitor.end_streams()


def make_app(settings: Settings, process_index: int = 0) -> web.Application:
    """Build the application; the HSM pool and store open when it starts.

    ``process_index``: which of ``[server] processes`` HTTP processes this is (gateway.supervisor).
    """
    app = web.Application(client_max_size=settings.server.max_body_bytes, middlewares=[problem_middleware])
    endpoints = all_endpoints()
    app[ENDPOINTS_KEY] = endpoints
    app[RATE_LIMITER] = RateLimiter(settings.server.rate_limit_per_second / settings.server.processes)
    app[LOGIN_LIMITER] = RateLimiter(settings.auth.login_rate_per_second / settings.server.processes)
    app[IDEMPOTENCY] = InFlight()
    for endpoint in endpoints:
        app.router.add_route(endpoint.method, endpoint.path, guarded(endpoint))
    # One cleanup context per resource, in dependency order: one that fails to start is not closed,
    # and those started before it close in reverse (the refusal tally before the audit log, the audit
    # log's last checkpoint before the signer pool, the pool before the store).
    app[METRICS] = Metrics()
    app.on_shutdown.append(_end_risk_streams)
    app.cleanup_ctx.extend([
        store_context(settings),
        house_context(settings),
        webhook_delivery_context(settings),  # needs the store only; a bad secret stops the start before the HSM
        signer_context(settings, process_index),
        audit_context(settings),
        refusal_context(settings),
        monitor_context(settings, process_index),
        runtime_context(settings),
        alliance_context(settings, process_index),
    ])
    return app


def ssl_context(settings: Settings) -> Any:
    """TLS (and, with ``tls_client_ca``, mTLS) from the server settings, or None for plain HTTP."""
    server = settings.server
    if server.tls_cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(server.tls_cert, server.tls_key)
    if server.tls_client_ca is not None:
        context.load_verify_locations(server.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
