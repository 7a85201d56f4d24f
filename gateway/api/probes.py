"""Service endpoints: liveness, readiness, status, metrics and the OpenAPI document.

``/readyz`` is public (load balancers and orchestrators probe it without credentials), so it says
only ready or not and which part is not; worker counts and the HSM's own words are in the
authenticated ``/v1/status``.
"""

from __future__ import annotations

from aiohttp import web

from gateway.api.call import Call
from gateway.api.codecs import json_response
from gateway.api.endpoints import Endpoint
from gateway.api.models import Health, Readiness, ServiceStatus
from gateway.api.openapi import document
from gateway.auth.roles import Permission
from gateway.errors import ServiceUnavailable
from gateway.signing import SignerHealth


async def healthz(call: Call) -> web.Response:
    return json_response({"status": "ok"})


async def _probe(call: Call) -> tuple[SignerHealth, bool]:
    """The HSM's health and whether the store answers (and the HSM gauges of /metrics updated)."""
    runtime = call.runtime
    hsm = runtime.signer.health()
    store_ok = await runtime.database.ping()
    runtime.metrics.hsm_ready.set(1 if hsm.ready else 0)
    runtime.metrics.hsm_workers_up.set(hsm.workers_up)
    return hsm, store_ok


async def readyz(call: Call) -> web.Response:
    hsm, store_ok = await _probe(call)
    if not (hsm.ready and store_ok):
        failing = [name for name, ok in (("hsm", hsm.ready), ("store", store_ok)) if not ok]
        raise ServiceUnavailable(
            f"not ready: {', '.join(failing)} unavailable", retry_after=1,
            hsm={"ready": hsm.ready}, store={"ready": store_ok},
        )
    return json_response({"status": "ready", "hsm": {"ready": True}, "store": {"ready": True}})


async def status(call: Call) -> web.Response:
    hsm, store_ok = await _probe(call)
    return json_response({
        "status": "ready" if hsm.ready and store_ok else "unavailable",
        "hsm": {"ready": hsm.ready, "workers": hsm.workers, "workers_up": hsm.workers_up, "detail": hsm.detail},
        "store": {"ready": store_ok},
    })


async def metrics(call: Call) -> web.Response:
    health = call.runtime.signer.health()
    call.runtime.metrics.hsm_ready.set(1 if health.ready else 0)
    call.runtime.metrics.hsm_workers_up.set(health.workers_up)
    return web.Response(body=call.runtime.metrics.render(), content_type="text/plain", charset="utf-8")


async def openapi(call: Call) -> web.Response:
    return json_response(document(call.request.app))


ENDPOINTS = [
    Endpoint("GET", "/healthz", healthz, "Liveness: the process answers", None, "service", response_model=Health),
    Endpoint(
        "GET", "/readyz", readyz, "Readiness: the HSM can sign and the store answers", None, "service",
        response_model=Readiness, responses={503: "HSM or store unavailable"},
    ),
    Endpoint(
        "GET", "/v1/status", status, "Status of the HSM (signer workers, last error) and the store",
        Permission.SERVICE_READ, "service", response_model=ServiceStatus,
    ),
    Endpoint(
        "GET", "/metrics", metrics, "Prometheus metrics (text exposition format)", Permission.SERVICE_READ,
        "service", response_media="text/plain",
    ),
    Endpoint("GET", "/openapi.json", openapi, "This OpenAPI 3.1 document", Permission.SERVICE_READ, "service"),
]
