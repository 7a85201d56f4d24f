"""Idempotency-Key handling (docs/spec.md §5).

The same key and body return the first response again without doing the work twice; the same key
with another body is 409. Keys are scoped to the calling principal. Responses with a status below
500 are kept; a 5xx is not, so a retry after an outage does the work.

Two requests with one key racing in the same process: the second waits for the first and replays
it. Across processes and instances the store's primary key decides: operations that change the
ledger record their response inside their own transaction (:func:`record_in`), so the duplicate
that loses rolls back whole — and then answers with the winner's record, as a replay.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from gateway import clock
from gateway.api.call import Call
from gateway.api.codecs import JSON as JSON_TYPE
from gateway.errors import AlreadyExists, IdempotencyConflict, IdempotencyRaced, ValidationFailed
from gateway.ledger.store import Tx

MAX_KEY_LENGTH = 255


class InFlight:
    """Requests under way per (principal, key) in this process."""

    def __init__(self) -> None:
        self.running: dict[tuple[str, str], asyncio.Future[None]] = {}


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


def _lookup(tx: Tx, scope: str, key: str) -> Any:
    return tx.fetchone(
        "SELECT request_hash, status, content_type, body FROM idempotency WHERE principal = ? AND idem_key = ?",
        (scope, key),
    )


def _replay(row: Any, expected_hash: bytes, key: str) -> web.Response:
    if bytes(row["request_hash"]) != expected_hash:
        raise IdempotencyConflict(f"Idempotency-Key {key!r} was used with a different request")
    response = web.Response(body=bytes(row["body"]), status=int(row["status"]))
    response.headers["Content-Type"] = row["content_type"]
    response.headers["Idempotent-Replayed"] = "true"
    return response


REFERENCE = "application/x-ecny-reference"


def record_in(tx: Tx, call: Call, status: int, content_type: str, body: bytes) -> None:
    """Record the response inside the operation's own transaction (for ledger-changing handlers).
    Does nothing for a request without an Idempotency-Key.

    A response that is not final yet (a transfer whose envelope is signed after commit) is
    recorded as a reference (``status`` 0, ``content_type`` :data:`REFERENCE`, ``body`` the
    resource id) and completed by :func:`complete`; a replay meeting a reference rebuilds the
    response through the endpoint's ``resume``.

    Raises:
        IdempotencyConflict: another request with this key committed first (the transaction rolls back).
    """
    if call.principal is None or call.idempotency_key is None:
        return
    try:
        tx.execute(
            "INSERT INTO idempotency (principal, idem_key, request_hash, status, content_type, body, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (call.principal.scope, call.idempotency_key, request_hash(call), status, content_type, body,
             clock.now_iso()),
        )
    except AlreadyExists as exc:
        raise IdempotencyRaced(f"Idempotency-Key {call.idempotency_key!r} is already being used") from exc
    call.recorded_in_transaction = True


def respond_in(tx: Tx, call: Call, document: Any, status: int = 200) -> bytes:
    """Serialise ``document`` and record it as this request's response inside ``tx`` (no-op without
    an Idempotency-Key). Returns the body, for :func:`json_body`."""
    body = orjson.dumps(document)
    record_in(tx, call, status, JSON_TYPE, body)
    return body


def json_body(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type=JSON_TYPE)


def complete_in(tx: Tx, call: Call, status: int, content_type: str, body: bytes) -> None:
    """Replace a reference record with the final response, inside the caller's transaction."""
    if call.principal is None or call.idempotency_key is None:
        return
    tx.queue(
        "UPDATE idempotency SET status = ?, content_type = ?, body = ? WHERE principal = ? AND idem_key = ? "
        "AND status = 0",
        (status, content_type, body, call.principal.scope, call.idempotency_key),
    )


async def _answer_from(
    row: Any, call: Call, expected: bytes, resume: Callable[[Call, str], Awaitable[web.StreamResponse]] | None
) -> web.StreamResponse:
    """The answer to a request whose key is recorded already: a replay of the recorded response —
    or, for a reference record (the first request committed its work but not its final response,
    e.g. it died between posting and signing), the work finished now as the first would have."""
    key = call.idempotency_key or ""
    if row["content_type"] == REFERENCE and resume is not None:
        if bytes(row["request_hash"]) != expected:
            raise IdempotencyConflict(f"Idempotency-Key {key!r} was used with a different request")
        return await resume(call, bytes(row["body"]).decode())
    return _replay(row, expected, key)


async def run(
    inflight: InFlight,
    call: Call,
    handler: Callable[[Call], Awaitable[web.StreamResponse]],
    resume: Callable[[Call, str], Awaitable[web.StreamResponse]] | None = None,
) -> web.StreamResponse:
    assert call.principal is not None and call.idempotency_key is not None
    key = call.idempotency_key
    scope = call.principal.scope
    expected = request_hash(call)
    database = call.services.database
    slot = (scope, key)
    while (running := inflight.running.get(slot)) is not None:
        await asyncio.shield(running)
    # Claim the slot before the first await: a request arriving while this one looks up the store
    # must wait for it, not run the handler too.
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    inflight.running[slot] = done
    try:
        row = await database.read(lambda tx: _lookup(tx, scope, key))
        if row is not None:
            return await _answer_from(row, call, expected, resume)
        try:
            response = await handler(call)
        except IdempotencyRaced:
            # Another process committed this key while the handler ran; its work rolled back.
            row = await database.read(lambda tx: _lookup(tx, scope, key))
            if row is None:
                raise
            return await _answer_from(row, call, expected, resume)
        if response.status < 500 and not call.recorded_in_transaction:
            assert isinstance(response, web.Response)
            body = bytes(response.body) if response.body is not None else b""  # type: ignore[arg-type]
            content_type = response.headers.get("Content-Type", response.content_type)

            def record(tx: Tx) -> Any:
                existing = _lookup(tx, scope, key)
                if existing is not None:
                    return existing
                tx.execute(
                    "INSERT INTO idempotency (principal, idem_key, request_hash, status, content_type, body, "
                    "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (scope, key, expected, response.status, content_type, body, clock.now_iso()),
                )
                return None

            earlier = await database.write(record)
            if earlier is not None:  # another instance won the race: answer as it did
                return _replay(earlier, expected, key)
        return response
    finally:
        inflight.running.pop(slot, None)
        done.set_result(None)
