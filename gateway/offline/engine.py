"""Reconciliation of hard-wallet logs with the ledger (docs/spec.md §8, docs/device-protocol.md).

A device's log export holds the payments it made (signed by itself, in counter order, each naming
the hash of the one before) and the payments it received. Reconciling it:

1. :func:`read_upload` takes the device-signed export apart (no trust yet);
   :func:`plan_checks` lists the signatures to check and :func:`apply_checks` records the results
   of a :class:`~gateway.offline.verify.Verifier` — both outside any transaction, so verification
   can run in a process pool and never holds a lock.
2. :func:`reconcile_in` applies the rules inside one write transaction, under the locks of the
   devices and wallets involved, and writes everything set-at-a-time (:mod:`gateway.offline.bulk`).

A payment is posted — payer's offline reserve → payee's wallet, one journal entry whose id derives
from the payment's hash, so it can never post twice — when it is authentic, passes every rule, and
both its payer's record and its payee's record have arrived. A payment that fails a rule is *held*
and gets a discrepancy (kind, evidence, device, amount) for a supervisor; a record that cannot be a
payment at all (malformed, bad signature, unknown payer) becomes a discrepancy with the record as
evidence. Nothing is dropped. The same export uploaded again changes nothing (its hash is
recorded), and so does an export that repeats payments already reconciled.

Rules, in the order that names a held payment's discrepancy (every failed rule is in its evidence):
:data:`HOLD_ORDER`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway import clock
from gateway.audit.chain import AuditEntry, append
from gateway.errors import InvalidDeviceSignature, OfflineFormatError
from gateway.ledger.journal import LedgerInvariantBroken, reserve_account, wallet_account
from gateway.ledger.store import Tx
from gateway.offline.bulk import Transfer, insert_many, post_offline, select_in, update_in
from gateway.offline.caps import PayeeCredits, WalletLimits, default_limits
from gateway.offline.settings import OfflineSettings
from gateway.offline.verify import Job
from gateway.schemes.offline import (
    ES256,
    Envelope,
    LogExport,
    Payment,
    open_envelope,
    parse_export,
    parse_payment,
    record_hash,
)

KINDS: dict[str, str] = {
    "malformed-record": "a log entry that is not a payment (or not the device's own, or not to it)",
    "invalid-signature": "a payment whose signature does not verify with its payer's key",
    "invalid-certificate": "the device presented a certificate other than the one issued to it",
    "invalid-voucher": "the device reports loading a voucher that was not issued to it",
    "invalid-export-signature": "a log export whose signature does not verify with the device's key",
    "unknown-device": "a payment from or to a device the gateway never registered",
    "double-spend": "two different payments with the same payer and counter (the payer is frozen)",
    "counter-gap": "counters missing from the payer's log; the payment after the gap is held",
    "broken-chain": "a payment whose prev is not the hash of the payer's previous payment",
    "device-frozen": "a payment by a device frozen after a double spend",
    "device-revoked": "a payment dated after its payer device was revoked",
    "device-unloaded": "a payment after its payer device's final statement",
    "certificate-expired": "a payment dated after its payer's certificate expired",
    "over-payment-cap": "a payment above the payer's per-payment cap",
    "too-many-payments": "more payments between two syncs than the payer's certificate allows",
    "voucher-expired": "a voucher loaded after its expiry, or a payment spending such value",
    "overspent": "a payment beyond the value loaded onto the payer device",
    "payee-wallet-not-active": "the payee's wallet is frozen or closed",
    "payee-balance-cap": "posting the payment would take the payee's wallet above its tier's balance cap",
    "unmatched-payer-record": "the payee's log does not hold a payment its payer logged",
    "unmatched-payee-record": "the payer's log does not hold a payment its payee logged",
    "statement-mismatch": "the unload statement's totals differ from the gateway's",
}

HOLD_ORDER: tuple[str, ...] = (
    "double-spend", "counter-gap", "broken-chain", "device-frozen", "device-revoked", "device-unloaded",
    "certificate-expired", "unknown-device", "over-payment-cap", "too-many-payments", "voucher-expired",
    "overspent", "payee-wallet-not-active", "payee-balance-cap", "unmatched-payer-record", "unmatched-payee-record",
)

AUTO_RESOLVED = frozenset({"unmatched-payer-record"})
"""Holds lifted, and their discrepancy resolved as ``matched``, when the missing record arrives."""


NONE: frozenset[bytes] = frozenset()
"""No other payment at the same payer and counter (shared: the usual case, one per payment)."""


def offline_entry_id(payment_hash: bytes) -> str:
    """The journal entry id of a payment: derived from its hash (96 bits of it, as long as the ledger's
    other entry ids), so it can only ever post once. The entry's reference is the full hash."""
    return "off_" + payment_hash[:12].hex()


def check_offline_entries(tx: Tx) -> list[str]:
    """Offline payments against the journal (``ecny-gateway ledger check`` covers the journal itself): every
    posted or honoured payment names the journal entry that moved it, and every such entry credits exactly
    the sum of the payments naming it. Returns the problems found (none: sound)."""
    problems = []
    for row in tx.fetchall("SELECT payment_hash, status FROM offline_payments "
                           "WHERE status IN ('posted', 'honoured') AND entry_id IS NULL"):
        # Recorded before payments named their entry: then each had its own, offline_entry_id(hash).
        digest = bytes(row["payment_hash"])
        if tx.fetchone("SELECT 1 FROM journal WHERE entry_id = ?", (offline_entry_id(digest),)) is None:
            problems.append(f"offline payment {digest.hex()} is {row['status']} but has no journal entry")
    for row in tx.fetchall(
            "SELECT p.entry_id, p.paid, (SELECT COALESCE(SUM(amount), 0) FROM postings "
            "WHERE postings.entry_id = p.entry_id AND amount > 0) AS credited FROM (SELECT entry_id, SUM(amount) "
            "AS paid FROM offline_payments WHERE entry_id IS NOT NULL GROUP BY entry_id) p"):
        if int(row["paid"]) != int(row["credited"]):
            problems.append(f"journal entry {row['entry_id']} credits {row['credited']} for offline payments of "
                            f"{row['paid']}")
    return problems + check_offline_reserves(tx)


def outstanding_problem(device: Any) -> str:
    """What is wrong with a device's figures (empty: nothing): its payments within the loaded value
    (``spent_fen``) and the value returned at unload never add up to more than was loaded (``issued_fen``),
    so its outstanding value (issued - spent - returned) is never negative."""
    issued, spent, returned = int(device["issued_fen"]), int(device["spent_fen"]), int(device["returned_fen"])
    if spent < 0 or returned < 0 or spent + returned > issued:
        return (f"device {device['device_id']}: spent {spent} + returned {returned} fen exceed the {issued} fen "
                f"loaded (outstanding {issued - spent - returned})")
    return ""


