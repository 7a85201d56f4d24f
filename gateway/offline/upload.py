"""Reading a device's log upload, and planning its signature checks (no trust yet, no transaction).

The first stage of reconciliation (:mod:`gateway.offline.reconcile`): :func:`read_upload` takes the
device-signed export apart into :class:`Upload` and its :class:`Record` s; :func:`plan_checks` lists the
signatures to check and :func:`apply_checks` records the results of a
:class:`~gateway.offline.verify.Verifier`. All of it runs outside any transaction, so verification can
run in a process pool and never holds a lock (:func:`read_uploads` can run there too).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.errors import InvalidDeviceSignature, OfflineFormatError
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


def tbs_digest(message: Envelope) -> bytes:
    """SHA-256 of a COSE_Sign1's Sig_structure: what an ES256 signature signs."""
    return message.to_be_signed()


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
