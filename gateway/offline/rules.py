"""The reconciliation rules: one batch of checked uploads applied inside one write transaction.

:class:`Reconciliation` takes the devices and wallets involved under their locks, applies the rules to
each payer's log and each payee's log (:func:`gateway.offline.reconcile.reconcile_in` drives it), and
writes everything it decided set-at-a-time (:mod:`gateway.offline.bulk`).

A payment is posted — payer's offline reserve → payee's wallet, one journal entry whose id derives
from the payment's hash, so it can never post twice — when it is authentic, passes every rule, and
both its payer's record and its payee's record have arrived. A payment that fails a rule is *held*
and gets a discrepancy (kind, evidence, device, amount) for a supervisor; a record that cannot be a
payment at all (malformed, bad signature, unknown payer) becomes a discrepancy with the record as
evidence. Nothing is dropped, and payments already reconciled change nothing when they come again.

Rules, in the order that names a held payment's discrepancy (every failed rule is in its evidence):
:data:`HOLD_ORDER`; every kind of discrepancy: :data:`KINDS`.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from gateway import clock
from gateway.ledger.journal import LedgerInvariantBroken, reserve_account, wallet_account
from gateway.ledger.store import Tx
from gateway.offline.bulk import Transfer, insert_many, post_offline, select_in, update_in
from gateway.offline.caps import PayeeCredits, WalletLimits, default_limits
from gateway.offline.invariants import offline_entry_id, outstanding_problem
from gateway.offline.report import Report, SideCounts
from gateway.offline.settings import OfflineSettings
from gateway.offline.upload import Record, Upload
from gateway.risk.signals import record_signal_in
from gateway.schemes.offline import Payment

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
        self.frozen: dict[str, str] = {}  # devices frozen by this batch, and why
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
            self.frozen[device_id] = reason

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

    def payees_of(self, device_id: str) -> list[str]:
        """The payee devices of the payments of ``device_id`` this batch knows."""
        return sorted({str(row["payee_device"]) for row in self.rows.values() if row["payer_device"] == device_id})

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
        for discrepancy_id, _, kind, device_id, _, amount, *_ in self.discrepancies:
            record_signal_in(tx, "discrepancy.raised", device_id or "", amount, actor=self.actor,
                             discrepancy_id=discrepancy_id, discrepancy_kind=kind)
        for device_id, reason in self.frozen.items():  # with the payee devices it paid (rule frozen_devices_payee)
            record_signal_in(tx, "device.frozen", device_id, actor=self.actor, reason=reason,
                             wallet_id=self.devices[device_id]["wallet_id"], payees=self.payees_of(device_id))
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