def check_offline_reserves(tx: Tx) -> list[str]:
    """Hard wallets against the ledger: no device's outstanding value is negative, and every wallet's offline
    reserve holds exactly its devices' outstanding value plus the payments within their loaded value that are
    not settled yet (awaiting a record or held). Returns the problems found (none: sound)."""
    problems = [outstanding_problem(row) for row in tx.fetchall(
        "SELECT device_id, issued_fen, spent_fen, returned_fen FROM devices "
        "WHERE spent_fen < 0 OR returned_fen < 0 OR spent_fen + returned_fen > issued_fen")]
    # Three grouped scans (a store of millions of payments is checked in linear time), compared here.
    expected: dict[str, int] = defaultdict(int)
    held: dict[str, int] = defaultdict(int)
    for row in tx.fetchall("SELECT wallet_id, SUM(issued_fen - spent_fen - returned_fen) AS outstanding "
                           "FROM devices GROUP BY wallet_id"):
        expected[reserve_account(row["wallet_id"])] += int(row["outstanding"])
    for row in tx.fetchall("SELECT d.wallet_id, SUM(p.amount) AS unsettled FROM offline_payments p JOIN devices d "
                           "ON d.device_id = p.payer_device WHERE p.in_budget = 1 "
                           "AND p.status NOT IN ('posted', 'honoured', 'rejected') GROUP BY d.wallet_id"):
        expected[reserve_account(row["wallet_id"])] += int(row["unsettled"])
        held[reserve_account(row["wallet_id"])] = int(row["unsettled"])
    reserves = {row["account_id"]: int(row["balance"]) for row in tx.fetchall(
        "SELECT account_id, balance FROM accounts WHERE kind = 'reserve'")}
    for account_id in sorted(set(reserves) | set(expected)):
        balance, want = reserves.get(account_id, 0), expected.get(account_id, 0)
        if balance != want:
            wallet_id = account_id.removeprefix(reserve_account(""))
            problems.append(f"wallet {wallet_id}: offline reserve {balance} fen, but its devices hold "
                            f"{want - held[account_id]} and {held[account_id]} awaits settlement")
    return problems


def tbs_digest(message: Envelope) -> bytes:
    """SHA-256 of a COSE_Sign1's Sig_structure: what an ES256 signature signs."""
    return message.to_be_signed()


# --- reading uploads (no trust yet) -----------------------------------------------------------------


@dataclass(slots=True)
class Record:
    """One signed payment from a log, parsed — or the reason it could not be.

    Read in another process (:func:`read_uploads`), records cross over in columns with their upload
    (:meth:`Upload.__reduce__`), without their ``message`` (see :meth:`envelope_message`): fewer
    objects to pickle and rebuild."""

    envelope: bytes
    index: int
    message: Envelope | None = None
    payment: Payment | None = None
    hash: bytes = b""
    error: str = ""
    alg: int = 0  # the envelope's COSE alg (when it parsed)
    authentic: bool | None = None  # None: not checked (yet)
    endorsed_by: Upload | None = None  # its payer's export vouches for it (settings: endorsed)

    def envelope_message(self) -> Envelope:
        """The parsed COSE_Sign1 (parsed again if the record came from another process). Only for records
        that parsed (``payment`` is not None)."""
        return self.message if self.message is not None else open_envelope(self.envelope)


Columns = tuple[list[bytes], list[Payment | None], list[bytes], list[str], list[int], list[bool | None]]
"""Records as they cross between processes: envelopes, payments, hashes, errors, algs, authentic flags
(a record's index is its position)."""


def _columns(records: list[Record]) -> Columns:
    return ([r.envelope for r in records], [r.payment for r in records], [r.hash for r in records],
            [r.error for r in records], [r.alg for r in records], [r.authentic for r in records])


def _from_columns(columns: Columns) -> list[Record]:
    envelopes, payments, hashes, errors, algs, authentic = columns
    return [Record(envelope, index, None, payment, digest, error, alg, ok) for index, (envelope, payment, digest, error,
            alg, ok) in enumerate(zip(envelopes, payments, hashes, errors, algs, authentic, strict=True))]


@dataclass
class Upload:
    """One device's log export, read but not yet trusted.

    ``signed`` is what checking the export's own signature needs — (SHA-256 of its Sig_structure, the
    signature) — rather than the export's COSE_Sign1, which holds the whole export a second time.
    Pickled (:func:`read_uploads`), its ``export`` crosses over without the raw ``payments`` and
    ``receipts`` lists (they are in :attr:`payments` and :attr:`receipts`, parsed), and its records in
    columns (:data:`Columns`)."""

    device_id: str
    export_hash: bytes
    export: LogExport
    signed: tuple[bytes, bytes]
    payments: list[Record]
    receipts: list[Record]
    export_ok: bool | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        export = dataclasses.replace(self.export, payments=[], receipts=[])
        return _upload, (self.device_id, self.export_hash, export, self.signed, _columns(self.payments),
                         _columns(self.receipts), self.export_ok)


def _upload(device_id: str, export_hash: bytes, export: LogExport, signed: tuple[bytes, bytes], payments: Columns,
            receipts: Columns, export_ok: bool | None) -> Upload:
    return Upload(device_id, export_hash, export, signed, _from_columns(payments), _from_columns(receipts), export_ok)


Parsed = tuple[Envelope | None, Payment | None, bytes, str, bytes]
"""An envelope taken apart: (message, payment, payment hash, error, the envelope)."""


def _parse(envelope: bytes) -> Parsed:
    try:
        message = open_envelope(envelope)
        payment = parse_payment(message.payload)
    except OfflineFormatError as exc:
        return None, None, b"", exc.detail, envelope
    return message, payment, record_hash(message.payload), "", envelope


def _records(envelopes: list[bytes], cache: dict[bytes, Parsed] | None) -> list[Record]:
    records = []
    for index, envelope in enumerate(envelopes):
        parsed = cache.get(envelope) if cache is not None else None
        if parsed is None:
            parsed = _parse(envelope)
            if cache is not None:
                cache[envelope] = parsed
        message, payment, digest, error, first = parsed
        # ``first``: the same bytes object on both sides of a payment, so that it pickles once.
        records.append(Record(first, index, message, payment, digest, error, message.alg if message is not None else 0))
    return records


