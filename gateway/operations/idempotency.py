"""Idempotency-Key records (docs/spec.md §5), below the HTTP layer.

The same key and body return the first answer again without doing the work twice; the same key with
another body is 409. Keys are scoped to the calling principal. Answers with a status below 500 are
kept; a 5xx is not, so a retry after an outage does the work.

Two requests with one key racing in the same process: the second waits for the first and replays it
(:class:`InFlight`). Across processes and instances the store's primary key decides: operations that
change the ledger record their answer inside their own transaction (:func:`record_in`), so the
duplicate that loses rolls back whole — and then answers with the winner's record, as a replay.

An answer that is not final when its transaction commits (a transfer whose envelope is signed after
commit) is recorded as a *reference* (status 0, media type :data:`REFERENCE`, the body naming what
was recorded) and completed by :func:`complete_in` in the transaction that stores the signature; a
replay meeting a reference finishes the work as the first request would have (``resume``).

``gateway/api/idempotency.py`` reads the header, runs the handler under :func:`claimed` and renders
answers; what a record holds and how it is read and written is here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import orjson

from gateway import clock
from gateway.errors import IdempotencyConflict, IdempotencyRaced
from gateway.ledger.store import Database, Params, Tx

JSON = "application/json"
REFERENCE = "application/x-ecny-reference"
"""The media type of a record that is not final yet: its body is a reference to the recorded work."""

@dataclass
class IdempotentRequest:
    """One request's Idempotency-Key, scoped to its caller, and the hash of what it asked."""

    scope: str  # the principal's scope
    key: str
    request_hash: bytes
    recorded_in_transaction: bool = False  # the operation recorded its answer itself (nothing left to record)
    looked_up: bool = True  # False: nothing read the key before the operation ran; it does, first (guard_in)


@dataclass(frozen=True)
class Answer:
    """What an operation answers: an HTTP-like status and a JSON document (serialised once, when needed)."""

    status: int
    document: Any
    final: bool = True  # False: not the answer to record (e.g. an EVM transaction that will not be signed)

    content_type = JSON

    @cached_property
    def body(self) -> bytes:
        return orjson.dumps(self.document)


@dataclass(frozen=True)
class Recorded:
    """An answer as it was recorded: replayed byte for byte."""

    status: int
    content_type: str
    body: bytes


class InFlight:
    """Requests under way per (principal, key) in this process."""

    def __init__(self) -> None:
        self.running: dict[tuple[str, str], asyncio.Future[None]] = {}


_LOOKUP = "SELECT request_hash, status, content_type, body FROM idempotency WHERE principal = ? AND idem_key = ?"


def lookup_in(tx: Tx, request: IdempotentRequest) -> Any:
    """The stored record of ``request``'s key, or None."""
    return tx.fetchone(_LOOKUP, (request.scope, request.key))


def guard_in(tx: Tx, request: IdempotentRequest | None) -> None:
    """The first step of an operation's transaction when nothing read its key before it ran: a key with a
    record (a replay, or another request that committed first) stops the operation before any check runs,
    so that a replay is never judged again against today's balances.

    Raises:
        IdempotencyRaced: the key has a record; nothing is written and the caller answers as recorded.
    """
    if request is None or request.looked_up:
        return
    raced = IdempotencyRaced(f"Idempotency-Key {request.key!r} has an answer already")
    if tx.dialect == "postgresql":  # queued before the operation's first statement: no round trip of its own
        tx.queue("SELECT ecny_idempotency_unused(?, ?)", (request.scope, request.key), on_conflict=raced)
    elif lookup_in(tx, request) is not None:
        raise raced


def _insert(tx: Tx, request: IdempotentRequest, status: int, content_type: str, body: bytes) -> None:
    tx.execute(
        "INSERT INTO idempotency (principal, idem_key, request_hash, status, content_type, body, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (request.scope, request.key, request.request_hash, status, content_type, body, clock.now_iso()),
    )


def record_in(tx: Tx, request: IdempotentRequest | None, status: int, content_type: str, body: bytes) -> None:
    """Record an answer inside the operation's own transaction (no-op without an Idempotency-Key).

    Raises:
        IdempotencyRaced: another request with this key committed first (the transaction rolls back) —
            on PostgreSQL at commit.
    """
    if request is None:
        return
    # Queued: on PostgreSQL it travels with the COMMIT (a round trip fewer); a duplicate key raises there.
    tx.queue(
        "INSERT INTO idempotency (principal, idem_key, request_hash, status, content_type, body, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (request.scope, request.key, request.request_hash, status, content_type, body, clock.now_iso()),
        on_conflict=IdempotencyRaced(f"Idempotency-Key {request.key!r} is already being used"),
    )
    request.recorded_in_transaction = True


