"""An offline ledger without an HSM, for benchmarks and fuzz tests.

A SQLite store driven through the same transaction functions the API uses
(:meth:`Devices.register_in`, :meth:`Devices.load_in`, :func:`reconcile_in`), with a `cryptography`
P-256 key standing in for the HSM's ``voucher`` key (certificates, vouchers and acknowledgements
are then signed in software). Never used by the gateway itself: its users are the device and security
tests and bench/reconcile.py (which imports it from here, as it imports tests/pg.py).
"""

from __future__ import annotations

import gc
import pickle
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway import clock
from gateway.audit.chain import AuditEntry
from gateway.hardwallet.simulator import SimulatedDevice
from gateway.ledger import journal
from gateway.ledger.migrate import apply_migrations
from gateway.ledger.sqlite import SqliteTx, _connect
from gateway.ledger.store import Tx
from gateway.offline.bulk import select_in
from gateway.offline.devices import DAY_MS, Devices, LoadResult
from gateway.offline.reconcile import reconcile_in
from gateway.offline.settings import OfflineSettings
from gateway.offline.upload import Record, Upload, apply_checks, hashes_to_check, plan_checks, read_uploads
from gateway.offline.verify import InlineVerifier, Job, PoolVerifier, Verifier
from gateway.schemes import offline
from gateway.wallets.ids import new_wallet_id

T = TypeVar("T")

ACTOR = "harness"