def read_upload(device_id: str, blob: bytes, cache: dict[bytes, Parsed] | None = None) -> Upload:
    """Take a device's signed log export apart.

    Args:
        cache: shared by the uploads of one batch, so that a payment met on both sides (the same
            envelope in its payer's and its payee's log) is parsed once.
    Raises:
        OfflineFormatError: not a signed export (malformed entries inside are kept, as records with an error).
        InvalidDeviceSignature: the export names another device.
    """
    message = open_envelope(blob)
    export = parse_export(message.payload)
    if export.device_id != device_id:
        raise InvalidDeviceSignature(f"the export is device {export.device_id}'s, not {device_id}'s",
                                     ["export-for-another-device"])
    return Upload(device_id, record_hash(message.payload), export, (tbs_digest(message), message.signature),
                  _records(export.payments, cache), _records(export.receipts, cache))


def read_uploads(exports: Sequence[tuple[str, bytes]]) -> list[Upload]:
    """:func:`read_upload` for a batch of ``(device_id, export)`` (a payment in both its payer's and its payee's
    log is parsed once). Pure: a worker process can run it (``PoolVerifier.submit``); its result pickles
    compactly (see :class:`Record`, :class:`Upload`).

    Raises:
        OfflineFormatError, InvalidDeviceSignature: as :func:`read_upload`, for the first export that fails.
    """
    cache: dict[bytes, Parsed] = {}
    return [read_upload(device_id, blob, cache) for device_id, blob in exports]


def _own_payments(uploads: Sequence[Upload], mode: str) -> dict[bytes, Upload]:
    """``endorsed`` mode: the payments inside their own payer's export in this batch, by hash."""
    own: dict[bytes, Upload] = {}
    if mode == "endorsed":
        for upload in uploads:
            for record in upload.payments:
                if record.payment is not None and record.payment.payer == upload.device_id:
                    own.setdefault(record.hash, upload)
    return own


def hashes_to_check(uploads: Sequence[Upload], mode: str) -> list[bytes]:
    """The payment hashes :func:`plan_checks` needs to know about (reconciled already or not): every parsed
    record's, except in ``endorsed`` mode the ES256 ones an export of the batch vouches for (reconciled
    already or not, they need no check of their own, and the rules go by the recorded rows anyway)."""
    own = _own_payments(uploads, mode)
    return sorted({record.hash for upload in uploads for records in (upload.payments, upload.receipts)
                   for record in records
                   if record.payment is not None and (record.hash not in own or record.alg != ES256)})


def plan_checks(uploads: Sequence[Upload], points: dict[str, bytes], known: set[bytes],
                mode: str) -> tuple[list[Job], list[list[Record | Upload]]]:
    """The signatures to verify, each once: every export's, and every payment's not already reconciled
    (``known``: those of :func:`hashes_to_check` already recorded) — except, in ``endorsed`` mode, payments
    whose payer's own export in this batch holds the same payload (that export's signature vouches for them,
    on either side).

    Args:
        points: public points of the devices concerned (uploaders and payers of receipts).
    Returns:
        (jobs, targets): ``targets[i]`` are the uploads and records that ``jobs[i]`` decides.
    """
    jobs: list[Job] = []
    targets: list[list[Record | Upload]] = []
    index: dict[Job, int] = {}

    def add(job: Job, target: Record | Upload) -> None:
        position = index.get(job)
        if position is None:
            index[job] = position = len(jobs)
            jobs.append(job)
            targets.append([])
        targets[position].append(target)

    own = _own_payments(uploads, mode)
    for upload in uploads:
        point = points.get(upload.device_id, b"")
        add((point, *upload.signed), upload)
        for records in (upload.payments, upload.receipts):
            for record in records:
                if record.payment is None:
                    continue
                if record.hash in known:
                    record.authentic = True
                    continue
                payer_point = points.get(record.payment.payer)
                if payer_point is None or record.alg != ES256:
                    record.authentic = False if payer_point is not None else None
                    continue
                endorser = own.get(record.hash)
                if endorser is not None:  # its payer's export in this batch vouches for the same payload
                    record.endorsed_by = endorser
                    continue
                message = record.envelope_message()
                add((payer_point, tbs_digest(message), message.signature), record)
    return jobs, targets


def apply_checks(uploads: Sequence[Upload], targets: list[list[Record | Upload]], results: Sequence[bool]) -> None:
    for group, ok in zip(targets, results, strict=True):
        for target in group:
            if isinstance(target, Upload):
                target.export_ok = ok
            else:
                target.authentic = ok
    for upload in uploads:
        for records in (upload.payments, upload.receipts):
            for record in records:
                if record.endorsed_by is not None:
                    record.authentic = bool(record.endorsed_by.export_ok)
                    record.endorsed_by = None  # applied: no reference cycle left (an upload holds its records)


# --- reports -------------------------------------------------------------------------------------


@dataclass
class SideCounts:
    """Every record received is exactly one of new, known (reconciled before) or invalid."""

    received: int = 0
    new: int = 0
    known: int = 0
    posted: int = 0
    awaiting: int = 0
    held: int = 0
    invalid: int = 0


@dataclass
class Report:
    sync_id: str
    device_id: str
    export_hash: bytes
    counter: int
    rx: int
    payments: SideCounts = field(default_factory=SideCounts)
    receipts: SideCounts = field(default_factory=SideCounts)
    posted_fen: int = 0
    held_fen: int = 0
    discrepancies: list[dict[str, Any]] = field(default_factory=list)

    def document(self, device: dict[str, Any]) -> dict[str, Any]:
        def side(counts: SideCounts, awaiting: str) -> dict[str, int]:
            return {"received": counts.received, "new": counts.new, "known": counts.known, "posted": counts.posted,
                    awaiting: counts.awaiting, "held": counts.held, "invalid": counts.invalid}

        return {
            "sync_id": self.sync_id, "device_id": self.device_id, "export_hash": self.export_hash.hex(),
            "replayed": False, "counter": self.counter, "rx": self.rx,
            "payments": side(self.payments, "awaiting_payee"), "receipts": side(self.receipts, "awaiting_payer"),
            "posted_fen": self.posted_fen, "held_fen": self.held_fen, "discrepancies": self.discrepancies,
            "device": {"status": device["status"], "chain_counter": int(device["chain_counter"]),
                       "spent_fen": int(device["spent_fen"]),
                       "outstanding_fen": int(device["issued_fen"]) - int(device["spent_fen"])
                       - int(device["returned_fen"])},
        }


# --- the rules, inside one transaction ----------------------------------------------------------------

PAYMENT_COLUMNS = ("payment_hash", "payer_device", "counter", "payee_device", "amount", "ts", "prev", "envelope",
                   "status", "payer_seen", "payee_seen", "in_budget", "discrepancy_id", "entry_id", "first_seen_at",
                   "posted_at")
"""The columns of a new ``offline_payments`` row."""

DEVICE_FIELDS = ("status", "status_reason", "stopped_at_ms", "spent_fen", "expired_fen", "chain_counter",
                 "chain_hash", "rx_synced", "last_sync_at")


