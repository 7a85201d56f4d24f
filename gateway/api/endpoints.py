"""Endpoints are declared once, in a table: route, permission, bodies, idempotency.

The router, the permission check and the OpenAPI document are all built from these
declarations, so the document cannot drift from the server and no handler can forget its check.
Every handler receives a :class:`Call`: the request, the authenticated principal, the parsed body.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog
from aiohttp import web
from pydantic import BaseModel

from gateway.api import idempotency
from gateway.api.call import Call, Handler
from gateway.api.codecs import decode_body, parse_model, refuse_nul
from gateway.api.middleware import REQUEST_ID
from gateway.auth.credentials import Principal
from gateway.auth.roles import Permission, allows
from gateway.errors import (
    Forbidden,
    GatewayError,
    IdempotencyKeyRequired,
    PolicyRefused,
    RateLimited,
    Unauthenticated,
)
from gateway.risk.signals import Signal
from gateway.runtime import RUNTIME, Runtime


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    handler: Handler
    summary: str
    permission: Permission | None  # None: public (no credentials)
    tag: str
    request_model: type[BaseModel] | None = None
    response_model: type[BaseModel] | None = None
    response_status: int = 200
    idempotency: Literal["none", "optional", "required"] = "none"
    cbor: bool = False
    raw_body: str | None = None  # a body that is not a model, e.g. "application/cbor" for a device log
    resume: Callable[[Call, str], Awaitable[web.StreamResponse]] | None = None  # replay of a reference record
    # The handler is one transaction (a signed operation's first, or a cash movement's) that looks its
    # Idempotency-Key up first (operations.idempotency.guard_in), every check after it: no read of the key
    # before it (one store transaction fewer). Only for handlers that check nothing in the store before it.
    key_read_in_transaction: bool = False
    audited_action: str | None = None  # refusals of this endpoint are audited under this name
    query: tuple[tuple[str, dict[str, Any], str], ...] = ()  # (name, JSON schema, description)
    responses: dict[int, str] = field(default_factory=dict)  # extra documented statuses
    accepted_model: type[BaseModel] | None = None  # the 202 body, when it is not response_model's (an approval)
    response_media: str | None = None  # a success body that is not JSON: "text/html", "image/png", "application/cose"

    @property
    def name(self) -> str:
        return f"{self.method} {self.path}"


class RateLimiter:
    """A token bucket per scope (a principal, or a source address); ``rate`` 0 means unlimited."""

    MAX_BUCKETS = 10_000  # beyond it, buckets that have filled up again are dropped (they hold nothing)

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(1.0, rate * 2)
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, scope: str) -> bool:
        """Take one token from ``scope``'s bucket; False when it is empty."""
        if self.rate <= 0:
            return True
        now = time.monotonic()
        tokens, last = self._buckets.get(scope, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if len(self._buckets) >= self.MAX_BUCKETS and scope not in self._buckets:
            self._prune(now)
        if tokens < 1:
            self._buckets[scope] = (tokens, now)
            return False
        self._buckets[scope] = (tokens - 1, now)
        return True

    def check(self, scope: str) -> None:
        """Raises RateLimited when ``scope`` is over its rate."""
        if not self.allow(scope):
            raise RateLimited(f"more than {self.rate:g} requests per second", retry_after=1)

    def _prune(self, now: float) -> None:
        full = [scope for scope, (tokens, last) in self._buckets.items()
                if tokens + (now - last) * self.rate >= self.burst]
        for scope in full:
            del self._buckets[scope]
        if len(self._buckets) >= self.MAX_BUCKETS:  # all of them busy (a spread flood): start again
            self._buckets.clear()


RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)
LOGIN_LIMITER = web.AppKey("login_limiter", RateLimiter)  # POST /v1/sessions, per source address
IDEMPOTENCY = web.AppKey("idempotency", idempotency.InFlight)


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def authenticate(request: web.Request, runtime: Runtime) -> Principal:
    """The caller: a bearer API key or session token, or an mTLS client certificate mapped to a client."""
    token = bearer_token(request)
    if token is not None:
        return await runtime.authenticator.authenticate(token)
    principal = await mtls_principal(request, runtime)
    if principal is not None:
        return principal
    raise Unauthenticated("send Authorization: Bearer <api key or session token>")


