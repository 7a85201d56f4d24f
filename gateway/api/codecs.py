"""Request bodies in (JSON, or CBOR where an endpoint allows it) and responses out.

Bodies are parsed strictly: JSON floats never become integers (``"amount": 1.0`` is a 400), and
every body is validated by a pydantic model in strict mode before a handler sees it.

No text a request carries — its path, its query, a string of its body — may hold a NUL character
(U+0000): PostgreSQL cannot store one, so it would otherwise fail in the store as if the store were down
(a 503, on one store and not the other). :func:`refuse_nul` refuses it as bad input on both.
"""

from __future__ import annotations

from typing import Any, TypeVar

import cbor2
import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from gateway.errors import InvalidJson, UnsupportedMediaType, ValidationFailed

M = TypeVar("M", bound=BaseModel)

JSON = "application/json"
CBOR = "application/cbor"
PROBLEM = "application/problem+json"


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=JSON, headers=headers)


def problem_response(problem: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(problem), status=int(problem["status"]), content_type=PROBLEM, headers=headers
    )


def decode_body(raw: bytes, content_type: str, allow_cbor: bool = False) -> Any:
    """Parse a request body by its content type.

    Raises:
        InvalidJson: the bytes do not parse.
        UnsupportedMediaType: neither JSON nor (where allowed) CBOR.
    """
    if content_type in ("", JSON) or content_type.endswith("+json"):
        try:
            data = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError as exc:
            raise InvalidJson(f"malformed JSON: {exc}") from exc
        refuse_nul_in_json(raw, data, "body")
        return data
    if allow_cbor and content_type == CBOR:
        try:
            data = cbor2.loads(raw)
        except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
            raise InvalidJson(f"malformed CBOR: {exc}") from exc
        refuse_nul(data, "body")
        return data
    accepted = f"{JSON} or {CBOR}" if allow_cbor else JSON
    raise UnsupportedMediaType(f"send {accepted}, not {content_type or 'no Content-Type'}")


def refuse_nul(data: Any, where: str) -> None:
    """Refuse a NUL character in any text of ``data`` (strings and mapping keys, at any depth).

    Raises:
        ValidationFailed: naming ``where``, never the text.
    """
    pending = [data]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise ValidationFailed(f"the {where} holds a NUL character (U+0000), which no text field may hold")
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)


def refuse_nul_in_json(raw: bytes, data: Any, where: str) -> None:
    """:func:`refuse_nul` for a JSON document parsed from ``raw``: walked only when ``raw`` holds ``\\u0000``,
    the one way JSON carries a NUL (orjson refuses a raw control character)."""
    if b"\\u0000" in raw:
        refuse_nul(data, where)


def parse_model(model: type[M], data: Any) -> M:
    """Validate decoded data against a request model.

    Raises:
        ValidationFailed: with ``errors``: a list of {field, message}.
    """
    if data is None:
        raise ValidationFailed("a request body is required", errors=[])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p) for p in error["loc"]) or "(body)", "message": error["msg"]}
            for error in exc.errors(include_url=False, include_input=False)
        ]
        summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
        raise ValidationFailed(summary, errors=errors) from None
