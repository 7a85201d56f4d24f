"""Teller sessions: username and password in, an expiring bearer token out; and logout.

A login passes, in order: the per-source-address limiter (``auth.login_rate_per_second``), the
bound on password checks running at once (``auth.password_checks_max``, gateway/auth/throttle.py),
the per-username lockout, and only then the argon2 check. A refused login writes no audit entry of
its own: it is counted (gateway/audit/refusals.py) and written with the others of its window.
"""

from __future__ import annotations

from aiohttp import web

from gateway.api.call import Call
from gateway.api.codecs import json_response
from gateway.api.endpoints import LOGIN_LIMITER, Endpoint, bearer_token
from gateway.api.models import SessionEnded, SessionRequest, SessionResponse
from gateway.audit.chain import append
from gateway.auth.credentials import SESSION_TOKEN_PREFIX
from gateway.auth.roles import Permission
from gateway.auth.users import end_session as end_session_in
from gateway.errors import LoginBusy, LoginRateLimited, LoginThrottled, NotASession, Unauthenticated
from gateway.ledger.store import Tx

LOGIN = "sessions.create"


async def create_session(call: Call) -> web.Response:
    body: SessionRequest = call.body
    refusals = call.runtime.refusals
    if not call.request.app[LOGIN_LIMITER].allow(f"address:{call.request.remote}"):
        refusals.count(LoginRateLimited.code, LOGIN, body.username)
        raise LoginRateLimited("too many logins from this address; try again shortly", retry_after=1)
    try:
        token, principal, expires_at = await call.runtime.authenticator.login(body.username, body.password)
    except (Unauthenticated, LoginThrottled, LoginBusy) as error:
        refusals.count("bad-credentials" if isinstance(error, Unauthenticated) else error.code, LOGIN, body.username)
        raise
    await call.runtime.audit.record(
        call.audit_entry(LOGIN, decision="allowed", result={"username": principal.name,
                                                            "role": principal.role.value})
    )
    return json_response({"token": token, "role": principal.role.value, "expires_at": expires_at}, status=201)


async def end_session(call: Call) -> web.Response:
    """Log out: the caller's own session token stops working at once, in every process."""
    principal = call.actor
    token = bearer_token(call.request)
    if principal.kind != "user" or token is None or not token.startswith(SESSION_TOKEN_PREFIX):
        raise NotASession("only a session can be ended; an API key is revoked with `ecny-gateway clients revoke`")

    def work(tx: Tx) -> bool:
        ended = end_session_in(tx, token) is not None
        append(tx, [call.audit_entry("sessions.end", decision="allowed",
                                     result={"username": principal.name, "ended": ended})])
        return ended

    ended = await call.runtime.database.write(work)
    return json_response({"username": principal.name, "ended": ended})


ENDPOINTS = [
    Endpoint(
        "POST", "/v1/sessions", create_session, "Log in a user; returns a session token", None, "sessions",
        request_model=SessionRequest, response_model=SessionResponse, response_status=201,
        responses={401: "Wrong username or password",
                   429: "Too many login attempts for this username, or too many logins from this address "
                        "(Retry-After says when to try again)",
                   503: "Too many logins at once (Retry-After), or the HSM or store is unavailable"},
    ),
    Endpoint(
        "DELETE", "/v1/sessions", end_session, "Log out: end the caller's own session", Permission.SESSIONS_END,
        "sessions", response_model=SessionEnded, audited_action="sessions.end",
        responses={403: "The credential is an API key, not a session"},
    ),
]
