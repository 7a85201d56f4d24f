"""The Idempotency-Key header (docs/spec.md §5): read it, and render recorded answers.

What a key means — records, replays, references completed after signing, races between requests and
between processes — is :mod:`gateway.operations.idempotency`, below the API, where the operations that
record their answer inside their own transaction reach it. This module turns a request into an
:class:`~gateway.operations.idempotency.IdempotentRequest` and answers into responses.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.api.call import Call
from gateway.errors import IdempotencyRaced, ValidationFailed
from gateway.ledger.store import Tx
from gateway.operations import idempotency as records
from gateway.operations.idempotency import Answer, IdempotentRequest, InFlight, Recorded

__all__ = ["InFlight", "check_key", "json_body", "render", "respond_in", "run"]

MAX_KEY_LENGTH = 255


def check_key(key: str) -> str:
    """Raises ValidationFailed unless ``key`` is 1–255 visible ASCII characters (as documented)."""
    if not 0 < len(key) <= MAX_KEY_LENGTH or not all("!" <= char <= "~" for char in key):
        raise ValidationFailed(f"Idempotency-Key must be 1–{MAX_KEY_LENGTH} visible ASCII characters")
    return key


def request_hash(call: Call) -> bytes:
    digest = hashlib.sha256()
    digest.update(call.request.method.encode())
    digest.update(b" " + call.request.path.encode() + b"\n")
    digest.update(call.raw_body)
    return digest.digest()


def render(answer: Answer | Recorded) -> web.Response:
    """An operation's answer, or a recorded one, as a response (the body serialised once)."""
    return web.Response(body=answer.body, status=answer.status, content_type=answer.content_type)


def _replayed(recorded: Recorded) -> web.Response:
    response = web.Response(body=recorded.body, status=recorded.status)
    response.headers["Content-Type"] = recorded.content_type
    response.headers["Idempotent-Replayed"] = "true"
    return response


def respond_in(tx: Tx, call: Call, document: Any, status: int = 200) -> bytes:
    """Serialise ``document`` and record it as this request's answer inside ``tx`` (no-op without an
    Idempotency-Key). Returns the body, for :func:`json_body`."""
    answer = Answer(status, document)
    records.answer_in(tx, call.idempotent, answer)
    return answer.body


def guard_in(tx: Tx, call: Call) -> None:
    """First in the transaction of an endpoint whose key is read there (``key_read_in_transaction``): a
    key with a record stops the operation before any check runs (IdempotencyRaced, then answered as
    recorded by :func:`run`); on PostgreSQL it travels with the operation's first statement."""
    records.guard_in(tx, call.idempotent)


def json_body(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type=records.JSON)


def _recordable(response: web.StreamResponse) -> Recorded | None:
    if response.status >= 500:
        return None
    assert isinstance(response, web.Response)
    body = bytes(response.body) if response.body is not None else b""  # type: ignore[arg-type]
    return Recorded(response.status, response.headers.get("Content-Type", response.content_type), body)


async def run(
    inflight: InFlight,
    call: Call,
    handler: Callable[[Call], Awaitable[web.StreamResponse]],
    resume: Callable[[Call, str], Awaitable[web.StreamResponse]] | None = None,
    *,
    read_in_transaction: bool = False,
) -> web.StreamResponse:
    """Run ``handler`` once for the request's key: or replay the recorded answer, or (a reference record,
    and the endpoint has ``resume``) finish the recorded work as the first request would have.
    ``read_in_transaction``: the handler's operation reads the key first in its own transaction, so it is
    not read here beforehand (a replay is then found through IdempotencyRaced)."""
    assert call.principal is not None and call.idempotency_key is not None
    request = IdempotentRequest(call.principal.scope, call.idempotency_key, request_hash(call),
                                looked_up=not read_in_transaction)
    call.idempotent = request
    database = call.runtime.database

    async def answer(recorded: Recorded) -> web.StreamResponse:
        if recorded.content_type == records.REFERENCE and resume is not None:
            return await resume(call, recorded.body.decode())
        return _replayed(recorded)

    async with records.claimed(inflight, request):
        if request.looked_up:
            found = await records.find(database, request)
            if found is not None:
                return await answer(found)
        try:
            response = await handler(call)
        except IdempotencyRaced:
            # Another process committed this key while the handler ran; its work rolled back.
            found = await records.find(database, request)
            if found is None:
                raise
            return await answer(found)
        recordable = None if request.recorded_in_transaction else _recordable(response)
        if recordable is not None:
            earlier = await records.record_unless_present(database, request, recordable)
            if earlier is not None:  # another instance won the race: answer as it did
                return await answer(earlier)
        return response