class Reconciliation:
    """The state of one batch of uploads inside its transaction (see :func:`reconcile_in`)."""

    def __init__(self, tx: Tx, settings: OfflineSettings, actor: str, limits: WalletLimits = default_limits) -> None:
        self.tx = tx
        self.settings = settings
        self.actor = actor
        self.credits = PayeeCredits(tx, limits)  # payees' room under their tier's balance cap (gateway.offline.caps)
        self.now_iso = clock.now_iso()
        self.now_ms = int(clock.now().timestamp() * 1000)
        self.devices: dict[str, dict[str, Any]] = {}
        self.touched_devices: set[str] = set()
        self.wallet_status: dict[str, str] = {}
        self.reserves: dict[str, int] = {}
        self.rows: dict[bytes, dict[str, Any]] = {}  # payments known or made in this batch, by hash
        self.new_rows: dict[bytes, dict[str, Any]] = {}
        self.changes: dict[bytes, dict[str, Any]] = defaultdict(dict)  # existing rows: changed fields
        self.counters: dict[str, dict[int, set[bytes]]] = defaultdict(lambda: defaultdict(set))
        self.by_payee: dict[str, set[bytes]] = defaultdict(set)
        self.posts: list[tuple[str, str, str, bytes, int]] = []  # (sync, payer wallet, payee wallet, hash, amount)
        self.discrepancies: list[tuple[Any, ...]] = []
        self.flag_ids: dict[str, str] = {}
        self.auto_resolved: list[str] = []
        self.hold_kinds: dict[str, str] = {}
        self.load_updates: list[tuple[int, int, str, int]] = []
        self.report: Report | None = None
        self.sync_id = ""

    # --- loading state ---------------------------------------------------------------------------

    def load(self, uploads: Sequence[Upload]) -> None:
        tx = self.tx
        # The payments already recorded are looked up by payer and counter, one device at a time
        # (:meth:`_load_counters`): a recorded row with a record's hash has the record's payer and counter.
        payments = [record.payment for upload in uploads for record in upload.payments if record.payment is not None]
        receipts = [record.payment for upload in uploads for record in upload.receipts if record.payment is not None]
        payers = {payment.payer for payment in receipts}
        ids = ({upload.device_id for upload in uploads} | payers | {payment.payer for payment in payments}
               | {payment.payee for payment in payments} | {payment.payee for payment in receipts})
        # Locks in one global order (every "device:" name sorts before every "wallet:" name).
        for device_id in sorted({u.device_id for u in uploads} | payers):
            tx.lock(f"device:{device_id}")
        for row in select_in(tx, "SELECT * FROM devices WHERE device_id IN ({in})", sorted(ids)):
            device = dict(row)
            device["chain_hash"] = bytes(device["chain_hash"])
            self.devices[device["device_id"]] = device
        wallets = sorted({d["wallet_id"] for d in self.devices.values()})
        for wallet_id in wallets:
            tx.lock(f"wallet:{wallet_id}")
        for row in select_in(tx, "SELECT wallet_id, status FROM wallets WHERE wallet_id IN ({in})", wallets):
            self.wallet_status[row["wallet_id"]] = row["status"]
        self.credits.read(wallets)

    def _remember(self, row: dict[str, Any]) -> None:
        row["payment_hash"] = digest = bytes(row["payment_hash"])
        self.rows[digest] = row
        self.counters[row["payer_device"]][int(row["counter"])].add(digest)
        self.by_payee[row["payee_device"]].add(digest)

    def _load_counters(self, payer: str, counters: Sequence[int]) -> None:
        """Every recorded payment of ``payer`` at these counters (to find counters used twice)."""
        wanted = sorted(set(counters))
        if not wanted:
            return
        columns = ("SELECT payment_hash, payer_device, counter, payee_device, amount, ts, status, payer_seen, "
                   "payee_seen, in_budget, discrepancy_id FROM offline_payments WHERE payer_device = ? AND ")
        if wanted[-1] - wanted[0] < 2 * len(wanted):  # dense (a log's counters): one range, not a list
            rows = self.tx.fetchall(columns + "counter BETWEEN ? AND ?", (payer, wanted[0], wanted[-1]))
        else:
            rows = select_in(self.tx, columns + "counter IN ({in})", wanted, (payer,))
        wanted_set = set(wanted)
        for row in rows:
            if int(row["counter"]) in wanted_set and bytes(row["payment_hash"]) not in self.rows:
                self._remember(dict(row))

    def _reserve(self, wallet_id: str) -> int:
        if wallet_id not in self.reserves:
            row = self.tx.fetchone("SELECT balance FROM accounts WHERE account_id = ?", (reserve_account(wallet_id),))
            self.reserves[wallet_id] = int(row["balance"]) if row else 0
        return self.reserves[wallet_id]

    # --- findings ------------------------------------------------------------------------------

    def flag(self, kind: str, key: str, device_id: str | None, evidence: dict[str, Any], amount: int = 0,
             payment_hash: bytes | None = None) -> str:
        """Raise a discrepancy once (``key`` dedupes it across syncs). Returns its id."""
        dedupe = f"{kind}:{key}"
        if dedupe in self.flag_ids:
            return self.flag_ids[dedupe]
        existing = self.tx.fetchone("SELECT discrepancy_id FROM discrepancies WHERE dedupe_key = ?", (dedupe,))
        if existing is not None:
            self.flag_ids[dedupe] = str(existing["discrepancy_id"])
            return self.flag_ids[dedupe]
        discrepancy_id = "d_" + secrets.token_hex(12)
        self.flag_ids[dedupe] = discrepancy_id
        self.hold_kinds[discrepancy_id] = kind
        self.discrepancies.append((discrepancy_id, dedupe, kind, device_id, payment_hash, amount,
                                   json.dumps(evidence, sort_keys=True, default=_json_default), "open",
                                   self.sync_id, self.now_iso))
        if self.report is not None:
            self.report.discrepancies.append({"discrepancy_id": discrepancy_id, "kind": kind, "amount_fen": amount,
                                              "device_id": device_id,
                                              "payment_hash": payment_hash.hex() if payment_hash else None})
        return discrepancy_id

    def _set(self, digest: bytes, **fields: Any) -> None:
        self.rows[digest].update(fields)  # a new row is the same dict in new_rows
        if digest not in self.new_rows:
            self.changes[digest].update(fields)

    def _hold(self, digest: bytes, kind: str, reasons: list[str], evidence: dict[str, Any]) -> str:
        row = self.rows[digest]
        discrepancy_id = self.flag(kind, digest.hex(), row["payer_device"],
                                   {"reasons": reasons, "payer": row["payer_device"], "payee": row["payee_device"],
                                    "counter": int(row["counter"]), "ts": int(row["ts"]), **evidence},
                                   int(row["amount"]), digest)
        self._set(digest, status="held", discrepancy_id=discrepancy_id)
        return discrepancy_id

    def _freeze(self, device_id: str, reason: str) -> None:
        device = self.devices[device_id]
        if device["status"] == "active":
            device.update(status="frozen", status_reason=reason, stopped_at_ms=self.now_ms)
            self.touched_devices.add(device_id)

    def _post(self, digest: bytes, payee_seen: bool = False) -> bool:
        """Post a matched payment now, or hold it if its payee's wallet cannot receive or the reserve is short.
        ``payee_seen``: its payee's record has just arrived (set on its row either way)."""
        row = self.rows[digest]
        devices = self.devices
        payer, payee = devices.get(row["payer_device"]), devices.get(row["payee_device"])
        if payer is None or payee is None:
            if payee_seen:
                self._set(digest, payee_seen=1)
            return False
        amount = int(row["amount"])
        payer_wallet, payee_wallet = payer["wallet_id"], payee["wallet_id"]
        reserve = self.reserves.get(payer_wallet)
        if reserve is None:
            reserve = self._reserve(payer_wallet)
        active = self.wallet_status.get(payee_wallet) == "active"
        if not active or reserve < amount or not self.credits.take(payee_wallet, amount):
            if payee_seen:
                self._set(digest, payee_seen=1)
            if not active:
                self._hold(digest, "payee-wallet-not-active", ["payee-wallet-not-active"],
                           {"payee_wallet": payee_wallet})
            elif reserve < amount:
                self._hold(digest, "overspent", ["reserve-short"], {"reserve_fen": reserve})
            else:  # offline value is never refused nor lost: held until the payee's wallet has room
                self._hold(digest, "payee-balance-cap", ["balance-cap-exceeded"],
                           {"payee_wallet": payee_wallet, "balance_fen": self.credits.balance(payee_wallet),
                            "cap_fen": self.credits.cap(payee_wallet)})
            return False
        self.reserves[payer_wallet] = reserve - amount
        self.posts.append((self.sync_id, payer_wallet, payee_wallet, digest, amount))
        row["status"], row["posted_at"] = "posted", self.now_iso  # a new row is the same dict in new_rows
        if payee_seen:
            row["payee_seen"] = 1
        if digest not in self.new_rows:
            changed = self.changes[digest]
            changed["status"], changed["posted_at"] = "posted", self.now_iso
            if payee_seen:
                changed["payee_seen"] = 1
        if self.report is not None:
            self.report.posted_fen += amount
        return True

    # --- the payer's side --------------------------------------------------------------------------

    def payer_side(self, upload: Upload, report: Report) -> None:
        device = self.devices[upload.device_id]
        counts = report.payments
        self._loads(upload, device)
        device_id = upload.device_id
        entries: list[Record] = []
        counts.received += len(upload.payments)
        for record in upload.payments:
            payment = record.payment
            if payment is None or payment.payer != device_id or payment.payee == device_id:
                counts.invalid += 1
                self._malformed(upload, record, "payments", record.error or "not a payment by this device to another")
                continue
            entries.append(record)
        counters = [r.payment.counter for r in entries]  # type: ignore[union-attr]
        if counters != sorted(counters):  # in counter order, then log order (the sort is stable)
            entries.sort(key=lambda r: r.payment.counter)  # type: ignore[union-attr]
        head = int(device["chain_counter"])
        self._load_counters(device_id, counters)
        previous_counter = head
        previous_hashes: set[bytes] | None = {device["chain_hash"]} if device["chain_hash"] else None
        last_hash = device["chain_hash"]
        new_payments = 0
        # Fixed for the whole log (_loads, above, has counted the vouchers loaded late; only spent_fen moves).
        limits = (int(device["cert_exp"]), int(device["cap_per_payment"]), int(device["cap_payments_per_sync"]),
                  int(device["issued_fen"]), int(device["expired_fen"]))
        rows = self.rows
        for record in entries:
            payment, digest = record.payment, record.hash
            assert payment is not None
            known = rows.get(digest)
            if known is not None and known["payer_seen"]:
                counts.known += 1
            else:
                new_payments += self._payer_record(upload, device, record, known, limits, head, previous_counter,
                                                   previous_hashes, new_payments, counts)
            if payment.counter > previous_counter:
                previous_counter, previous_hashes = payment.counter, {digest}
            elif payment.counter == previous_counter and previous_hashes is not None:
                previous_hashes.add(digest)
            if payment.counter >= previous_counter:
                last_hash = digest
        if previous_counter > head:
            device["chain_counter"], device["chain_hash"] = previous_counter, last_hash
        if upload.export.counter > max(previous_counter, head):
            missing = (max(previous_counter, head) + 1, upload.export.counter)
            self.flag("counter-gap", f"{upload.device_id}:{missing[0]}-{missing[1]}", upload.device_id,
                      {"missing_from": missing[0], "missing_to": missing[1], "where": "end of log"})
            device["chain_counter"], device["chain_hash"] = upload.export.counter, b""
        self.touched_devices.add(upload.device_id)

    def _payer_record(self, upload: Upload, device: dict[str, Any], record: Record, known: dict[str, Any] | None,
                      limits: tuple[int, int, int, int, int], head: int, previous_counter: int,
                      previous_hashes: set[bytes] | None, new_payments: int, counts: SideCounts) -> int:
        """Apply every rule to one of the device's own payments. Returns 1 if it counts as a new payment.

        Args:
            known: its recorded row, if any.
            limits: the device's cert_exp, cap_per_payment, cap_payments_per_sync, issued_fen, expired_fen.
        """
        payment, digest = record.payment, record.hash
        assert payment is not None
        if not record.authentic:
            counts.invalid += 1
            self.flag("invalid-signature", hashlib.sha256(record.envelope).hexdigest(), upload.device_id,
                      {"side": "payer", "counter": payment.counter, "payee": payment.payee, "amount": payment.amount,
                       "envelope": record.envelope.hex()}, payment.amount)
            return 0
        reasons: list[str] = []
        evidence: dict[str, Any] = {}
        same_counter = self.counters[payment.payer][payment.counter]
        others = same_counter - {digest} if same_counter and same_counter != {digest} else NONE
        if others:
            reasons.append("double-spend")
            evidence["conflicting"] = sorted(h.hex() for h in others)
        elif payment.counter <= head:
            reasons.append("counter-gap")
            evidence["late"] = f"counter {payment.counter} arrived after the log had passed it"
        elif payment.counter > previous_counter + 1:
            reasons.append("counter-gap")
            evidence.update(missing_from=previous_counter + 1, missing_to=payment.counter - 1)
        elif previous_hashes is not None and payment.counter == previous_counter + 1 \
                and payment.prev not in previous_hashes:
            reasons.append("broken-chain")
            evidence.update(prev=payment.prev.hex(), expected=sorted(h.hex() for h in previous_hashes))
        status = device["status"]
        if status != "active":
            stopped = device["stopped_at_ms"]
            if status == "frozen":
                reasons.append("device-frozen")
            elif status == "revoked" and stopped is not None and payment.ts > int(stopped):
                reasons.append("device-revoked")
            elif status == "unloaded" and payment.counter > int(device["final_counter"] or 0):
                reasons.append("device-unloaded")
        cert_exp, cap_per_payment, cap_payments_per_sync, issued, expired = limits
        if payment.ts > cert_exp:
            reasons.append("certificate-expired")
        payee = self.devices.get(payment.payee)
        if payee is None:
            reasons.append("unknown-device")
            evidence["unknown_payee"] = payment.payee
        elif self.wallet_status.get(payee["wallet_id"]) != "active":
            reasons.append("payee-wallet-not-active")
        amount = payment.amount
        if amount > cap_per_payment:
            reasons.append("over-payment-cap")
            evidence["cap_fen"] = cap_per_payment
        if new_payments + 1 > cap_payments_per_sync:
            reasons.append("too-many-payments")
            evidence["allowed"] = cap_payments_per_sync
        spent, returned = int(device["spent_fen"]), int(device["returned_fen"])
        # The budget is what was loaded and is still on the device: an unloaded device's unspent value went
        # back to its wallet (returned_fen), so a payment it signed after its final statement is held outside
        # the budget whatever its amount: rejecting it gives nothing back, and outstanding never goes negative.
        after_unload = "device-unloaded" in reasons
        in_budget = not after_unload and amount <= issued - expired - spent - returned
        if in_budget:
            device["spent_fen"] = spent + amount
        elif after_unload:
            evidence.update(outside_budget=True, returned_fen=returned)
        elif amount <= issued - spent - returned:
            reasons.append("voucher-expired")
        else:
            reasons.append("overspent")
            evidence.update(loaded_fen=issued, spent_fen=spent)
        counts.new += 1
        if known is None:
            row = self._add_row(record, payment, 1, 0, int(in_budget))
            if not reasons:
                row["status"] = "awaiting_payee"  # a new row: nothing to post yet (its payee's record is not in)
                counts.awaiting += 1
                return 1
        else:
            self._set(digest, payer_seen=1, in_budget=int(in_budget))
        if reasons:
            kind = min(reasons, key=HOLD_ORDER.index)
            discrepancy_id = self._hold(digest, kind, reasons, evidence)
            counts.held += 1
            if self.report is not None:
                self.report.held_fen += payment.amount
            if "double-spend" in reasons:
                self._freeze(payment.payer, f"double spend at counter {payment.counter}")
                for other in others:  # the other record(s) with this counter wait for the same decision
                    if self.rows[other]["status"] in ("awaiting_payee", "awaiting_payer"):
                        self._set(other, status="held", discrepancy_id=discrepancy_id)
        elif known is not None and known["payee_seen"]:
            counts.posted += int(self._post(digest))
        else:
            self.rows[digest]["status"] = "awaiting_payee"
            if known is not None:
                self.changes[digest]["status"] = "awaiting_payee"
            counts.awaiting += 1
        return 1

    def _add_row(self, record: Record, payment: Payment, payer_seen: int = 0, payee_seen: int = 0,
                 in_budget: int = 0) -> dict[str, Any]:
        """A new payment's row: its keys are :data:`PAYMENT_COLUMNS`, in that order (how :meth:`write` inserts it)."""
        row = {"payment_hash": record.hash, "payer_device": payment.payer, "counter": payment.counter,
               "payee_device": payment.payee, "amount": payment.amount, "ts": payment.ts, "prev": payment.prev,
               "envelope": record.envelope, "status": "awaiting_payer", "payer_seen": payer_seen,
               "payee_seen": payee_seen, "in_budget": in_budget, "discrepancy_id": None, "entry_id": None,
               "first_seen_at": self.now_iso, "posted_at": None}
        digest = record.hash
        self.rows[digest] = self.new_rows[digest] = row
        self.counters[payment.payer][payment.counter].add(digest)
        self.by_payee[payment.payee].add(digest)
        return row

    def _loads(self, upload: Upload, device: dict[str, Any]) -> None:
        if upload.export.certificate != bytes(device["certificate"]):
            presented = upload.export.certificate
            self.flag("invalid-certificate", f"{upload.device_id}:{hashlib.sha256(presented).hexdigest()}",
                      upload.device_id, {"presented": presented.hex()})
        if not upload.export.loads:
            return
        issued = {int(row["load_seq"]): row for row in self.tx.fetchall(
            "SELECT load_seq, amount, exp, loaded_at, expired_load FROM device_loads WHERE device_id = ?",
            (upload.device_id,))}
        for load in upload.export.loads:
            row = issued.get(load.load_seq)
            if row is None or int(row["amount"]) != load.amount or int(row["exp"]) != load.exp:
                self.flag("invalid-voucher", f"{upload.device_id}:{load.load_seq}:{load.amount}:{load.exp}",
                          upload.device_id, {"load_seq": load.load_seq, "amount": load.amount, "exp": load.exp,
                                             "loaded_at": load.at}, load.amount)
                continue
            expired = int(row["expired_load"]) or int(load.at > int(row["exp"]))
            if expired and not int(row["expired_load"]):
                device["expired_fen"] = int(device["expired_fen"]) + load.amount
                self.flag("voucher-expired", f"{upload.device_id}:load:{load.load_seq}", upload.device_id,
                          {"load_seq": load.load_seq, "exp": load.exp, "loaded_at": load.at}, load.amount)
            if row["loaded_at"] is None or expired != int(row["expired_load"]):
                self.load_updates.append((load.at, expired, upload.device_id, load.load_seq))

    def _malformed(self, upload: Upload, record: Record, where: str, error: str) -> None:
        # Keyed by device too: the same bad bytes in another device's log are that device's finding.
        self.flag("malformed-record", f"{upload.device_id}:{hashlib.sha256(record.envelope).hexdigest()}",
                  upload.device_id,
                  {"side": where, "index": record.index, "error": error[:300], "record": record.envelope[:4096].hex()})

    # --- the payee's side ----------------------------------------------------------------------------

    def payee_side(self, upload: Upload, report: Report) -> None:
        counts = report.receipts
        device = self.devices[upload.device_id]
        rows = self.rows
        wanted: dict[str, list[int]] = defaultdict(list)
        for record in upload.receipts:
            if record.payment is not None and record.hash not in rows:
                wanted[record.payment.payer].append(record.payment.counter)
        for payer_id, counters in wanted.items():
            self._load_counters(payer_id, counters)
        device_id = upload.device_id
        counts.received += len(upload.receipts)
        for record in upload.receipts:
            payment, digest = record.payment, record.hash
            if payment is None or payment.payee != device_id:
                counts.invalid += 1
                self._malformed(upload, record, "receipts", record.error or "not a payment to this device")
                continue
            known = rows.get(digest)
            if known is not None:
                self._known_receipt(digest, known, counts)
                continue
            payer = self.devices.get(payment.payer)
            if payer is None:
                counts.invalid += 1
                self.flag("unknown-device", f"{upload.device_id}:{hashlib.sha256(record.envelope).hexdigest()}",
                          upload.device_id,
                          {"side": "payee", "unknown_payer": payment.payer, "counter": payment.counter,
                           "amount": payment.amount, "envelope": record.envelope.hex()}, payment.amount)
                continue
            if not record.authentic:
                counts.invalid += 1
                self.flag("invalid-signature", hashlib.sha256(record.envelope).hexdigest(), payment.payer,
                          {"side": "payee", "reported_by": upload.device_id, "counter": payment.counter,
                           "amount": payment.amount, "envelope": record.envelope.hex()}, payment.amount)
                continue
            counts.new += 1
            others = self.counters[payment.payer][payment.counter] - {digest}
            self._add_row(record, payment, 0, 1)
            if others:
                counts.held += 1
                discrepancy_id = self._hold(digest, "double-spend", ["double-spend"],
                                            {"conflicting": sorted(h.hex() for h in others),
                                             "reported_by": upload.device_id})
                self._freeze(payment.payer, f"double spend at counter {payment.counter}")
                for other in others:
                    if self.rows[other]["status"] in ("awaiting_payee", "awaiting_payer"):
                        self._set(other, status="held", discrepancy_id=discrepancy_id)
            elif payment.counter <= int(payer["chain_counter"]):
                counts.held += 1
                self._hold(digest, "unmatched-payee-record", ["unmatched-payee-record"],
                           {"payer_chain_counter": int(payer["chain_counter"]), "reported_by": upload.device_id})
            else:
                counts.awaiting += 1
        device["rx_synced"] = max(int(device["rx_synced"]), upload.export.rx)
        self.touched_devices.add(upload.device_id)

    def _known_receipt(self, digest: bytes, row: dict[str, Any], counts: SideCounts) -> None:
        if row["payee_seen"]:
            counts.known += 1
            return
        counts.new += 1
        if row["status"] == "awaiting_payee":
            counts.posted += int(self._post(digest, payee_seen=True))
            return
        discrepancy_id = row["discrepancy_id"]
        if row["status"] == "held" and self.hold_kind(discrepancy_id) in AUTO_RESOLVED:
            if self._post(digest, payee_seen=True):
                counts.posted += 1
                self.auto_resolved.append(discrepancy_id)
            return
        self._set(digest, payee_seen=1)
        counts.held += int(row["status"] == "held")

    def hold_kind(self, discrepancy_id: str | None) -> str:
        if discrepancy_id is None:
            return ""
        if discrepancy_id not in self.hold_kinds:
            row = self.tx.fetchone("SELECT kind, status FROM discrepancies WHERE discrepancy_id = ?", (discrepancy_id,))
            self.hold_kinds[discrepancy_id] = str(row["kind"]) if row and row["status"] == "open" else ""
        return self.hold_kinds[discrepancy_id]

    def unmatched(self, upload: Upload) -> None:
        """Payments to this device dated well before its export that its log does not hold."""
        cutoff = upload.export.ts - self.settings.clock_skew_seconds * 1000
        rows = self.tx.fetchall(
            "SELECT payment_hash, payer_device, counter, payee_device, amount, ts, status, payer_seen, payee_seen, "
            "in_budget, discrepancy_id FROM offline_payments WHERE payee_device = ? AND status = 'awaiting_payee' "
            "AND ts < ?", (upload.device_id, cutoff))
        for row in rows:
            if bytes(row["payment_hash"]) not in self.rows:
                self._remember(dict(row))
        known = self.rows
        for digest in sorted(digest for digest in self.by_payee[upload.device_id]
                             if known[digest]["status"] == "awaiting_payee" and int(known[digest]["ts"]) < cutoff):
            self._hold(digest, "unmatched-payer-record", ["unmatched-payer-record"],
                       {"payee_export_ts": upload.export.ts})

    # --- writing ----------------------------------------------------------------------------------

    def entries(self) -> list[Transfer]:
        """The journal entries of the payments posted: one per (sync, payer's wallet, payee's wallet), from
        the payer's offline reserve to the payee's wallet, for the sum of its payments. Each payment's row
        gets the entry's id (``entry_id``), so every payment leads to its entry and every entry to its
        payments.

        An entry's id derives from the payments it posts — one payment: :func:`offline_entry_id` of its
        hash (reference: the hash); several: of the hash of their sorted hashes (reference: the sync) —
        so the same payments can never post twice.
        """
        groups: dict[tuple[str, str, str], list[bytes]] = defaultdict(list)
        amounts: dict[tuple[str, str, str], int] = defaultdict(int)
        for sync_id, payer_wallet, payee_wallet, digest, amount in self.posts:
            key = (sync_id, payer_wallet, payee_wallet)
            groups[key].append(digest)
            amounts[key] += amount
        transfers = []
        for key, digests in groups.items():
            sync_id, payer_wallet, payee_wallet = key
            rows = self.rows
            if len(digests) == 1:
                digest, row = digests[0], rows[digests[0]]
                entry_id, reference = offline_entry_id(digest), digest.hex()
                memo = f"offline {row['payer_device']}#{row['counter']} to {row['payee_device']}"
            else:
                digests.sort()
                entry_id, reference = offline_entry_id(hashlib.sha256(b"".join(digests)).digest()), sync_id
                payers = sorted({rows[digest]["payer_device"] for digest in digests})
                payees = sorted({rows[digest]["payee_device"] for digest in digests})
                memo = (f"offline, {len(digests)} payments from "
                        f"{payers[0] if len(payers) == 1 else f'{len(payers)} devices'} to "
                        f"{payees[0] if len(payees) == 1 else f'{len(payees)} devices'}")
            changes, new_rows = self.changes, self.new_rows
            for digest in digests:
                rows[digest]["entry_id"] = entry_id  # a new row is the same dict in new_rows
                if digest not in new_rows:
                    changes[digest]["entry_id"] = entry_id
            transfers.append(Transfer(entry_id, reference, reserve_account(payer_wallet), wallet_account(payee_wallet),
                                      amounts[key], memo))
        return transfers

    def write(self) -> None:
        tx = self.tx
        transfers = self.entries()
        insert_many(tx, "discrepancies", ("discrepancy_id", "dedupe_key", "kind", "device_id", "payment_hash", "amount",
                                          "evidence", "status", "sync_id", "created_at"), self.discrepancies)
        new_rows = self.new_rows
        if new_rows:  # their keys are PAYMENT_COLUMNS in order (_add_row; later changes only set values)
            assert tuple(next(iter(new_rows.values()))) == PAYMENT_COLUMNS
        insert_many(tx, "offline_payments", PAYMENT_COLUMNS,  # in hash order (the first column): index inserts
                    sorted(tuple(row.values()) for row in new_rows.values()))  # close together
        groups: dict[tuple[tuple[str, Any], ...], list[bytes]] = defaultdict(list)
        for digest, fields in self.changes.items():
            groups[tuple(sorted(fields.items()))].append(digest)
        for assignment, digests in groups.items():
            sets = ", ".join(f"{name} = ?" for name, _ in assignment)
            posting = "entry_id" in dict(assignment)  # only a payment without an entry may get one
            guard = "entry_id IS NULL AND " if posting else ""
            changed = update_in(tx, f"UPDATE offline_payments SET {sets} WHERE {guard}payment_hash IN ({{in}})",
                                digests, [value for _, value in assignment])
            if posting and changed != len(digests):
                raise LedgerInvariantBroken("an offline payment being posted already has a journal entry")
        post_offline(tx, "offline", transfers, self.actor)
        if self.auto_resolved:
            update_in(tx, "UPDATE discrepancies SET status = 'resolved', resolution = 'matched', resolved_by = ?, "
                          "resolved_at = ?, note = ? WHERE status = 'open' AND discrepancy_id IN ({in})",
                      sorted(set(self.auto_resolved)), ["system", self.now_iso, "the missing record arrived"])
        for at, expired, device_id, load_seq in self.load_updates:
            tx.execute("UPDATE device_loads SET loaded_at = ?, expired_load = ? WHERE device_id = ? AND load_seq = ?",
                       (at, expired, device_id, load_seq))
        for device_id in sorted(self.touched_devices):
            device = self.devices[device_id]
            problem = outstanding_problem(device)
            if problem:  # never written: the whole reconciliation rolls back
                raise LedgerInvariantBroken(problem)
            device["last_sync_at"] = device["updated_at"] = self.now_iso
            tx.execute(
                "UPDATE devices SET " + ", ".join(f"{name} = ?" for name in DEVICE_FIELDS) + ", updated_at = ? "
                "WHERE device_id = ?", [*(device[name] for name in DEVICE_FIELDS), self.now_iso, device_id])


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def record_refused_export(tx: Tx, device_id: str, blob: bytes, reason: str) -> str:
    """Keep a log export whose signature does not verify as a discrepancy (evidence: the export). Returns its id."""
    reconciliation = Reconciliation(tx, OfflineSettings(), "")
    discrepancy_id = reconciliation.flag("invalid-export-signature", hashlib.sha256(blob).hexdigest(), device_id,
                                         {"reason": reason, "export": blob[:65536].hex(), "bytes": len(blob)})
    reconciliation.write()
    return discrepancy_id


