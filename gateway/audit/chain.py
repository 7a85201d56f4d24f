"""The tamper-evident audit log: hash-chained entries and HSM-signed checkpoints.

Each entry's hash covers its own fields and the previous entry's hash, so changing, deleting or
reordering one row breaks the chain at that row. Every ``checkpoint_every`` entries (and at
shutdown) the chain head is signed by an ``audit`` key in the HSM; a checkpoint fixes the history
up to it even against someone who can rewrite the whole table and recompute the hashes.

Checkpoints fall due by count (``checkpoint_every`` entries grouped by :class:`AuditLog`) and by
time: every ``checkpoint_seconds`` the log signs the head if it has moved, whoever appended to it
(entries written inside other transactions, other processes or instances), so the unsigned tail —
what could be cut off unnoticed — is never more than a few seconds old.

Every checkpoint is also appended to the witness file (:mod:`gateway.audit.witness`), a copy
outside the store that lets ``audit verify --witness`` catch a chain whose tail was cut off
together with the checkpoints after it.

Entries are written either inside the transaction of the operation they describe
(:func:`append`), or — for signing requests, which change nothing else — through
:class:`AuditLog`, which groups the entries of concurrent requests into one commit and answers each
request only once its entry is committed (:meth:`AuditLog.record_with` stores a write of the request's
own, such as its Idempotency-Key answer, in that same commit).

**PostgreSQL: chaining off the hot path.** Chaining needs the head, so on SQLite (one writer anyway)
:func:`append` chains at once. On PostgreSQL that would make every write transaction, from every
instance, wait on one lock; there :func:`append` *stages* the entries instead (``audit_staged``, in the
operation's own transaction, no global lock) and one chainer per database (:func:`chain_staged`, run
by :class:`AuditLog` in every instance; whoever holds the ``audit-chain`` advisory lock is the chainer
for that batch) numbers and hash-chains them in the order it finds them committed, deleting them from
the staging table in the same transaction: a chainer that dies half-way leaves them staged, whole, for
the next one; ``audit_log.staged_id`` is unique, so none is ever chained twice. A staged entry is
*pending* (:func:`pending_count`; audit listings and ``audit verify`` report it) until chained,
normally a few milliseconds; the hash, the checkpoints and :mod:`gateway.audit.verify` are unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import cbor2
import orjson
import structlog

from gateway import clock
from gateway.audit import witness
from gateway.errors import GatewayError
from gateway.keys import KeyRecord, Usage, active_key_id, key_for_usage, signing_refusals_in
from gateway.ledger.store import Database, Tx
from gateway.risk.signals import Signal
from gateway.signing import Signer, signing_input

T = TypeVar("T")

GENESIS = bytes(32)
CHECKPOINT_CONTEXT = "ecny-audit-checkpoint-v1"


@dataclass
class AuditEntry:
    """What one audited event says. ``actor``/``role`` are the principal; never a secret."""

    actor: str
    role: str
    action: str
    decision: str  # allowed | refused | failed
    reasons: Sequence[str] = ()
    payload_hash: str = ""
    key_id: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    request_id: str = ""
    signals: Sequence[Signal] = ()
    """Risk signals of the audited decision, written with the entry (not part of it, nor of its hash): for
    a decision audited on its own, such as a refusal, the entry's transaction is the decision's."""

    def refuse(self, error: GatewayError) -> None:
        """Make this entry the refusal of ``error``, keeping what it said it did under ``result.withheld``
        (e.g. the hash of a signature the HSM made and the gateway did not release)."""
        withheld = self.result
        self.decision = "refused"
        self.reasons = [error.code]
        self.result = {"status": error.http_status, "detail": error.detail[:500], "withheld": withheld}


def _json(value: Any) -> str:
    """Canonical JSON of a field (sorted keys, no spaces, UTF-8). The stored text is what the hash
    covers, so the encoder may change without breaking old entries."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:  # what orjson does not take (an integer beyond 64 bits, a non-string key)
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def entry_hash(prev_hash: bytes, row: dict[str, Any]) -> bytes:
    """The hash of one stored row: SHA-256 over the previous hash and the canonical CBOR of its fields."""
    fields = [
        row["seq"],
        row["ts"],
        row["actor"],
        row["role"],
        row["action"],
        row["decision"],
        row["reasons"],
        row["payload_hash"],
        row["key_id"],
        row["result"],
        row["request_id"],
    ]
    return hashlib.sha256(bytes(prev_hash) + cbor2.dumps(fields, canonical=True)).digest()


