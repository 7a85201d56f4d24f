"""The aiohttp application: ``make_app(settings)``.

Everything the application holds is created in one cleanup context (store, signer pool, audit
log) and reached through typed ``AppKey``s: there is no module-level state.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from gateway.api import approvals as approvals_api
from gateway.api import audit as audit_api
from gateway.api import devices as devices_api
from gateway.api import evm as evm_api
from gateway.api import keys as keys_api
from gateway.api import service as service_api
from gateway.api import sessions as sessions_api
from gateway.api import transfers as transfers_api
from gateway.api import users as users_api
from gateway.api import wallets as wallets_api
from gateway.api.endpoints import IDEMPOTENCY, LOGIN_LIMITER, RATE_LIMITER, Endpoint, RateLimiter, guarded
from gateway.api.idempotency import InFlight
from gateway.api.middleware import problem_middleware
from gateway.api.openapi import ENDPOINTS_KEY
from gateway.approvals.service import Approvals
from gateway.audit.chain import AuditLog
from gateway.audit.refusals import RefusalTally
from gateway.audit.witness import witness_path
from gateway.auth.credentials import Authenticator
from gateway.auth.throttle import LoginThrottle, PasswordCheckGate
from gateway.config import Settings
from gateway.evm.service import APPROVAL_KIND as EVM_APPROVAL_KIND
from gateway.evm.service import EvmService
from gateway.evm.typed_data import APPROVAL_KIND as TYPED_DATA_APPROVAL_KIND
from gateway.evm.typed_data import TypedDataService
from gateway.hsm.pool import PoolSettings, SignerPool
from gateway.hsm.profile import HsmProfile, load_named_profile
from gateway.hsm.signer import CountedSigner
from gateway.keyring import Usage, flag_raw_not_exclusive, raw_not_exclusive_keys
from gateway.ledger.engines import open_database
from gateway.metrics import Metrics
from gateway.offline.devices import Devices, register_offline_approvals
from gateway.services import SERVICES, Services
from gateway.wallets.service import Wallets


def all_endpoints() -> list[Endpoint]:
    return [
        *service_api.ENDPOINTS,
        *sessions_api.ENDPOINTS,
        *users_api.ENDPOINTS,
        *keys_api.ENDPOINTS,
        *wallets_api.ENDPOINTS,
        *transfers_api.ENDPOINTS,
        *approvals_api.ENDPOINTS,
        *devices_api.ENDPOINTS,
        *evm_api.ENDPOINTS,
        *audit_api.ENDPOINTS,
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
    )


def password_check_slots(settings: Settings) -> int:
    """This HTTP process's share of ``auth.password_checks_max`` (default 2 × CPU cores), at least one."""
    total = settings.auth.password_checks_max or 2 * (os.cpu_count() or 1)
    return max(1, total // settings.server.processes)


def services_context(
    settings: Settings, process_index: int = 0
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def context(app: web.Application) -> AsyncIterator[None]:
        profile = load_named_profile(settings.hsm.profile)
        database = await open_database(settings.store.dsn, settings.store.pool_size)
        pool: SignerPool | None = None
        audit: AuditLog | None = None
        refusals: RefusalTally | None = None
        try:
            await database.migrate()
            for record in await database.read(raw_not_exclusive_keys):
                flag_raw_not_exclusive(record)
            pool = await SignerPool.start(profile, pool_settings(settings, profile, process_index))
            metrics = Metrics()
            audit = AuditLog(
                database, CountedSigner(pool, metrics.signatures, Usage.AUDIT), settings.audit.checkpoint_every,
                settings.audit.flush_max, settings.audit.key_id, settings.audit.checkpoint_seconds,
                on_head=metrics.audit_head.set,
                witness_file=witness_path(settings.audit.witness_file, settings.store.dsn),
            )
            await audit.start()
            approvals = Approvals(settings.approvals)
            refusals = RefusalTally(audit, settings.audit.refusal_window_seconds)
            refusals.start()
            app[SERVICES] = Services(
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
                audit=audit,
                metrics=metrics,
                wallets=Wallets(database, CountedSigner(pool, metrics.signatures, Usage.ECNY), profile, settings,
                                approvals),
                approvals=approvals,
                refusals=refusals,
            )
            services = app[SERVICES]
            evm = EvmService(database, services.signer_for(Usage.EVM), settings, services.keys, services.wallets)
            approvals.register(EVM_APPROVAL_KIND, evm)
            register_offline_approvals(approvals, Devices.of(services))
            app[evm_api.EVM_SERVICE] = evm
            typed_data = TypedDataService(database, services.signer_for(Usage.EVM), settings, services.keys,
                                          services.wallets, evm)
            approvals.register(TYPED_DATA_APPROVAL_KIND, typed_data)
            app[evm_api.TYPED_DATA_SERVICE] = typed_data
            yield
        finally:
            if refusals is not None:  # before the audit log closes: no counted refusal is lost
                await refusals.close()
            if audit is not None:
                await audit.close()
            if pool is not None:
                await pool.close()
            await database.close()

    return context


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
    app.cleanup_ctx.append(services_context(settings, process_index))
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
