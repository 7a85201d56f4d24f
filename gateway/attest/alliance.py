"""Pulling the peers' fingerprint batches: on demand (``ecny-gateway alliance sync``) and on a schedule
(``[alliance] sync_interval_seconds``, in the first HTTP process of a running gateway).

For each configured peer: read its cursor, send ``GET {url}/v1/alliance/fingerprints?after=cursor&nonce=…``
with a fresh random nonce, verify the answer (gateway.attest.batches), store its entries and move the
cursor in one transaction, and repeat until the peer's head is reached. Storing is idempotent: under a
per-peer lock the cursor is read again, and a batch whose start is no longer the cursor (another process
stored it meanwhile) is dropped. A refused or failed pull stores nothing but the error on the peer's row.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from dataclasses import dataclass

import aiohttp
import structlog

from gateway import clock
from gateway.attest import records
from gateway.attest.attestations import iso_from_ms, ms
from gateway.attest.batches import Batch, member_key, verify_batch
from gateway.audit.chain import AuditEntry, append
from gateway.config import AlliancePeer, AllianceSettings, read_private_file
from gateway.errors import AllianceBatchRefused, AlliancePeerUnavailable, GatewayError
from gateway.ledger.store import Database, Tx
from gateway.metrics import Metrics
from gateway.risk.signals import record_signal_in

BATCH_MEDIA_TYPE = "application/cose; cose-type=\"cose-sign1\""
MAX_BATCH_BYTES = 16 * 1024 * 1024
MAX_ROUNDS = 10_000  # batches per peer in one sync: a peer claiming an ever-growing head cannot hold it forever


@dataclass(frozen=True)
class PullReport:
    """What one peer's sync did."""

    member_id: str
    stored: int
    cursor: int
    head: int
    error: str = ""
    code: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