def head(tx: Tx) -> tuple[int, bytes]:
    row = tx.fetchone("SELECT seq, entry_hash FROM audit_log ORDER BY seq DESC LIMIT 1")
    return (0, GENESIS) if row is None else (int(row["seq"]), bytes(row["entry_hash"]))


def _fields(entry: AuditEntry) -> dict[str, Any]:
    """An entry's stored fields but its number: what the hash covers, beside ``seq``."""
    return {
        "ts": clock.now_iso(),
        "actor": entry.actor,
        "role": entry.role,
        "action": entry.action,
        "decision": entry.decision,
        "reasons": _json(list(entry.reasons)),
        "payload_hash": entry.payload_hash,
        "key_id": entry.key_id,
        "result": _json(entry.result),
        "request_id": entry.request_id,
    }


FIELD_NAMES = ("ts", "actor", "role", "action", "decision", "reasons", "payload_hash", "key_id", "result",
               "request_id")

CHAIN_LOCK = "audit-chain"
"""The advisory lock whose holder chains: on SQLite's path every appender, on PostgreSQL the chainer only."""


def append(tx: Tx, entries: Iterable[AuditEntry]) -> list[int]:
    """Append entries inside ``tx`` (which must be a write transaction). Returns their sequence numbers
    — on PostgreSQL, where they are staged for the chainer (see the module's docstring), a 0 for each:
    their numbers are given when they are chained."""
    if tx.dialect == "postgresql":
        entries = list(entries)
        numbers = _stage(tx, [_fields(entry) for entry in entries])
        for entry in entries:
            for signal in entry.signals:
                signal.record_in(tx)
        return numbers
    tx.lock(CHAIN_LOCK)
    seq, prev = head(tx)
    numbers = []
    for entry in entries:
        seq += 1
        row = {"seq": seq, **_fields(entry)}
        digest = entry_hash(prev, row)
        tx.queue(  # the audit-chain lock protects seq: this insert cannot collide
            "INSERT INTO audit_log (seq, ts, actor, role, action, decision, reasons, payload_hash, key_id, "
            "result, request_id, prev_hash, entry_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*row.values(), prev, digest),
        )
        prev = digest
        numbers.append(seq)
        for signal in entry.signals:
            signal.record_in(tx)
    return numbers


def _stage(tx: Tx, rows: list[dict[str, Any]]) -> list[int]:
    """Stage entries for the chainer: one multi-row insert, queued (a fresh serial id cannot collide)."""
    if not rows:
        return []
    values = ", ".join(["(" + ", ".join("?" * len(FIELD_NAMES)) + ")"] * len(rows))
    tx.queue(f"INSERT INTO audit_staged ({', '.join(FIELD_NAMES)}) VALUES {values}",
             tuple(row[name] for row in rows for name in FIELD_NAMES))
    return [0] * len(rows)


