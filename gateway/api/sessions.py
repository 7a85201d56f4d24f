"""Teller sessions: username and password in, an expiring bearer token out."""

from __future__ import annotations

from aiohttp import web

from gateway.api.codecs import json_response
from gateway.api.endpoints import Call, Endpoint
from gateway.api.models import SessionRequest, SessionResponse
from gateway.errors import LoginThrottled, Unauthenticated


async def create_session(call: Call) -> web.Response:
    body: SessionRequest = call.body
    try:
        token, principal, expires_at = await call.services.authenticator.login(body.username, body.password)
    except (Unauthenticated, LoginThrottled) as error:
        reason = "login-throttled" if isinstance(error, LoginThrottled) else "bad-credentials"
        await call.services.audit.record(
            call.audit_entry("sessions.create", decision="refused", reasons=[reason],
                             result={"username": body.username})
        )
        raise error
    await call.services.audit.record(
        call.audit_entry("sessions.create", decision="allowed", result={"username": principal.name,
                                                                        "role": principal.role.value})
    )
    return json_response({"token": token, "role": principal.role.value, "expires_at": expires_at}, status=201)


ENDPOINTS = [
    Endpoint(
        "POST", "/v1/sessions", create_session, "Log in a user; returns a session token", None, "sessions",
        request_model=SessionRequest, response_model=SessionResponse, response_status=201,
        responses={401: "Wrong username or password",
                   429: "Too many login attempts for this username (Retry-After says when to try again)"},
    ),
]