async def mtls_principal(request: web.Request, runtime: Runtime) -> Principal | None:
    transport = request.transport
    if transport is None or not runtime.settings.server.mtls_identities:
        return None
    certificate = transport.get_extra_info("peercert")
    if not certificate:
        return None
    common_name = next(
        (value for rdn in certificate.get("subject", ()) for (key, value) in rdn if key == "commonName"), None
    )
    client = runtime.settings.server.mtls_identities.get(common_name or "")
    if client is None:
        raise Unauthenticated(f"client certificate {common_name!r} is not mapped to an API client")
    return await runtime.authenticator.client_by_name(client)


def guarded(endpoint: Endpoint) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Wrap a handler with authentication, authorization, rate limiting, body parsing,
    idempotency and the auditing of refusals."""

    async def handle(request: web.Request) -> web.StreamResponse:
        runtime = request.app[RUNTIME]
        request_id = request[REQUEST_ID]
        call = Call(request, runtime, None, None, b"", request_id, None)
        started = time.perf_counter()
        status = 500
        try:
            if endpoint.permission is not None:
                call.principal = await authenticate(request, runtime)
                if not allows(call.principal.role, endpoint.permission):
                    raise Forbidden(
                        f"role {call.principal.role.value!r} may not {endpoint.permission.value}"
                    )
                request.app[RATE_LIMITER].check(call.principal.scope)
            refuse_nul([*request.match_info.values(), *request.query.keys(), *request.query.values()],
                       "request's path or query")
            if endpoint.request_model is not None or endpoint.method in ("POST", "PUT", "PATCH"):
                call.raw_body = await request.read()
            if endpoint.request_model is not None:
                data = decode_body(call.raw_body, request.content_type if call.raw_body else "", endpoint.cbor)
                call.body = parse_model(endpoint.request_model, data)
            call.idempotency_key = request.headers.get("Idempotency-Key")
            if call.idempotency_key is not None and endpoint.idempotency != "none":
                idempotency.check_key(call.idempotency_key)
            if endpoint.idempotency == "required" and not call.idempotency_key:
                raise IdempotencyKeyRequired("this operation needs an Idempotency-Key header")
            if call.idempotency_key and endpoint.idempotency != "none" and call.principal is not None:
                response = await idempotency.run(request.app[IDEMPOTENCY], call, endpoint.handler, endpoint.resume,
                                                 read_in_transaction=endpoint.key_read_in_transaction)
            else:
                response = await endpoint.handler(call)
            status = response.status
            return response
        except GatewayError as error:
            status = error.http_status
            runtime.metrics.refusals.labels(error.code).inc()
            if endpoint.permission is not None and call.principal is None and isinstance(error, Unauthenticated):
                # Anonymous: counted, one audit entry per window and cause (gateway/audit/refusals.py).
                runtime.refusals.count(error.code, endpoint.audited_action or endpoint.name)
            elif (400 <= error.http_status < 500 and endpoint.audited_action is not None
                  and not error.audited_in_transaction):
                await _audit_refusal(call, endpoint.audited_action, error)
            raise
        finally:
            runtime.metrics.request_done(endpoint.name, status, time.perf_counter() - started)
            if endpoint.method != "GET":  # it may have committed a risk signal: evaluate it now, not at the poll
                runtime.monitor.nudge()

    handle.__name__ = endpoint.handler.__name__
    return handle


async def _audit_refusal(call: Call, action: str, error: GatewayError) -> None:
    reasons = [error.code]
    if "reasons" in error.extra:
        reasons += [str(r) for r in error.extra["reasons"]]
    entry = call.audit_entry(
        action,
        decision="refused",
        reasons=reasons,
        payload_hash=call.payload_hash() if call.raw_body else "",
        result={"status": error.http_status, "detail": error.detail[:500]},
    )
    if call.principal is not None and isinstance(error, (Forbidden, PolicyRefused)):  # repeated_refusals
        entry.signals = [Signal("request.refused", call.principal.scope, actor=call.principal.scope,
                                detail={"code": error.code, "action": action, "request_id": call.request_id})]
    try:
        await call.runtime.audit.record(entry)
    except GatewayError as exc:  # the refusal stands even if its audit entry cannot be written
        structlog.get_logger("gateway.audit").error("refusal not audited", error=exc.detail, action=action)


async def gather_safely(*aws: Awaitable[Any]) -> list[Any]:
    """Like asyncio.gather, but waits for every awaitable before raising the first error."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results
