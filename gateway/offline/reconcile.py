"""Reconciliation of hard-wallet logs with the ledger (docs/spec.md §8, docs/device-protocol.md).

A device's log export holds the payments it made (signed by itself, in counter order, each naming
the hash of the one before) and the payments it received. Reconciling it, in three stages:

1. :mod:`gateway.offline.upload` — :func:`~gateway.offline.upload.read_upload` takes the device-signed
   export apart (no trust yet); :func:`~gateway.offline.upload.plan_checks` lists the signatures to check
   and :func:`~gateway.offline.upload.apply_checks` records the results of a
   :class:`~gateway.offline.verify.Verifier` — both outside any transaction, so verification can run in a
   process pool and never holds a lock.
2. :mod:`gateway.offline.rules` — :func:`reconcile_in` (here, the entry point) applies the rules inside one
   write transaction, under the locks of the devices and wallets involved, and writes everything
   set-at-a-time (:mod:`gateway.offline.bulk`).
3. :mod:`gateway.offline.report` — one report per upload, stored with its sync (so the same export
   uploaded again changes nothing and answers the stored report), and the audit entries' results.

The ledger invariants the result keeps: :mod:`gateway.offline.invariants`.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Sequence
from typing import Any

from gateway.audit.chain import AuditEntry, append
from gateway.errors import InvalidDeviceSignature
from gateway.ledger.store import Tx
from gateway.offline.bulk import insert_many
from gateway.offline.caps import WalletLimits, default_limits
from gateway.offline.report import Report
from gateway.offline.rules import Reconciliation
from gateway.offline.settings import OfflineSettings
from gateway.offline.upload import Upload


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