def reconcile_in(tx: Tx, uploads: Sequence[Upload], settings: OfflineSettings, actor: str,
                 entries: Sequence[AuditEntry] = (), limits: WalletLimits = default_limits) -> list[dict[str, Any]]:
    """Reconcile checked uploads (:func:`apply_checks` done) in one transaction.

    Uploads whose export signature did not verify must have been refused before. Payers' logs are
    applied before payees' so that a batch holding both sides of a payment posts it at once.

    Args:
        entries: audit entries, one per upload (their ``result`` is filled in here); none in benchmarks.
        limits: wallet tier limits (the payee's balance cap, :mod:`gateway.offline.caps`).
    Returns:
        One report document per upload, in order (a replayed export's stored report, ``replayed: true``).
    """
    reconciliation = Reconciliation(tx, settings, actor, limits)
    reports: list[dict[str, Any] | None] = [None] * len(uploads)
    fresh: list[tuple[int, Upload, Report]] = []
    seen: set[tuple[str, bytes]] = set()
    for device_id in sorted({upload.device_id for upload in uploads}):
        tx.lock(f"device:{device_id}")  # before the replay check: the same export twice at once runs once
    for position, upload in enumerate(uploads):
        if upload.export_ok is not True:
            raise InvalidDeviceSignature(f"the log export of {upload.device_id} is not verified", ["invalid-signature"])
        stored = tx.fetchone("SELECT report FROM device_syncs WHERE device_id = ? AND export_hash = ?",
                             (upload.device_id, upload.export_hash))
        if stored is not None or (upload.device_id, upload.export_hash) in seen:
            reports[position] = {**json.loads(stored["report"]), "replayed": True} if stored is not None else None
            continue
        seen.add((upload.device_id, upload.export_hash))
        fresh.append((position, upload, Report("s_" + secrets.token_hex(12), upload.device_id, upload.export_hash,
                                               upload.export.counter, upload.export.rx)))
    reconciliation.load([upload for _, upload, _ in fresh])
    for _, upload, report in fresh:
        reconciliation.report, reconciliation.sync_id = report, report.sync_id
        reconciliation.payer_side(upload, report)
    for _, upload, report in fresh:
        reconciliation.report, reconciliation.sync_id = report, report.sync_id
        reconciliation.payee_side(upload, report)
    for _, upload, report in fresh:
        reconciliation.report, reconciliation.sync_id = report, report.sync_id
        reconciliation.unmatched(upload)
    reconciliation.write()
    rows = []
    for position, upload, report in fresh:
        document = report.document(reconciliation.devices[upload.device_id])
        reports[position] = document
        rows.append((report.sync_id, upload.device_id, upload.export_hash, json.dumps(document, sort_keys=True),
                     reconciliation.now_iso, actor))
    insert_many(tx, "device_syncs", ("sync_id", "device_id", "export_hash", "report", "created_at", "created_by"), rows)
    for position, upload in enumerate(uploads):  # an export repeated inside the batch: the first one's report
        if reports[position] is None:
            first = next(r for r in reports if r is not None and r["export_hash"] == upload.export_hash.hex())
            reports[position] = {**first, "replayed": True}
    documents = [r for r in reports if r is not None]
    for entry, document in zip(entries, documents, strict=False):
        entry.result = {key: document[key] for key in ("sync_id", "device_id", "export_hash", "replayed", "payments",
                                                       "receipts", "posted_fen", "held_fen")}
        entry.result["discrepancies"] = [d["discrepancy_id"] for d in document["discrepancies"]]
    if entries:
        append(tx, list(entries))
    return documents
