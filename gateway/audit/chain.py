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
from gateway.keys import KeyRecord, Usage, active_key_id, key_for_usage
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


def append(tx: Tx, entries: Iterable[AuditEntry]) -> list[int]:
    """Append entries inside ``tx`` (which must be a write transaction). Returns their sequence numbers."""
    tx.lock("audit-chain")
    seq, prev = head(tx)
    numbers = []
    for entry in entries:
        seq += 1
        row = {
            "seq": seq,
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


def _nothing_else(tx: Tx) -> None:
    """The write that goes with an entry recorded on its own (:meth:`AuditLog.record`)."""


def _appender(group: list[tuple[AuditEntry, Callable[[Tx], Any]]]) -> Callable[[Tx], tuple[list[int], list[Any]]]:
    """Append the group's entries, then run what goes with each of them, in one transaction."""

    def write(tx: Tx) -> tuple[list[int], list[Any]]:
        numbers = append(tx, [entry for entry, _ in group])
        return numbers, [also(tx) for _, also in group]

    return write


def checkpoint_message(seq: int, head_hash: bytes) -> bytes:
    """The bytes an audit key signs for a checkpoint."""
    return cbor2.dumps([CHECKPOINT_CONTEXT, seq, bytes(head_hash)], canonical=True)


class AuditLog:
    """Grouped audit writes and periodic checkpoints for one gateway process."""

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
        self._pending: list[tuple[AuditEntry, Callable[[Tx], Any], asyncio.Future[tuple[int, Any]]]] = []
        self._flushing: asyncio.Task[None] | None = None
        self._checkpointing: asyncio.Task[None] | None = None
        self._checkpointed = 0
        self._checkpoint_lock = asyncio.Lock()
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

    async def record_with(self, entry: AuditEntry, also: Callable[[Tx], T]) -> tuple[int, T]:
        """Append one entry and run ``also`` in the same transaction (after the group's entries), grouped
        with other entries into one commit. Returns the entry's sequence number and what ``also``
        returned, once committed: what ``also`` writes (an Idempotency-Key answer) is stored exactly
        when the entry is.

        ``also`` shares its transaction with the group's other entries, so it must not fail but for the
        store itself (an insert that cannot collide, or an ``ON CONFLICT DO NOTHING``): if it raises,
        no entry of the group is written and every one of them gets the exception.

        Raises:
            StoreUnavailable: the entry could not be written (the caller must not report success).
        """
        future: asyncio.Future[tuple[int, Any]] = asyncio.get_running_loop().create_future()
        self._pending.append((entry, also, future))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush_loop())
        seq, result = await future
        return seq, result

    async def _flush_loop(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self._flush_max], self._pending[self._flush_max :]
            try:
                numbers, results = await self._database.write(_appender([(entry, also) for entry, also, _ in batch]))
            except Exception as exc:
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, _, future), seq, result in zip(batch, numbers, results, strict=True):
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
        while self._flushing is not None and not self._flushing.done():
            await self._flushing
        if self._checkpointing is not None and not self._checkpointing.done():
            await self._checkpointing
        try:
            await self.checkpoint()
        except GatewayError as exc:
            self._log.warning("final audit checkpoint failed", error=exc.detail)