class AllianceSync:
    """Pulls the configured peers' batches into the store."""

    def __init__(self, database: Database, settings: AllianceSettings, metrics: Metrics | None = None) -> None:
        self.database = database
        self.settings = settings
        self.metrics = metrics
        self._task: asyncio.Task[None] | None = None

    async def sync_all(self, only: str | None = None) -> list[PullReport]:
        """One sync of every peer (or of ``only``); never raises for a peer's failure: each is reported."""
        peers = [peer for peer in self.settings.peers if only is None or peer.member_id == only]
        timeout = aiohttp.ClientTimeout(total=self.settings.request_timeout_seconds)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            return [await self.pull(session, peer) for peer in peers]

    async def pull(self, session: aiohttp.ClientSession, peer: AlliancePeer) -> PullReport:
        await self.database.write(lambda tx: records.ensure_peer(tx, peer.member_id))
        stored = 0
        cursor = head = 0
        try:
            for _ in range(MAX_ROUNDS):
                batch, cursor = await self._pull_once(session, peer)
                head = batch.head
                stored += len(batch.entries)
                cursor += len(batch.entries)
                if not batch.entries or cursor >= head:
                    break
        except GatewayError as exc:
            error = exc.detail
            await self.database.write(lambda tx: records.note_peer_error(tx, peer.member_id, error))
            self._count(peer.member_id, "refused" if isinstance(exc, AllianceBatchRefused) else "failed")
            structlog.get_logger("gateway.attest").warning("alliance sync failed", member=peer.member_id,
                                                           error=error)
            return PullReport(peer.member_id, stored, cursor, head, error, exc.code)
        self._count(peer.member_id, "accepted")
        if self.metrics is not None:
            self.metrics.alliance_sync_lag.labels(peer.member_id).set(0)
        return PullReport(peer.member_id, stored, cursor, head)

    async def _pull_once(self, session: aiohttp.ClientSession, peer: AlliancePeer) -> tuple[Batch, int]:
        state = await self.database.read(lambda tx: records.peer_state(tx, peer.member_id))
        cursor = int(state["feed_cursor"]) if state is not None else 0
        last_issued = str(state["last_issued_at"]) if state is not None else ""
        nonce = secrets.token_bytes(16)
        envelope = await self._fetch(session, peer, cursor, nonce)
        batch = verify_batch(
            envelope, member_key(peer.member_id, peer.public_key_pem), cursor, nonce,
            int(time.time() * 1000), self.settings.batch_max_age_seconds * 1000,
            ms(last_issued) if last_issued else 0, frozenset(p.member_id for p in self.settings.peers))

        def store(tx: Tx) -> None:
            tx.lock(f"alliance-peer:{peer.member_id}")
            now = records.peer_state(tx, peer.member_id)
            if now is not None and int(now["feed_cursor"]) != cursor:
                return  # another process stored this batch meanwhile: nothing to do
            entries = [(entry.seq, entry.fingerprint.hex(), iso_from_ms(entry.financed_at_ms))
                       for entry in batch.entries]
            records.store_peer_entries(tx, peer.member_id, entries, batch.head, iso_from_ms(batch.issued_at_ms))
            report_double_financings_in(tx, peer.member_id, entries)

        await self.database.write(store)
        return batch, cursor

    async def _fetch(self, session: aiohttp.ClientSession, peer: AlliancePeer, cursor: int, nonce: bytes) -> bytes:
        headers = {"Accept": "application/cbor"}
        if peer.api_key_file is not None:
            headers["Authorization"] = "Bearer " + read_private_file(peer.api_key_file, "alliance.peers.api_key_file")
        url = peer.url.rstrip("/") + "/v1/alliance/fingerprints"
        params = {"after": str(cursor), "nonce": nonce.hex(), "limit": str(self.settings.batch_limit)}
        try:
            async with session.get(url, params=params, headers=headers) as response:
                body = await response.content.read(MAX_BATCH_BYTES + 1)
                if response.status != 200:
                    raise AlliancePeerUnavailable(
                        f"{peer.member_id} answered {response.status}: {body[:200].decode(errors='replace')}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AlliancePeerUnavailable(f"{peer.member_id} at {peer.url}: {type(exc).__name__} {exc}") from None
        if len(body) > MAX_BATCH_BYTES:
            raise AllianceBatchRefused(f"batch from {peer.member_id} refused: larger than {MAX_BATCH_BYTES} bytes")
        return body

    def _count(self, member_id: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.alliance_batches.labels(member_id, outcome).inc()

    # --- the schedule -----------------------------------------------------------------------------

    async def refresh_lag(self) -> None:
        """Set ``ecny_alliance_sync_lag_seconds`` of every peer from its last accepted batch."""
        if self.metrics is None:
            return
        states = {str(row["member_id"]): row for row in await self.database.read(records.peer_states)}
        now = clock.now().timestamp()
        for peer in self.settings.peers:
            state = states.get(peer.member_id)
            last = str(state["last_sync_at"]) if state is not None else ""
            lag = now - ms(last) / 1000 if last else float("inf")
            self.metrics.alliance_sync_lag.labels(peer.member_id).set(lag)

    def start(self) -> None:
        """Pull every ``sync_interval_seconds`` until :meth:`close` (nothing when 0 or no peers)."""
        if self.settings.sync_interval_seconds > 0 and self.settings.peers:
            self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            try:
                await self.sync_all()
                await self.refresh_lag()
            except GatewayError as exc:  # the store is down: try again next time
                structlog.get_logger("gateway.attest").warning("alliance sync round failed", error=exc.detail)
            await asyncio.sleep(self.settings.sync_interval_seconds)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


SIGNAL_DOUBLE_FINANCED = "attestation.double_financed"


def report_double_financings_in(tx: Tx, member_id: str, entries: list[tuple[int, str, str]]) -> None:
    """A peer's batch names a document this bank financed too: a double financing that slipped through the
    sync window (both banks financed before either had the other's fingerprint). Nothing can refuse it any
    more; it is audited, and a ``attestation.double_financed`` risk signal (critical by default) raises it
    for people to act on — with the peer, the two financing times and this bank's attestation."""
    theirs = {fingerprint: financed_at for _, fingerprint, financed_at in entries}
    for ours in records.financed_here(tx, list(theirs)):
        detail = {"member_id": member_id, "financed_there_at": theirs[ours["fingerprint"]],
                  "attestation_id": ours["attestation_id"], "financed_here_at": ours["created_at"],
                  "document_type": ours["document_type"], "document_number": ours["document_number"]}
        append(tx, [AuditEntry(actor=f"alliance:{member_id}", role="peer", action="alliance.double_financing",
                               decision="failed", reasons=("double-financed",),
                               result={"fingerprint": ours["fingerprint"], **detail})])
        record_signal_in(tx, SIGNAL_DOUBLE_FINANCED, ours["issuer_tax_id"], None, actor=f"alliance:{member_id}",
                         fingerprint=ours["fingerprint"], **detail)