def answer_in(tx: Tx, request: IdempotentRequest | None, answer: Answer) -> None:
    """Record a final answer inside the operation's own transaction (see :func:`record_in`)."""
    record_in(tx, request, answer.status, answer.content_type, answer.body)


def refer_in(tx: Tx, request: IdempotentRequest | None, reference: str) -> None:
    """Record a reference to work whose answer is completed after commit (see :func:`complete_in`)."""
    record_in(tx, request, 0, REFERENCE, reference.encode())


def complete_in(tx: Tx, request: IdempotentRequest | None, answer: Answer,
                kept: tuple[str, Params] | None = None) -> None:
    """Replace a reference record with the final answer, inside the caller's transaction (queued).

    ``kept``: a query and its parameters; the record is completed only if it has a row (the signature
    this answer carries is the one stored), so that a finisher whose signature lost a race never records
    an answer other than the stored one.
    """
    if request is None:
        return
    sql = ("UPDATE idempotency SET status = ?, content_type = ?, body = ? WHERE principal = ? AND idem_key = ? "
           "AND status = 0")
    params: tuple[Any, ...] = (answer.status, answer.content_type, answer.body, request.scope, request.key)
    if kept is not None:
        sql += f" AND EXISTS ({kept[0]})"
        params += tuple(kept[1])
    tx.queue(sql, params)


def answer_unless_present_in(tx: Tx, request: IdempotentRequest | None, answer: Answer) -> bool:
    """Record a final answer inside the caller's transaction, unless another request with this key
    (another process or instance: in this one the request holds its key, :func:`claimed`) recorded one
    first. Returns False in that case: nothing is written, the rest of the transaction stands, and the
    caller answers as the earlier request did (raise IdempotencyRaced after commit).

    For work that is kept whoever answers, such as the audit entry of a signature the HSM made: unlike
    :func:`record_in`, a lost race must not roll the transaction back. True without an Idempotency-Key.
    """
    if request is None:
        return True
    inserted = tx.execute(
        "INSERT INTO idempotency (principal, idem_key, request_hash, status, content_type, body, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (principal, idem_key) DO NOTHING",
        (request.scope, request.key, request.request_hash, answer.status, answer.content_type, answer.body,
         clock.now_iso()),
    )
    if inserted:
        request.recorded_in_transaction = True
    return inserted > 0


def _recorded(row: Any, request: IdempotentRequest) -> Recorded:
    if bytes(row["request_hash"]) != request.request_hash:
        raise IdempotencyConflict(f"Idempotency-Key {request.key!r} was used with a different request")
    return Recorded(int(row["status"]), row["content_type"], bytes(row["body"]))


async def find(database: Database, request: IdempotentRequest) -> Recorded | None:
    """The answer recorded for ``request``'s key — a reference (:data:`REFERENCE`) when the work it
    names is not finished — or None.

    Raises:
        IdempotencyConflict: the key was used with another request.
    """
    # The read's only statement: on PostgreSQL its transaction ends behind it, in the same round trip.
    row = await database.read(lambda tx: tx.fetchone(_LOOKUP, (request.scope, request.key), then_commit=True))
    return None if row is None else _recorded(row, request)


async def record_unless_present(database: Database, request: IdempotentRequest, answer: Recorded) -> Recorded | None:
    """Record the answer of work that did not record its own (in a transaction of its own); if another
    instance recorded one for the key meanwhile, keep that one and return it (answer as it did)."""

    def record(tx: Tx) -> Any:
        existing = lookup_in(tx, request)
        if existing is None:
            _insert(tx, request, answer.status, answer.content_type, answer.body)
        return existing

    earlier = await database.write(record)
    return None if earlier is None else _recorded(earlier, request)


@asynccontextmanager
async def claimed(inflight: InFlight, request: IdempotentRequest) -> AsyncIterator[None]:
    """Hold ``request``'s key in this process: a request with the same key waits until this one is done."""
    slot = (request.scope, request.key)
    while (running := inflight.running.get(slot)) is not None:
        await asyncio.shield(running)
    # Claim the slot before the first await: a request arriving while this one looks up the store
    # must wait for it, not run the work too.
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    inflight.running[slot] = done
    try:
        yield
    finally:
        inflight.running.pop(slot, None)
        done.set_result(None)
