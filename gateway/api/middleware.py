"""The one place errors become HTTP: every failure leaves as an RFC 9457 problem document.

Also gives every request an id (``X-Request-Id``, taken from the client when sane) and logs
errors as structured JSON. Nothing here logs headers or bodies: they carry credentials.
A 5xx answer says only what failed (its title); what the dependency said (a PostgreSQL message
naming hosts, tables or constraints) goes to the log, under the same request id.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from gateway.api.codecs import problem_response
from gateway.errors import (
    BadRequest,
    GatewayError,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    UnsupportedMediaType,
)

REQUEST_ID = web.RequestKey("request_id", str)
#: A client's ``X-Request-Id`` enters logs and the audit chain only in this form; any other (too
#: long, control characters, spaces, quotes) is replaced by a generated id, echoed in the answer.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")

HandlerType = Callable[[web.Request], Awaitable[web.StreamResponse]]


class MethodNotAllowed(GatewayError):
    code = "method-not-allowed"
    http_status = 405
    title = "Method not allowed"


def _from_http_exception(exc: web.HTTPException) -> GatewayError:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge(f"the body is larger than {exc.text or 'allowed'}")
    if isinstance(exc, web.HTTPNotFound):
        return NotFound("no such endpoint")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MethodNotAllowed(f"{exc.method} is not allowed here; use {', '.join(sorted(exc.allowed_methods))}")
    if isinstance(exc, web.HTTPUnsupportedMediaType):
        return UnsupportedMediaType(exc.text or "")
    if exc.status == 400:
        return BadRequest(exc.text or "bad request")
    error = GatewayError(exc.text or exc.reason)
    error.http_status = exc.status  # type: ignore[misc]
    return error


@web.middleware
async def problem_middleware(request: web.Request, handler: HandlerType) -> web.StreamResponse:
    offered = request.headers.get("X-Request-Id", "")
    request_id = offered if _REQUEST_ID.fullmatch(offered) else secrets.token_hex(8)
    request[REQUEST_ID] = request_id
    log = structlog.get_logger("gateway.http")
    try:
        response = await handler(request)
    except GatewayError as error:
        response = _render(error, request)
        if error.http_status >= 500:
            log.error("request failed", request_id=request_id, path=request.path, code=error.code, detail=error.detail)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _render(_from_http_exception(exc), request)
        if isinstance(exc, web.HTTPMethodNotAllowed):  # RFC 9110 §15.5.6: a 405 names the allowed methods
            response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
    except Exception:
        log.exception("unhandled error", request_id=request_id, path=request.path)
        response = _render(GatewayError("an unexpected error occurred; it has been logged"), request)
    response.headers["X-Request-Id"] = request_id
    return response


def _render(error: GatewayError, request: web.Request) -> web.Response:
    headers: dict[str, str] = {}
    if isinstance(error, ServiceUnavailable):
        headers["Retry-After"] = str(error.retry_after)
    if error.http_status == 429:
        headers["Retry-After"] = str(getattr(error, "retry_after", 1))
    if error.http_status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="ecny-gateway"'
    problem = error.to_problem(instance=request.path)
    if error.http_status >= 500:  # the specific text is in the log (problem_middleware), not for clients
        problem["detail"] = f"{error.title}; the gateway log has the details under request id {request[REQUEST_ID]}"
    problem["request_id"] = request[REQUEST_ID]
    return problem_response(problem, headers)
