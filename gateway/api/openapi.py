"""The OpenAPI 3.1 document, generated from the endpoint table and the pydantic body models.

It is built from the very declarations the router uses, so every endpoint, body and response the
server has is in it and nothing else is.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from gateway import __version__
from gateway.api.endpoints import Endpoint
from gateway.errors import PROBLEM_BASE
from gateway.keys import allowed_usages
from gateway.runtime import RUNTIME

ENDPOINTS_KEY = web.AppKey("endpoints", list)

_ERRORS = {
    400: "Malformed request (problem types bad-request, invalid-body, validation-failed, idempotency-key-required)",
    401: "No or unknown credentials",
    403: "The role (or the key's usages) does not allow this",
    404: "Unknown resource",
    409: "Conflict (e.g. Idempotency-Key reused with another body)",
    413: "Body or list too large",
    415: "Unsupported Content-Type",
    422: "Refused by policy",
    429: "Rate limited",
    503: "HSM or store unavailable; retry after Retry-After seconds",
}

PROBLEM_SCHEMA = {
    "type": "object",
    "description": f"RFC 9457 problem details; `type` is {PROBLEM_BASE}<code>",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "request_id": {"type": "string"},
        "errors": {"type": "array", "items": {"type": "object"}},
    },
    "additionalProperties": True,
}


def _media_schema(media: str) -> dict[str, Any]:
    """The schema of a success body that is no JSON model."""
    if media == "text/event-stream":
        return {}  # a stream of events, each `data` a JSON document (docs/spec.md), not one string
    return {"type": "string"} if media.startswith("text/") else {"type": "string", "format": "binary"}


def _schema_ref(model: type[BaseModel], schemas: dict[str, Any]) -> dict[str, str]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
    for name, definition in schema.pop("$defs", {}).items():
        schemas[name] = definition
    schemas[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _operation(endpoint: Endpoint, schemas: dict[str, Any]) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": f"{endpoint.tag}.{endpoint.handler.__name__}",
        "summary": endpoint.summary,
        "tags": [endpoint.tag],
    }
    if endpoint.permission is None:
        operation["security"] = []
    else:
        operation["description"] = f"Needs permission `{endpoint.permission.value}`."
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in re.findall(r"{(\w+)}", endpoint.path)
    ]
    parameters += [
        {"name": name, "in": "query", "required": False, "schema": schema, "description": description}
        for name, schema, description in endpoint.query
    ]
    if endpoint.idempotency != "none":
        parameters.append({
            "name": "Idempotency-Key", "in": "header", "required": endpoint.idempotency == "required",
            "schema": {"type": "string", "pattern": "^[!-~]{1,255}$"},
            "description": "Same key and body → the first response again; same key, other body → 409",
        })
    if parameters:
        operation["parameters"] = parameters
    if endpoint.request_model is not None:
        reference = _schema_ref(endpoint.request_model, schemas)
        content = {"application/json": {"schema": reference}}
        if endpoint.cbor:
            content["application/cbor"] = {"schema": reference}
        operation["requestBody"] = {"required": True, "content": content}
    elif endpoint.raw_body is not None:
        # A raw JSON body is any JSON the handler reads itself (the JSON-RPC envelope answers malformed
        # input in its own protocol); any other raw body is bytes.
        schema = {} if endpoint.raw_body == "application/json" else {"type": "string", "format": "binary"}
        operation["requestBody"] = {"required": True, "content": {endpoint.raw_body: {"schema": schema}}}
    responses: dict[str, Any] = {}
    success: dict[str, Any] = {"description": "Success"}
    if endpoint.response_model is not None:
        success["content"] = {"application/json": {"schema": _schema_ref(endpoint.response_model, schemas)}}
    elif endpoint.response_media is not None:
        success["content"] = {endpoint.response_media: {"schema": _media_schema(endpoint.response_media)}}
    else:
        success["content"] = {"application/json": {"schema": {"type": "object"}}}
    responses[str(endpoint.response_status)] = success
    statuses = {400, 404, 429, 503} if endpoint.permission is not None else {400, 404, 503}
    if endpoint.permission is not None:
        statuses |= {401, 403}
    if endpoint.request_model is not None or endpoint.raw_body is not None:
        statuses |= {413, 415}
    if endpoint.idempotency != "none":
        statuses.add(409)
    statuses |= set(endpoint.responses)
    for status in sorted(statuses):
        if 200 <= status < 300:  # another success (e.g. 202 pending approval): the same document
            responses[str(status)] = {**success, "description": endpoint.responses.get(status, "Success")}
            if status == 202 and endpoint.accepted_model is not None:  # unless it is another one
                responses[str(status)]["content"] = {
                    "application/json": {"schema": _schema_ref(endpoint.accepted_model, schemas)}}
            continue
        responses[str(status)] = {
            "description": endpoint.responses.get(status, _ERRORS.get(status, "Error")),
            "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
    operation["responses"] = responses
    return operation


def build(endpoints: list[Endpoint]) -> dict[str, Any]:
    schemas: dict[str, Any] = {"Problem": PROBLEM_SCHEMA}
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in endpoints:
        paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = _operation(endpoint, schemas)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ecny-gateway",
            "version": __version__,
            "description": "Signs e-CNY wallet and stablecoin transactions with keys held in a PKCS#11 HSM.",
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API client key (ecny_…) or a teller session token (ecnys_…)",
                }
            },
        },
        "security": [{"bearer": []}],
    }


def document(app: web.Application) -> dict[str, Any]:
    """The document for this server: key algorithms narrowed to what its HSM profile supports."""
    doc = build(app[ENDPOINTS_KEY])
    runtime = app.get(RUNTIME)
    key_request = doc["components"]["schemas"].get("KeyCreateRequest")
    if runtime is not None and key_request is not None:
        supported = sorted(algorithm.value for algorithm in runtime.profile.algorithms)
        key_request["properties"]["algorithm"] = {"type": "string", "enum": supported}
        key_request["allOf"] = [
            {
                "if": {"properties": {"algorithm": {"const": algorithm}}},
                "then": {"properties": {"usage": {"items": {"enum": sorted(allowed_usages(algorithm))}}}},
            }
            for algorithm in supported
        ]
    return doc