def chain_staged(tx: Tx, limit: int) -> list[int] | None:
    """Chain up to ``limit`` staged entries (PostgreSQL), in staging-id order among those committed, inside
    ``tx`` (a write transaction): each gets the next number and its hash, and leaves ``audit_staged`` in
    the same transaction. Returns the numbers given (empty: nothing was staged), or None when another
    chainer holds the ``audit-chain`` lock (this one is not the leader for now).

    A staged row still being committed by its own transaction is not seen: it is chained by a later call,
    after the ones chained now — the chain's order is the order in which entries were found committed.
    """
    leader = tx.fetchone("SELECT pg_try_advisory_xact_lock(ecny_lock_key(?)) AS leader", (CHAIN_LOCK,))
    if leader is None or not leader["leader"]:
        return None
    rows = tx.fetchall(
        f"DELETE FROM audit_staged WHERE staged_id IN (SELECT staged_id FROM audit_staged ORDER BY staged_id "
        f"LIMIT ?) RETURNING staged_id, {', '.join(FIELD_NAMES)}", (limit,))
    if not rows:
        return []
    seq, prev = head(tx)
    numbers: list[int] = []
    values: list[Any] = []
    for staged in sorted(rows, key=lambda row: int(row["staged_id"])):
        seq += 1
        row = {"seq": seq, **{name: staged[name] for name in FIELD_NAMES}}
        digest = entry_hash(prev, row)
        values.extend((*row.values(), prev, digest, int(staged["staged_id"])))
        prev = digest
        numbers.append(seq)
    placeholders = ", ".join(["(" + ", ".join("?" * (len(FIELD_NAMES) + 4)) + ")"] * len(numbers))
    tx.queue(  # the audit-chain lock protects seq; staged_id is unique: a second chaining would fail here
        "INSERT INTO audit_log (seq, ts, actor, role, action, decision, reasons, payload_hash, key_id, result, "
        f"request_id, prev_hash, entry_hash, staged_id) VALUES {placeholders}", tuple(values))
    return numbers


async def chain_now(database: Database) -> None:
    """Chain what is staged now, if no other chainer holds the lock (PostgreSQL; nothing on SQLite): for
    processes that audit but run no :class:`AuditLog` (the command line), so that their entries do not
    wait for a gateway to start."""
    if not await database.read(lambda tx: tx.dialect == "postgresql"):
        return
    while True:
        numbers = await database.write(lambda tx: chain_staged(tx, CHAIN_BATCH))
        if not numbers or len(numbers) < CHAIN_BATCH:
            return


def pending_count(tx: Tx) -> int:
    """How many entries are staged, committed but not chained yet (always 0 on SQLite)."""
    row = tx.fetchone("SELECT COUNT(*) AS pending FROM audit_staged")
    return int(row["pending"]) if row is not None else 0


def _nothing_else(tx: Tx) -> None:
    """The write that goes with an entry recorded on its own (:meth:`AuditLog.record`)."""


@dataclass(frozen=True)
class _Refused:
    """What a group's write answers for an entry whose key may no longer sign (written as that refusal)."""

    error: GatewayError


SignedBy = tuple[str, Usage]
"""The key (id) and the usage under which it signed what an entry records."""


def _appender(group: list[tuple[AuditEntry, SignedBy | None, Callable[[Tx], Any]]],
              ) -> Callable[[Tx], tuple[list[int], list[Any]]]:
    """In one transaction: confirm the keys that signed what the group's entries record (one read for all),
    append every entry — as its refusal where its key may no longer sign — then run what goes with each
    one allowed."""

    def write(tx: Tx) -> tuple[list[int], list[Any]]:
        signed = [(index, by) for index, (_, by, _) in enumerate(group) if by is not None]
        refusals: list[GatewayError | None] = [None] * len(group)
        for (index, _), refusal in zip(signed, signing_refusals_in(tx, [by for _, by in signed]), strict=True):
            if refusal is not None:
                group[index][0].refuse(refusal)
                refusal.audited_in_transaction = True
                refusals[index] = refusal
        numbers = append(tx, [entry for entry, _, _ in group])
        return numbers, [_Refused(refusal) if refusal is not None else also(tx)
                         for (_, _, also), refusal in zip(group, refusals, strict=True)]

    return write


def checkpoint_message(seq: int, head_hash: bytes) -> bytes:
    """The bytes an audit key signs for a checkpoint."""
    return cbor2.dumps([CHECKPOINT_CONTEXT, seq, bytes(head_hash)], canonical=True)