class SoftIssuer:
    """A software stand-in for the HSM's ``voucher`` key."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.kid = "soft-issuer"
        self.pem = self.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def sign(self, payload: bytes) -> bytes:
        return offline.device_sign1(self.key, self.kid.encode(), payload)


class OfflineHarness:
    """One SQLite file with wallets, devices and the reconciliation engine."""

    def __init__(self, path: str, settings: OfflineSettings | None = None, verifier: Verifier | None = None) -> None:
        self.connection = _connect(path)  # the gateway's own SQLite settings
        self.settings = settings or OfflineSettings()
        self.verifier = verifier or InlineVerifier()
        self.issuer = SoftIssuer()
        self.devices = Devices(None, None, None, None)  # type: ignore[arg-type]  # only *_in methods are used
        self.devices.offline = self.settings
        self.write(lambda tx: apply_migrations(tx, "sqlite"))

    def write(self, fn: Callable[[Tx], T]) -> T:
        connection = self.connection
        connection.execute("BEGIN IMMEDIATE")
        try:
            result = fn(SqliteTx(connection))
            connection.execute("COMMIT")
            return result
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise

    def read(self, fn: Callable[[Tx], T]) -> T:
        return fn(SqliteTx(self.connection))

    def close(self) -> None:
        self.connection.close()

    # --- set-up ---------------------------------------------------------------------------------

    def wallet(self, tier: int = 1, cash: int = 0) -> str:
        wallet_id = new_wallet_id()

        def work(tx: Tx) -> None:
            now = clock.now_iso()
            tx.execute("INSERT INTO wallets (wallet_id, holder_name, id_number, phone, tier, kind, status, "
                       "status_reason, created_at, created_by, updated_at) VALUES (?, 'Harness', NULL, '13800138000', "
                       "?, 'personal', 'active', '', ?, ?, ?)", (wallet_id, tier, now, ACTOR, now))
            journal.open_accounts(tx, wallet_id)
            if cash:
                journal.post(tx, "cash_in", wallet_id, [(journal.wallet_account(wallet_id), cash),
                                                        (journal.ISSUANCE, -cash)], ACTOR)

        self.write(work)
        return wallet_id

    def device(self, wallet_id: str, tier: int = 1, device_id: str | None = None) -> SimulatedDevice:
        """A simulated device, registered on ``wallet_id`` and certified."""
        device = SimulatedDevice.create(device_id)
        caps = self.settings.tier_caps(tier)
        now = journal.epoch_millis()
        certificate = offline.Certificate(device.state.device_id, wallet_id, device.point, tier,
                                          offline.Caps(caps.per_payment_fen, caps.balance_fen, caps.payments_per_sync),
                                          now, now + self.settings.certificate_days * DAY_MS)
        envelope = self.issuer.sign(certificate.payload())
        entry = AuditEntry(ACTOR, "teller", "devices.register", "allowed")
        self.write(lambda tx: self.devices.register_in(tx, certificate, envelope, self.issuer.kid, "sim", entry))
        device.certify(envelope, self.issuer.pem)
        return device

    def load(self, device: SimulatedDevice, amount: int) -> None:
        entry = AuditEntry(ACTOR, "teller", "devices.load", "allowed")
        result = self.write(lambda tx: self.devices.load_in(tx, device.state.device_id, amount, entry))
        assert isinstance(result, LoadResult), "a load above the approval threshold waits for a supervisor"
        payload = self.read(lambda tx: tx.fetchone("SELECT payload FROM device_loads WHERE device_id = ? AND "
                                                   "load_seq = ?", (result.device_id, result.load_seq)))
        assert payload is not None
        device.load(self.issuer.sign(bytes(payload["payload"])))

    # --- reconciliation ------------------------------------------------------------------------------

    def plan(self, exports: Sequence[tuple[str, bytes]], uploads: list[Upload] | None = None) -> tuple[
            list[Upload], list[list[Record | Upload]], list[Job]]:
        """Read exports (unless ``uploads`` are the exports read already) and list the signatures to check,
        as :meth:`Devices.sync` does (no transaction)."""
        if uploads is None:
            uploads = read_uploads(exports)
        ids = {u.device_id for u in uploads} | {r.payment.payer for u in uploads for r in u.receipts
                                                if r.payment is not None}
        hashes = hashes_to_check(uploads, self.settings.signature_checks)

        def lookup(tx: Tx) -> tuple[dict[str, bytes], set[bytes]]:
            points = {row["device_id"]: bytes(row["public_key"]) for row in select_in(
                tx, "SELECT device_id, public_key FROM devices WHERE device_id IN ({in})", sorted(ids))}
            known = {bytes(row["payment_hash"]) for row in select_in(
                tx, "SELECT payment_hash FROM offline_payments WHERE payment_hash IN ({in})", hashes)}
            return points, known

        points, known = self.read(lookup)
        jobs, targets = plan_checks(uploads, points, known, self.settings.signature_checks)
        return uploads, targets, jobs

    def prepare(self, exports: Sequence[tuple[str, bytes]]) -> list[Upload]:
        """Read and check exports (outside the write transaction)."""
        uploads, targets, jobs = self.plan(exports)
        apply_checks(uploads, targets, self.verifier.verify_many(jobs))
        return uploads

    def reconcile_batches(self, exports: Sequence[tuple[str, bytes]], batch: int, read_ahead: int = 0) -> tuple[
            list[dict[str, Any]], dict[str, float]]:
        """Reconcile ``exports`` ``batch`` at a time, each batch in one write transaction.

        With a :class:`PoolVerifier`, the next batch's signatures are checked in its worker processes while
        this batch is reconciled, and with ``read_ahead`` > 0 the next ``read_ahead`` batches are also read
        (parsed: :func:`read_uploads`) there, so that this process only looks them up, applies the rules and
        writes. Returns the reports and where this process's time went: reading (or waiting for what the
        workers read) and planning the checks, waiting for signatures, reconciling.

        Python's cyclic garbage collector is paused meanwhile (a bulk job's choice, as in any batch loader):
        a batch allocates some hundred thousand short-lived objects, which made it run over and over, for
        ~20 % of the time; nothing here is left in a reference cycle, so memory is freed as before.
        """
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._reconcile_batches(exports, batch, read_ahead)
        finally:
            if collecting:
                gc.enable()

    def _reconcile_batches(self, exports: Sequence[tuple[str, bytes]], batch: int, read_ahead: int) -> tuple[
            list[dict[str, Any]], dict[str, float]]:
        timings = {"read_s": 0.0, "verify_wait_s": 0.0, "reconcile_s": 0.0}
        reports: list[dict[str, Any]] = []
        pool = self.verifier if isinstance(self.verifier, PoolVerifier) else None
        parts = [exports[start:start + batch] for start in range(0, len(exports), batch)]
        reading: list[Future[bytes] | None] = []
        if pool is not None and read_ahead > 0:
            reading = [pool.submit(read_pickled, part) for part in parts[:read_ahead]]
        pending: tuple[list[Upload], list[list[Record | Upload]], Callable[[], list[bool]]] | None = None

        def finish(step: tuple[list[Upload], list[list[Record | Upload]], Callable[[], list[bool]]]) -> None:
            uploads, targets, wait = step
            started = time.perf_counter()
            apply_checks(uploads, targets, wait())
            checked = time.perf_counter()
            reports.extend(self.reconcile([u for u in uploads if u.export_ok]))
            timings["verify_wait_s"] += checked - started
            timings["reconcile_s"] += time.perf_counter() - checked

        for index, part in enumerate(parts):
            started = time.perf_counter()
            read = None
            if reading:
                future, reading[index] = reading[index], None  # its megabytes of pickle are freed once read
                assert future is not None
                read = pickle.loads(future.result())
            uploads, targets, jobs = self.plan(part, read)
            wait = pool.submit_many(jobs) if pool is not None else _ready(self.verifier.verify_many(jobs))
            if reading and index + read_ahead < len(parts):  # queued after this batch's signatures
                reading.append(pool.submit(read_pickled, parts[index + read_ahead]))  # type: ignore[union-attr]
            timings["read_s"] += time.perf_counter() - started
            if pending is not None:
                finish(pending)
            pending = (uploads, targets, wait)
        if pending is not None:
            finish(pending)
        return reports, timings

    def reconcile(self, uploads: Sequence[Upload]) -> list[dict[str, Any]]:
        return self.write(lambda tx: reconcile_in(tx, uploads, self.settings, ACTOR))

    def sync(self, devices: Sequence[SimulatedDevice], ack: bool = True) -> list[dict[str, Any]]:
        """Export, reconcile in one batch, and acknowledge."""
        exports = []
        for device in devices:
            device.export_log(0)
            exports.append((device.state.device_id, device.export()))
        uploads = self.prepare(exports)
        reports = self.reconcile([u for u in uploads if u.export_ok])
        if ack:
            for device, upload in zip(devices, uploads, strict=True):
                acknowledgement = offline.Ack(device.state.device_id, upload.export.counter, upload.export.rx,
                                              upload.export_hash, journal.epoch_millis())
                device.ack_log(self.issuer.sign(acknowledgement.payload()))
        return reports


def read_pickled(exports: Sequence[tuple[str, bytes]]) -> bytes:
    """:func:`read_uploads` in a worker process, its result pickled there: the reconciling process unpickles it
    when it needs it, in its own thread (unpickled by the pool's result thread, it would contend for the GIL
    with the thread applying the rules)."""
    return pickle.dumps(read_uploads(exports), protocol=pickle.HIGHEST_PROTOCOL)


def _ready(results: list[bool]) -> Callable[[], list[bool]]:
    return lambda: results
