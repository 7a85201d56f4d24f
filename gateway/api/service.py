"""Service endpoints: liveness, readiness, metrics and the OpenAPI document."""

from __future__ import annotations

from aiohttp import web

from gateway.api.codecs import json_response
from gateway.api.endpoints import Call, Endpoint
from gateway.api.models import Health, Readiness
from gateway.auth.roles import Permission
from gateway.errors import ServiceUnavailable


async def healthz(call: Call) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(call: Call) -> web.Response:
    services = call.services
    hsm = services.signer.health()
    store_ok = await services.database.ping()
    services.metrics.hsm_ready.set(1 if hsm.ready else 0)
    services.metrics.hsm_workers_up.set(hsm.workers_up)
    document = {
        "status": "ready" if hsm.ready and store_ok else "unavailable",
        "hsm": {"ready": hsm.ready, "workers": hsm.workers, "workers_up": hsm.workers_up, "detail": hsm.detail},
        "store": {"ready": store_ok},
    }
    if not (hsm.ready and store_ok):
        failing = [name for name, ok in (("hsm", hsm.ready), ("store", store_ok)) if not ok]
        raise ServiceUnavailable(
            f"not ready: {', '.join(failing)} unavailable", retry_after=1, hsm=document["hsm"], store=document["store"]
        )
    return json_response(document)


async def metrics(call: Call) -> web.Response:
    health = call.services.signer.health()
    call.services.metrics.hsm_ready.set(1 if health.ready else 0)
    call.services.metrics.hsm_workers_up.set(health.workers_up)
    return web.Response(body=call.services.metrics.render(), content_type="text/plain", charset="utf-8")


async def openapi(call: Call) -> web.Response:
    from gateway.api.openapi import document

    return json_response(document(call.request.app))


ENDPOINTS = [
    Endpoint("GET", "/healthz", healthz, "Liveness: the process answers", None, "service", response_model=Health),
    Endpoint(
        "GET", "/readyz", readyz, "Readiness: the HSM can sign and the store answers", None, "service",
        response_model=Readiness, responses={503: "HSM or store unavailable"},
    ),
    Endpoint(
        "GET", "/metrics", metrics, "Prometheus metrics (text exposition format)", Permission.SERVICE_READ,
        "service",
    ),
    Endpoint("GET", "/openapi.json", openapi, "This OpenAPI 3.1 document", Permission.SERVICE_READ, "service"),
]