CHAIN_BATCH = 1000
"""Most staged entries one chaining transaction takes (PostgreSQL)."""
CHAIN_IDLE_MIN_S = 0.005
CHAIN_IDLE_MAX_S = 0.05
"""The chainer's pause after a batch that did not fill up: halved (down to the minimum) after a batch
of at least :data:`CHAIN_FEW` entries, doubled (up to the maximum) after a smaller one — so under load
each poll takes what accumulated meanwhile (a few dozen polls a second, not one per entry: every poll
is a transaction), and a pending entry waits at most about the maximum."""
CHAIN_FEW = 16
CHAIN_FOLLOWER_S = 0.5
"""How often an instance that is not the chainer tries to become it: how soon a dead chainer is replaced."""


class AuditLog:
    """Grouped audit writes, periodic checkpoints and (PostgreSQL) the chainer, for one gateway process."""

    def __init__(
        self, database: Database, signer: Signer, checkpoint_every: int, flush_max: int, key_id: str | None,
        checkpoint_seconds: float = 0.0, on_head: Callable[[int], None] | None = None,
        witness_file: Path | None = None,
    ) -> None:
        self._database = database
        self._witness_file = witness_file
        self._on_head = on_head or (lambda seq: None)
        self._head_reported = 0
        self._signer = signer
        self._checkpoint_every = checkpoint_every
        self._checkpoint_seconds = checkpoint_seconds
        self._ticker: asyncio.Task[None] | None = None
        self._flush_max = flush_max
        self._key_id = key_id
        self._pending: list[tuple[AuditEntry, SignedBy | None, Callable[[Tx], Any],
                                  asyncio.Future[tuple[int, Any]]]] = []
        self._flushing: asyncio.Task[None] | None = None
        self._checkpointing: asyncio.Task[None] | None = None
        self._checkpointed = 0
        self._checkpoint_lock = asyncio.Lock()
        self._chainer: asyncio.Task[None] | None = None
        self._log = structlog.get_logger("gateway.audit")

    async def start(self) -> None:
        """Learn where the last checkpoint is; make sure the witness can be written.

        Raises:
            ConfigError: the witness file cannot be appended to.
        """
        if self._witness_file is not None:
            await asyncio.to_thread(witness.prepare, self._witness_file)
        row = await self._database.read(lambda tx: tx.fetchone("SELECT MAX(seq) AS seq FROM audit_checkpoints"))
        self._checkpointed = int(row["seq"]) if row is not None and row["seq"] is not None else 0
        self._report_head((await self._database.read(head))[0])
        if self._checkpoint_seconds > 0:
            self._ticker = asyncio.create_task(self._tick())
        if await self._database.read(lambda tx: tx.dialect == "postgresql"):
            self._chainer = asyncio.create_task(self._chain_loop())

    async def _chain_loop(self) -> None:
        """PostgreSQL: chain staged entries for as long as the process runs — whenever this instance
        holds the ``audit-chain`` lock; otherwise try again every :data:`CHAIN_FOLLOWER_S`."""
        idle = CHAIN_IDLE_MIN_S
        while True:
            try:
                numbers = await self.chain_batch()
            except Exception as exc:  # never let the chainer die: the store may come back
                self._log.warning("audit chaining failed", error=str(exc))
                numbers = None
            if numbers is None:
                await asyncio.sleep(CHAIN_FOLLOWER_S)
            elif len(numbers) < CHAIN_BATCH:
                idle = max(idle / 2, CHAIN_IDLE_MIN_S) if len(numbers) >= CHAIN_FEW else min(idle * 2, CHAIN_IDLE_MAX_S)
                await asyncio.sleep(idle)

    async def chain_batch(self) -> list[int] | None:
        """Chain one batch of staged entries (see :func:`chain_staged`) and checkpoint when due."""
        numbers = await self._database.write(lambda tx: chain_staged(tx, CHAIN_BATCH))
        if numbers:
            self._report_head(numbers[-1])
            self.after_append(numbers[-1])
        return numbers

    async def chain_pending(self) -> None:
        """Chain every entry staged before this call (PostgreSQL; nothing to do on SQLite), waiting for
        another instance's chainer if it holds the lock. For shutdown, and for readers that need them."""
        if not await self._database.read(lambda tx: tx.dialect == "postgresql"):
            return

        def last_staged(tx: Tx) -> int:
            row = tx.fetchone("SELECT MAX(staged_id) AS last FROM audit_staged")
            return int(row["last"]) if row is not None and row["last"] is not None else 0

        def still_staged(tx: Tx) -> bool:
            return tx.fetchone("SELECT 1 AS staged FROM audit_staged WHERE staged_id <= ? LIMIT 1", (last,)) is not None

        last = await self._database.read(last_staged)
        while last and await self._database.read(still_staged):
            if await self.chain_batch() is None:
                await asyncio.sleep(CHAIN_IDLE_MAX_S)

    async def settle(self, timeout: float = CHAIN_FOLLOWER_S * 4) -> None:
        """Before a listing or a verification: chain what was committed before it (PostgreSQL), so
        that an auditor reads their own and everyone's decisions — waiting at most ``timeout``; what
        is still pending then is reported as pending. Never raises: the listing goes on either way."""
        try:
            async with asyncio.timeout(timeout):  # not wait_for: on 3.11 it can swallow a cancellation
                await self.chain_pending()
        except (GatewayError, TimeoutError) as exc:
            self._log.warning("audit entries still pending", error=str(exc) or "timed out")

    async def _tick(self) -> None:
        """Every ``checkpoint_seconds``: report the head (``on_head``: entries appended inside other
        transactions or by other processes too) and checkpoint it if it has moved."""
        while True:
            await asyncio.sleep(self._checkpoint_seconds)
            try:
                self._report_head((await self._database.read(head))[0])
                await self.checkpoint()
            except Exception as exc:  # never let the ticker die: the next tick tries again
                self._log.warning("periodic audit checkpoint failed", error=str(exc))

    def _report_head(self, seq: int) -> None:
        """Tell ``on_head`` of a higher head (a flush may finish after a tick read a later head)."""
        if seq > self._head_reported:
            self._head_reported = seq
            self._on_head(seq)

    async def record(self, entry: AuditEntry) -> int:
        """Append one entry, grouped with others into one commit. Returns its sequence number
        once committed.

        Raises:
            StoreUnavailable: the entry could not be written (the caller must not report success).
        """
        seq, _ = await self.record_with(entry, _nothing_else)
        return seq

    async def record_with(self, entry: AuditEntry, also: Callable[[Tx], T],
                          signed_by: SignedBy | None = None) -> tuple[int, T]:
        """Append one entry and run ``also`` in the same transaction (after the group's entries), grouped
        with other entries into one commit. Returns the entry's sequence number and what ``also``
        returned, once committed: what ``also`` writes (an Idempotency-Key answer) is stored exactly
        when the entry is.

        ``signed_by`` names the key (and usage) that signed what the entry records, for a signature that
        leaves only once this commits: the key is confirmed in that transaction
        (:func:`~gateway.keys.signing_refusals_in`, one read for the whole group). If it may no longer
        sign — disabled, retired or gone since the caller looked — the entry is written as that refusal
        (:meth:`AuditEntry.refuse`), ``also`` does not run, and the refusal is raised here once committed,
        marked ``audited_in_transaction``; the group's other entries are unaffected.

        ``also`` shares its transaction with the group's other entries, so it must not fail but for the
        store itself (an insert that cannot collide, or an ``ON CONFLICT DO NOTHING``): if it raises,
        no entry of the group is written and every one of them gets the exception.

        Raises:
            StoreUnavailable: the entry could not be written (the caller must not report success).
            KeyNotFound, KeyUsageNotAllowed, KeyRetired, KeyDisabled: ``signed_by`` may no longer sign; the
                refusal is committed.
        """
        future: asyncio.Future[tuple[int, Any]] = asyncio.get_running_loop().create_future()
        self._pending.append((entry, signed_by, also, future))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush_loop())
        seq, result = await future
        if isinstance(result, _Refused):
            raise result.error
        return seq, result

    async def _flush_loop(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self._flush_max], self._pending[self._flush_max :]
            try:
                numbers, results = await self._database.write(
                    _appender([(entry, by, also) for entry, by, also, _ in batch]))
            except Exception as exc:
                for *_, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (*_, future), seq, result in zip(batch, numbers, results, strict=True):
                if not future.done():
                    future.set_result((seq, result))
            self._report_head(numbers[-1])
            self.after_append(numbers[-1])

    def after_append(self, last_seq: int) -> None:
        """Start a checkpoint once ``checkpoint_every`` entries have followed the last one."""
        if last_seq - self._checkpointed >= self._checkpoint_every and (
            self._checkpointing is None or self._checkpointing.done()
        ):
            self._checkpointing = asyncio.create_task(self._checkpoint_quietly())

    async def _checkpoint_quietly(self) -> None:
        try:
            await self.checkpoint()
        except GatewayError as exc:
            self._log.warning("audit checkpoint failed", error=exc.detail)

    async def _audit_key(self) -> KeyRecord | None:
        """The audit key, or None while there is none yet (checkpoints start once it exists)."""

        def find(tx: Tx) -> KeyRecord | None:
            if not self._key_id and active_key_id(tx, Usage.AUDIT) is None:
                return None
            return key_for_usage(tx, Usage.AUDIT, self._key_id, "audit.key_id")

        return await self._database.read(find)

    async def checkpoint(self) -> int | None:
        """Sign the current chain head with the audit key. Returns the checkpointed seq, or None
        when there is nothing new to sign or no audit key exists yet.

        Another instance on the same database may checkpoint the same head: the first row stays.
        """
        async with self._checkpoint_lock:
            return await self._checkpoint()

    async def _checkpoint(self) -> int | None:
        key = await self._audit_key()
        if key is None:
            return None
        seq, head_hash = await self._database.read(head)
        if seq <= self._checkpointed:
            return None
        signature = await self._signer.sign(
            key.key_id, key.algorithm.value, signing_input(key.algorithm, checkpoint_message(seq, head_hash))
        )

        def store(tx: Tx) -> Any:
            tx.execute(
                "INSERT INTO audit_checkpoints (seq, head_hash, key_id, algorithm, signature, ts) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (seq) DO NOTHING",
                (seq, head_hash, key.key_id, key.algorithm.value, signature, clock.now_iso()),
            )
            # What is stored, which is another instance's row if it signed this head first (ECDSA
            # signatures differ each time): the witness must hold the same bytes as the database.
            return tx.fetchone("SELECT * FROM audit_checkpoints WHERE seq = ?", (seq,))

        stored = await self._database.write(store)
        self._checkpointed = max(self._checkpointed, seq)
        if stored is not None:  # read in the writing transaction, so only absent if deleted meanwhile
            await self._witness(witness.WitnessRecord.from_row(stored))
        return seq

    async def _witness(self, record: witness.WitnessRecord) -> None:
        """Append the checkpoint to the witness, after it is committed (a witnessed checkpoint the
        database never had would look like a cut tail). A failure is logged, not raised: the
        checkpoint stands, and the next one witnessed covers everything before it."""
        if self._witness_file is None:
            return
        try:
            await asyncio.to_thread(witness.append, self._witness_file, record)
        except OSError as exc:
            self._log.error("audit checkpoint not witnessed", seq=record.seq, witness_file=str(self._witness_file),
                            error=exc.strerror or str(exc))

    async def close(self) -> None:
        """Write what is pending and sign a final checkpoint."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        if self._chainer is not None:
            self._chainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._chainer
            self._chainer = None
        while self._flushing is not None and not self._flushing.done():
            await self._flushing
        await self.settle()  # what is left stays staged for another instance's chainer
        if self._checkpointing is not None and not self._checkpointing.done():
            await self._checkpointing
        try:
            await self.checkpoint()
        except GatewayError as exc:
            self._log.warning("final audit checkpoint failed", error=exc.detail)
