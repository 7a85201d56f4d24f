"""Hard wallets on the gateway's side: registration, loads, sync, unload, revocation, and the
supervisor's decisions on discrepancies.

Dual control: a load above ``approvals.device_load_threshold_fen`` and every ``honour`` (the bank pays
a held payment, from suspense where the value was never loaded) are requested from
:mod:`gateway.approvals` and carried out by :class:`OfflineApprovals` when a second supervisor
approves. No payment above its payer certificate's per-payment cap is ever honoured.

Every operation that moves money does its checks and its postings in one write transaction under
the locks of the device and the wallets it touches (device locks first, then wallet locks, each in
name order), with its audit entry in the same transaction. HSM signatures (certificates, vouchers,
acknowledgements) are made outside the ledger lock: a certificate before its registration is
written, a voucher after its load commits (its payload is fixed at posting, and a load whose
voucher is missing — a crash in between — is signed on its next read or replay), an acknowledgement
after the sync commits (a replayed sync gets it again).
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from dataclasses import dataclass
from typing import Any

import cbor2

from gateway import clock
from gateway.approvals.workflow import Approvals, execution_entry, needs_approval
from gateway.audit.chain import AuditEntry, append
from gateway.config import ApprovalSettings
from gateway.errors import (
    AlreadyExists,
    Conflict,
    DeviceNotActive,
    DeviceNotFound,
    DeviceSyncRequired,
    DiscrepancyNotFound,
    DiscrepancyNotOpen,
    HonourAboveCap,
    InsufficientFunds,
    InvalidDeviceSignature,
    IssuerNotEndorsed,
    KeyNotFound,
    LimitExceeded,
    NotFound,
    ResolutionRefused,
    ValidationFailed,
    WalletNotActive,
)
from gateway.hsm.profile import HsmProfile
from gateway.keys import KeyDirectory, KeyRecord, Usage, key_for_usage, public_key_pem
from gateway.keys import sign1_with_profile as sign1
from gateway.ledger import journal
from gateway.ledger.store import Database, Row, Tx
from gateway.offline.bulk import Transfer, post_offline, select_in
from gateway.offline.caps import PayeeCredits, wallet_limits
from gateway.offline.invariants import offline_entry_id
from gateway.offline.reconcile import reconcile_in, record_refused_export
from gateway.offline.rules import KINDS
from gateway.offline.settings import OfflineSettings, offline_settings
from gateway.offline.upload import apply_checks, hashes_to_check, plan_checks, read_upload
from gateway.offline.verify import InlineVerifier, Verifier
from gateway.operations import idempotency
from gateway.operations.idempotency import Answer, IdempotentRequest
from gateway.operations.signed import SignedOperation, Stored, ToSign
from gateway.risk.signals import record_signal_in
from gateway.schemes import offline
from gateway.schemes.canonical import map_around
from gateway.signing import Signer
from gateway.wallets.accounts import load_wallet

RESOLUTIONS: dict[str, str] = {
    "post": "post the held payments from the payer's offline reserve (only value within what was loaded)",
    "honour": "pay the payees: from the payer's reserve where the value was loaded, else from bank:suspense "
              "(always through a second supervisor's approval; never above the payer's per-payment cap)",
    "reject": "never post the held payments; value within what was loaded goes back to the payer",
    "acknowledge": "noted; nothing to post (findings that hold no payment)",
}

DAY_MS = 86_400_000


def b64(data: bytes | None) -> str | None:
    return base64.b64encode(data).decode() if data is not None else None


def device_row(tx: Tx, device_id: str) -> Any:
    row = tx.fetchone("SELECT * FROM devices WHERE device_id = ?", (device_id,))
    if row is None:
        raise DeviceNotFound(f"no device {device_id[:64]!r}")
    return row


def _locked_as_certified(tx: Tx, certificate: offline.Certificate) -> None:
    """Lock the certificate's device and wallet, and check that the wallet is still what the certificate
    was signed for: active, at the certificate's tier (a certificate signed outside the transaction)."""
    tx.lock(f"device:{certificate.device_id}")
    tx.lock(f"wallet:{certificate.wallet_id}")
    wallet = load_wallet(tx, certificate.wallet_id)
    if wallet["status"] != "active":
        raise WalletNotActive(f"wallet {certificate.wallet_id} is {wallet['status']}", [f"wallet-{wallet['status']}"])
    if int(wallet["tier"]) != certificate.tier:
        raise ValidationFailed("the wallet's tier changed while the certificate was signed; retry")


def _active(device: Any) -> Any:
    """``device`` (a row) if it is active. Raises DeviceNotActive."""
    if device["status"] != "active":
        raise DeviceNotActive(f"device {device['device_id']} is {device['status']}", [f"device-{device['status']}"])
    return device


def endorsement_chain(tx: Tx, pinned_kid: str, issuer_kid: str) -> list[bytes]:
    """The endorsements (oldest first) from the voucher key ``pinned_kid`` to ``issuer_kid`` (none when they
    are the same key). Each key endorsed at most one successor, so the chain is a walk, at most as long as
    the keys are many.

    Raises:
        IssuerNotEndorsed: the walk does not reach ``issuer_kid``.
    """
    chain: list[bytes] = []
    reached, seen = pinned_kid, {pinned_kid}
    while reached != issuer_kid:
        row = tx.fetchone("SELECT new_key_id, endorsement FROM issuer_endorsements WHERE old_key_id = ?", (reached,))
        if row is None or row["new_key_id"] in seen:
            raise IssuerNotEndorsed(
                f"the device pins voucher key {pinned_kid}; no endorsement leads from it to the voucher key "
                f"{issuer_kid} (a disabled key endorses nothing; an adopted key has no endorsement): provision "
                "the device again")
        chain.append(bytes(row["endorsement"]))
        reached = str(row["new_key_id"])
        seen.add(reached)
    return chain


def device_document(row: Any, issuer_pem: str | None = None) -> dict[str, Any]:
    issued, spent, returned = int(row["issued_fen"]), int(row["spent_fen"]), int(row["returned_fen"])
    return {
        "device_id": row["device_id"], "wallet_id": row["wallet_id"], "model": row["model"],
        "status": row["status"], "status_reason": row["status_reason"], "tier": int(row["tier"]),
        "caps": {"per_payment_fen": int(row["cap_per_payment"]), "balance_fen": int(row["cap_balance"]),
                 "payments_per_sync": int(row["cap_payments_per_sync"])},
        "public_key_pem": offline.pem_from_point(bytes(row["public_key"])),
        "certificate": b64(bytes(row["certificate"])), "kid": row["kid"], "issuer_public_key_pem": issuer_pem,
        "certificate_iat_ms": int(row["cert_iat"]), "certificate_exp_ms": int(row["cert_exp"]),
        "load_seq": int(row["load_seq"]), "issued_fen": issued, "spent_fen": spent, "returned_fen": returned,
        "expired_fen": int(row["expired_fen"]), "outstanding_fen": issued - spent - returned,
        "chain_counter": int(row["chain_counter"]), "rx_synced": int(row["rx_synced"]),
        "last_sync_at": row["last_sync_at"], "created_at": row["created_at"], "updated_at": row["updated_at"],
    }


def load_document(row: Any) -> dict[str, Any]:
    return {"device_id": row["device_id"], "load_seq": int(row["load_seq"]), "amount_fen": int(row["amount"]),
            "expires_at_ms": int(row["exp"]), "entry_id": row["entry_id"], "voucher": b64(bytes(row["voucher"])),
            "kid": row["kid"]}


def discrepancy_document(row: Any, held: list[str] | None = None) -> dict[str, Any]:
    return {
        "discrepancy_id": row["discrepancy_id"], "kind": row["kind"], "description": KINDS.get(row["kind"], ""),
        "status": row["status"], "device_id": row["device_id"],
        "payment_hash": bytes(row["payment_hash"]).hex() if row["payment_hash"] is not None else None,
        "amount_fen": int(row["amount"]), "evidence": json.loads(row["evidence"]), "sync_id": row["sync_id"],
        "created_at": row["created_at"], "resolution": row["resolution"], "note": row["note"],
        "resolved_by": row["resolved_by"], "resolved_at": row["resolved_at"], "held_payments": held or [],
    }


@dataclass
class LoadResult:
    device_id: str
    load_seq: int
    amount: int
    entry_id: str
    exp: int
    """When the voucher expires (epoch ms)."""
    payload: bytes = b""  # the voucher's payload, to sign

    @property
    def reference(self) -> str:
        """What the idempotency record refers to until the voucher is signed."""
        return f"{self.device_id}#{self.load_seq}"


class Devices:
    """The hard-wallet service of one request (cheap to build: it holds references only)."""

    def __init__(self, database: Database, signer: Signer, profile: HsmProfile, settings: Any,
                 keys: KeyDirectory | None = None, verifier: Verifier | None = None,
                 approvals: Approvals | None = None) -> None:
        self.database = database
        self.signer = signer
        self.profile = profile
        self.offline: OfflineSettings = offline_settings(settings)
        self.limits = wallet_limits(settings)  # the payee's tier balance cap applies to offline credits too
        self.keys = keys or KeyDirectory()
        self.verifier = verifier or InlineVerifier()
        self.approvals = approvals if approvals is not None else Approvals(
            getattr(settings, "approvals", None) or ApprovalSettings())
        self.signed_loads = SignedOperation(database, VoucherSigning(self))

    @classmethod
    def of(cls, runtime: Any) -> Devices:
        return cls(runtime.database, runtime.signer_for(Usage.VOUCHER), runtime.profile, runtime.settings,
                   runtime.keys, approvals=runtime.approvals)

    # --- the voucher key -----------------------------------------------------------------------

    async def voucher_key(self) -> KeyRecord:
        key_id = self.offline.key_id
        return await self.database.read(lambda tx: key_for_usage(tx, Usage.VOUCHER, key_id, "offline.key_id"))

    async def issuer_pem(self, kid: str) -> str | None:
        try:
            key = await self.keys.get(self.database, kid)
        except KeyNotFound:
            return None
        return public_key_pem(key.algorithm, key.public_key)

    async def sign(self, payload: bytes) -> tuple[bytes, str]:
        key = await self.voucher_key()
        return await sign1(self.signer, self.profile, key, payload), key.key_id

    # --- registration ------------------------------------------------------------------------------

    async def certificate_for(self, device_id: str, wallet_id: str, public_key_pem_text: str) -> tuple[
            offline.Certificate, bytes, str]:
        """Check the request against the wallet and sign the device's certificate (nothing written yet)."""
        if not offline.DEVICE_ID.match(device_id):
            raise ValidationFailed("device_id: 3–64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        point = offline.point_from_pem(public_key_pem_text)
        wallet = await self.database.read(lambda tx: load_wallet(tx, wallet_id))
        if wallet["status"] != "active":
            raise WalletNotActive(f"wallet {wallet_id} is {wallet['status']}", [f"wallet-{wallet['status']}"])
        tier = int(wallet["tier"])
        caps = self.offline.tier_caps(tier)
        now = journal.epoch_millis()
        certificate = offline.Certificate(device_id, wallet_id, point, tier,
                                          offline.Caps(caps.per_payment_fen, caps.balance_fen, caps.payments_per_sync),
                                          now, now + self.offline.certificate_days * DAY_MS)
        envelope, kid = await self.sign(certificate.payload())
        return certificate, envelope, kid

    async def register(self, request: IdempotentRequest | None, device_id: str, wallet_id: str,
                       public_key_pem_text: str, model: str, entry: AuditEntry) -> Answer:
        """Registration as a signed record (the one-phase shape of :mod:`gateway.operations.raw`): check and
        sign the certificate — nothing is recorded before, so a refused or failed signature leaves no
        trace but its refusal — then one write: the device row, its audit entry and the answer (201),
        rechecked under the device and wallet locks.

        Raises:
            see :meth:`certificate_for` and :meth:`register_in`; IdempotencyRaced (another request with
            this key registered first: nothing of this one is written).
        """
        certificate, envelope, kid = await self.certificate_for(device_id, wallet_id, public_key_pem_text)
        issuer = await self.issuer_pem(kid)

        def record(tx: Tx) -> Answer:
            row = self.register_in(tx, certificate, envelope, kid, model, entry)
            answer = Answer(201, device_document(row, issuer))
            idempotency.answer_in(tx, request, answer)
            return answer

        return await self.database.write(record)

    def register_in(self, tx: Tx, certificate: offline.Certificate, envelope: bytes, kid: str, model: str,
                    entry: AuditEntry) -> Any:
        _locked_as_certified(tx, certificate)
        if tx.fetchone("SELECT 1 FROM devices WHERE device_id = ?", (certificate.device_id,)):
            raise AlreadyExists(f"device {certificate.device_id} is registered already")
        if tx.fetchone("SELECT 1 FROM devices WHERE public_key = ?", (certificate.pub,)):
            raise AlreadyExists("another device is registered with this public key")
        now = clock.now_iso()
        caps = certificate.caps
        tx.execute(
            "INSERT INTO devices (device_id, wallet_id, model, public_key, tier, cap_per_payment, cap_balance, "
            "cap_payments_per_sync, cert_iat, cert_exp, certificate, kid, status, chain_hash, created_at, created_by, "
            "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'active', ?, ?, ?, ?)",
            (certificate.device_id, certificate.wallet_id, model, certificate.pub, certificate.tier, caps.per_payment,
             caps.balance, caps.payments_per_sync, certificate.iat, certificate.exp, envelope, kid, offline.GENESIS,
             now, entry.actor, now),
        )
        entry.key_id = kid
        entry.result = {"device_id": certificate.device_id, "wallet_id": certificate.wallet_id,
                        "tier": certificate.tier, "certificate_exp_ms": certificate.exp}
        append(tx, [entry])
        return device_row(tx, certificate.device_id)

    # --- re-certification --------------------------------------------------------------------------

    async def recertify(self, device_id: str, entry: AuditEntry) -> dict[str, Any]:
        """A new certificate for a registered, active device under the voucher key that signs now — after a
        rotation, or to renew one — with the endorsements (oldest first) that lead a device pinning its
        present issuer to that key (:func:`gateway.schemes.offline.endorsed`; none for the same key). The
        shape of :meth:`register`: checked (the chain first: a device that would refuse the certificate
        gets none) and signed, then one write — the device's certificate, its audit entry — rechecked
        under the device and wallet locks. Nothing changes on the device until it is given the answer.

        Raises:
            DeviceNotFound; DeviceNotActive (frozen, revoked or unloaded); WalletNotActive;
            IssuerNotEndorsed (no chain from the device's issuer to the voucher key); KeyDisabled (the
            voucher key may not sign).
        """
        device = _active(await self.database.read(lambda tx: device_row(tx, device_id)))
        key = await self.voucher_key()
        chain = await self.database.read(lambda tx: endorsement_chain(tx, str(device["kid"]), key.key_id))
        certificate, envelope, kid = await self.certificate_for(
            device_id, str(device["wallet_id"]), offline.pem_from_point(bytes(device["public_key"])))
        if kid != key.key_id:  # the chain leads to the key read above; a rotation came in between
            raise Conflict(f"the voucher key changed while device {device_id} was certified; retry")
        issuer = await self.issuer_pem(kid)

        def record(tx: Tx) -> dict[str, Any]:
            _locked_as_certified(tx, certificate)
            current = _active(device_row(tx, device_id))
            if current["kid"] != device["kid"] or current["wallet_id"] != certificate.wallet_id:
                raise Conflict(f"device {device_id} was certified again meanwhile; retry")
            caps = certificate.caps
            tx.execute("UPDATE devices SET tier = ?, cap_per_payment = ?, cap_balance = ?, cap_payments_per_sync = ?, "
                       "cert_iat = ?, cert_exp = ?, certificate = ?, kid = ?, updated_at = ? WHERE device_id = ?",
                       (certificate.tier, caps.per_payment, caps.balance, caps.payments_per_sync, certificate.iat,
                        certificate.exp, envelope, kid, clock.now_iso(), device_id))
            entry.key_id = kid
            entry.result = {"device_id": device_id, "previous_kid": current["kid"], "kid": kid,
                            "endorsements": len(chain), "certificate_exp_ms": certificate.exp}
            append(tx, [entry])
            return {**device_document(device_row(tx, device_id), issuer),
                    "endorsements": [base64.b64encode(item).decode() for item in chain]}

        return await self.database.write(record)

    # --- loads ------------------------------------------------------------------------------

    def load_in(self, tx: Tx, device_id: str, amount: int, entry: AuditEntry,
                approved: bool = False) -> LoadResult | dict[str, Any]:
        """Move ``amount`` from the wallet to its offline reserve and fix the voucher's payload — or,
        above ``approvals.device_load_threshold_fen``, request an approval and return its document
        (``approved``: carried out by that approval)."""
        if tx.dialect == "postgresql":
            done = self._load_on_server(tx, device_id, amount, entry, approved)
            if done is not None:
                return done
        tx.lock(f"device:{device_id}")
        device = device_row(tx, device_id)
        tx.lock(f"wallet:{device['wallet_id']}")
        now = journal.epoch_millis()
        _active(device)
        if now > int(device["cert_exp"]):
            raise DeviceNotActive(f"device {device_id}'s certificate has expired", ["certificate-expired"])
        wallet = load_wallet(tx, device["wallet_id"])
        if wallet["status"] != "active":
            raise WalletNotActive(f"wallet {wallet['wallet_id']} is {wallet['status']}", [f"wallet-{wallet['status']}"])
        if amount > int(wallet["balance_fen"]):
            raise InsufficientFunds(f"wallet {wallet['wallet_id']} holds {wallet['balance_fen']} fen",
                                    ["insufficient-funds"])
        on_device = int(device["issued_fen"]) - int(device["spent_fen"]) - int(device["returned_fen"])
        if on_device + amount > int(device["cap_balance"]):
            raise LimitExceeded(f"the device may hold at most {device['cap_balance']} fen offline "
                                f"({on_device} loaded and unspent)", ["offline-balance-cap-exceeded"])
        settings = self.approvals.settings
        why = None if approved else needs_approval(
            amount, settings.device_load_threshold_fen,
            journal.moved_today(tx, wallet["wallet_id"], "device_load", journal.business_day()),
            settings.device_load_daily_threshold_fen)
        if why is not None:
            # Whoever registered the device may hold its key: they do not approve value onto it.
            return self.approvals.park_in(tx, "device_load", {"device_id": device_id, "wallet_id": wallet["wallet_id"],
                                                              "amount_fen": amount, **why}, entry,
                                          interested=[device["created_by"]])
        load_seq = int(device["load_seq"]) + 1
        entry_id = journal.post(tx, "device_load", f"{device_id}#{load_seq}",
                                [(journal.wallet_account(wallet["wallet_id"]), -amount),
                                 (journal.reserve_account(wallet["wallet_id"]), amount)], entry.actor)
        voucher = offline.Voucher(device_id, load_seq, amount, now, now + self.offline.voucher_minutes * 60_000)
        tx.execute(
            "INSERT INTO device_loads (device_id, load_seq, amount, iat, exp, entry_id, payload, created_at, "
            "created_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (device_id, load_seq, amount, voucher.iat, voucher.exp, entry_id, voucher.payload(), clock.now_iso(),
             entry.actor),
        )
        tx.execute("UPDATE devices SET load_seq = ?, issued_fen = issued_fen + ?, updated_at = ? WHERE device_id = ?",
                   (load_seq, amount, clock.now_iso(), device_id))
        record_signal_in(tx, "device.loaded", device_id, amount, actor=entry.actor, entry_id=entry_id,
                         wallet_id=wallet["wallet_id"])
        entry.result = {"device_id": device_id, "wallet_id": wallet["wallet_id"], "load_seq": load_seq,
                        "amount_fen": amount, "entry_id": entry_id}
        append(tx, [entry])
        return LoadResult(device_id, load_seq, amount, entry_id, voucher.exp, voucher.payload())

    def _load_on_server(self, tx: Tx, device_id: str, amount: int, entry: AuditEntry, approved: bool
                        ) -> LoadResult | None:
        """PostgreSQL: :meth:`load_in`'s checks and posting as one server-side function,
        ``ecny_post_device_load`` (migration 0016), with the same locks, checks (in the same order),
        problem types and messages; the audit entry travels with the ``COMMIT``. Returns None when the
        load must be parked for a second person (nothing written: the Python path parks it).
        """
        now = journal.epoch_millis()
        exp = now + self.offline.voucher_minutes * 60_000
        head, tail = map_around(offline.Voucher(device_id, 0, amount, now, exp).claims(), "load_seq")
        settings = self.approvals.settings
        entry_id = secrets.token_hex(12)
        row = tx.fetchone(
            "SELECT * FROM ecny_post_device_load(?, ?::bigint, ?, ?, ?, ?, ?::bigint, ?::bigint, ?, ?, ?::bigint, "
            "?::bigint)",
            (device_id, amount, entry_id, entry.actor, journal.business_day(), clock.now_iso(), now, exp, head, tail,
             None if approved else settings.device_load_threshold_fen,
             None if approved else settings.device_load_daily_threshold_fen))
        assert row is not None  # a function call always answers one row
        outcome, wallet_id = row["outcome"], row["wallet_id"]
        if outcome == "no-device":
            raise DeviceNotFound(f"no device {device_id[:64]!r}")
        if outcome == "device-status":
            raise DeviceNotActive(f"device {device_id} is {row['status']}", [f"device-{row['status']}"])
        if outcome == "certificate-expired":
            raise DeviceNotActive(f"device {device_id}'s certificate has expired", ["certificate-expired"])
        if outcome == "wallet-status":
            raise WalletNotActive(f"wallet {wallet_id} is {row['status']}", [f"wallet-{row['status']}"])
        if outcome == "insufficient-funds":
            raise InsufficientFunds(f"wallet {wallet_id} holds {row['balance']} fen", ["insufficient-funds"])
        if outcome == "device-cap":
            raise LimitExceeded(f"the device may hold at most {row['cap']} fen offline "
                                f"({row['on_device']} loaded and unspent)", ["offline-balance-cap-exceeded"])
        if outcome == "park":
            return None
        load_seq = int(row["load_seq"])
        record_signal_in(tx, "device.loaded", device_id, amount, actor=entry.actor, entry_id=entry_id,
                         wallet_id=wallet_id)
        entry.result = {"device_id": device_id, "wallet_id": wallet_id, "load_seq": load_seq, "amount_fen": amount,
                        "entry_id": entry_id}
        append(tx, [entry])
        return LoadResult(device_id, load_seq, amount, entry_id, exp, head + cbor2.dumps(load_seq) + tail)

    async def load(self, request: IdempotentRequest | None, device_id: str, amount: int,
                   entry: AuditEntry) -> Answer:
        """A load as one signed operation: checked, posted and recorded (or parked for a supervisor: the
        pending approval, 202), committed, its voucher signed and stored with the answer (201)."""

        def record(tx: Tx) -> Answer | ToSign[Any]:
            result = self.load_in(tx, device_id, amount, entry)
            if not isinstance(result, LoadResult):  # above the threshold: the pending approval, answered now
                return Answer(202, result)
            return ToSign(result.reference, {"device_id": result.device_id, "load_seq": result.load_seq,
                                             "amount": result.amount, "exp": result.exp, "entry_id": result.entry_id,
                                             "payload": result.payload, "voucher": None})

        return await self.signed_loads.run(request, record)

    async def seal_voucher(self, device_id: str, load_seq: int) -> dict[str, Any]:
        """The load document, signing its voucher first if it has none yet (an approval, a read)."""
        document: dict[str, Any] = (await self.signed_loads.reference(f"{device_id}#{load_seq}")).document
        return document

    @staticmethod
    def _load_row(tx: Tx, device_id: str, load_seq: int) -> Any:
        row = tx.fetchone("SELECT * FROM device_loads WHERE device_id = ? AND load_seq = ?", (device_id, load_seq))
        if row is None:
            raise NotFound(f"no load {load_seq} of device {device_id}")
        return row

    # --- sync ----------------------------------------------------------------------------------

    async def sync(self, device_id: str, blob: bytes, entry: AuditEntry) -> dict[str, Any]:
        """Reconcile one device's log export; returns the report with the HSM-signed acknowledgement.

        Raises:
            DeviceNotFound, OfflineFormatError (not a signed export), InvalidDeviceSignature (the
            export's signature does not verify: it is kept as a discrepancy and nothing else happens).
        """
        database = self.database
        await database.read(lambda tx: device_row(tx, device_id))
        upload = await asyncio.to_thread(read_upload, device_id, blob)
        payers = {r.payment.payer for r in upload.receipts if r.payment is not None} | {device_id}
        hashes = hashes_to_check([upload], self.offline.signature_checks)

        def lookup(tx: Tx) -> tuple[dict[str, bytes], set[bytes]]:
            points = {row["device_id"]: bytes(row["public_key"]) for row in select_in(
                tx, "SELECT device_id, public_key FROM devices WHERE device_id IN ({in})", sorted(payers))}
            known = {bytes(row["payment_hash"]) for row in select_in(
                tx, "SELECT payment_hash FROM offline_payments WHERE payment_hash IN ({in})", hashes)}
            return points, known

        points, known = await database.read(lookup)
        jobs, targets = plan_checks([upload], points, known, self.offline.signature_checks)
        results = await asyncio.to_thread(self.verifier.verify_many, jobs)
        apply_checks([upload], targets, results)
        if not upload.export_ok:
            await database.write(lambda tx: record_refused_export(tx, device_id, blob, "signature does not verify"))
            raise InvalidDeviceSignature(f"the log export's signature does not verify with device {device_id}'s key",
                                         ["invalid-signature"])
        settings, limits = self.offline, self.limits
        reports = await database.write(lambda tx: reconcile_in(tx, [upload], settings, entry.actor, [entry], limits))
        report = reports[0]
        ack = offline.Ack(device_id, upload.export.counter, upload.export.rx, upload.export_hash,
                          journal.epoch_millis())
        envelope, kid = await self.sign(ack.payload())
        return {**report, "ack": b64(envelope), "kid": kid}

    # --- unload and revoke ---------------------------------------------------------------------

    def unload_in(self, tx: Tx, device_id: str, statement_blob: bytes, entry: AuditEntry) -> dict[str, Any]:
        """Check the device's final statement and return its unspent value to the wallet."""
        tx.lock(f"device:{device_id}")
        device = device_row(tx, device_id)
        tx.lock(f"wallet:{device['wallet_id']}")
        if device["status"] not in ("active", "frozen"):
            raise DeviceNotActive(f"device {device_id} is {device['status']}", [f"device-{device['status']}"])
        message = offline.open_envelope(statement_blob)
        if not offline.verify_es256(message, bytes(device["public_key"])):
            raise InvalidDeviceSignature("the statement's signature does not verify with the device's key",
                                         ["invalid-signature"])
        statement = offline.parse_statement(message.payload)
        if statement.device_id != device_id:
            raise InvalidDeviceSignature(f"the statement is device {statement.device_id}'s", ["statement-for-another"])
        chain_hash = bytes(device["chain_hash"])
        if statement.counter != int(device["chain_counter"]) or statement.rx != int(device["rx_synced"]) or (
                chain_hash and statement.last != chain_hash):
            raise DeviceSyncRequired(
                f"the device's last payment is {statement.counter} and receipt {statement.rx}; the gateway has "
                f"reconciled {device['chain_counter']} and {device['rx_synced']}: sync the device first")
        issued, spent = int(device["issued_fen"]), int(device["spent_fen"])
        remaining = issued - spent
        entry_id = None
        if remaining > 0:
            entry_id = journal.post(tx, "device_unload", device_id,
                                    [(journal.reserve_account(device["wallet_id"]), -remaining),
                                     (journal.wallet_account(device["wallet_id"]), remaining)], entry.actor)
        mismatch = None
        if (statement.spent, statement.remaining) != (spent, remaining):
            mismatch = _flag(tx, "statement-mismatch", f"{device_id}:{statement.counter}", device_id,
                             {"statement": {"loaded": statement.loaded, "spent": statement.spent,
                                            "remaining": statement.remaining},
                              "gateway": {"issued": issued, "spent": spent, "remaining": remaining}},
                             abs(statement.remaining - remaining))
        tx.execute("UPDATE devices SET status = 'unloaded', status_reason = 'unloaded', final_counter = ?, "
                   "statement = ?, returned_fen = ?, updated_at = ? WHERE device_id = ?",
                   (statement.counter, statement_blob, remaining, clock.now_iso(), device_id))
        entry.result = {"device_id": device_id, "returned_fen": remaining, "entry_id": entry_id,
                        "statement_mismatch": mismatch}
        append(tx, [entry])
        return {"device_id": device_id, "status": "unloaded", "returned_fen": remaining, "entry_id": entry_id,
                "statement_mismatch": mismatch}

    def revoke_in(self, tx: Tx, device_id: str, reason: str, entry: AuditEntry) -> Any:
        tx.lock(f"device:{device_id}")
        device = device_row(tx, device_id)
        if device["status"] in ("revoked", "unloaded"):
            raise DeviceNotActive(f"device {device_id} is {device['status']} already", [f"device-{device['status']}"])
        tx.execute("UPDATE devices SET status = 'revoked', status_reason = ?, stopped_at_ms = ?, updated_at = ? "
                   "WHERE device_id = ?", (reason, journal.epoch_millis(), clock.now_iso(), device_id))
        record_signal_in(tx, "device.revoked", device_id, actor=entry.actor, device_id=device_id, reason=reason,
                         wallet_id=device["wallet_id"])
        entry.result = {"device_id": device_id, "from": device["status"], "reason": reason}
        append(tx, [entry])
        return device_row(tx, device_id)

    # --- discrepancies -----------------------------------------------------------------------------

    def resolve_in(self, tx: Tx, discrepancy_id: str, resolution: str, note: str, entry: AuditEntry,
                   approved: bool = False) -> dict[str, Any]:
        """A supervisor's decision (see :data:`RESOLUTIONS`), carried out and audited in one transaction.

        ``honour`` is only requested (the pending approval's document is returned) unless
        ``approved``: a second supervisor's approval carries it out.

        Raises:
            HonourAboveCap: ``honour`` of a payment above its payer's per-payment cap.
        """
        tx.lock(f"discrepancy:{discrepancy_id}")
        row = tx.fetchone("SELECT * FROM discrepancies WHERE discrepancy_id = ?", (discrepancy_id,))
        if row is None:
            raise DiscrepancyNotFound(f"no discrepancy {discrepancy_id[:40]}")
        if row["status"] != "open":
            raise DiscrepancyNotOpen(f"discrepancy {discrepancy_id} was resolved ({row['resolution']})")
        held = [dict(r) for r in tx.fetchall(
            "SELECT * FROM offline_payments WHERE discrepancy_id = ? AND status = 'held' "
            "ORDER BY payer_device, counter",
            (discrepancy_id,))]
        if resolution == "acknowledge" and held:
            raise ResolutionRefused(f"{len(held)} payment(s) are held: post, honour or reject them",
                                    ["payments-held"])
        if resolution != "acknowledge" and not held:
            raise ResolutionRefused("no payment is held by this discrepancy: acknowledge it", ["no-held-payment"])
        ids = sorted({p["payer_device"] for p in held} | {p["payee_device"] for p in held})
        for device_id in ids:
            tx.lock(f"device:{device_id}")
        devices = {r["device_id"]: r for r in select_in(tx, "SELECT * FROM devices WHERE device_id IN ({in})", ids)}
        if resolution == "honour":
            _check_honour_caps(held, devices)
            if not approved:
                # The registrars of the devices involved may hold their keys (and made the overspend):
                # none of them approves the bank paying for it.
                return self.approvals.park_in(tx, HONOUR, honour_payload(row, held, note), entry,
                                              subject=f"discrepancy:{discrepancy_id}",
                                              interested=sorted({d["created_by"] for d in devices.values()}))
        wallets = sorted({d["wallet_id"] for d in devices.values()})
        for wallet_id in wallets:
            tx.lock(f"wallet:{wallet_id}")
        status = {r["wallet_id"]: r["status"] for r in select_in(
            tx, "SELECT wallet_id, status FROM wallets WHERE wallet_id IN ({in})", wallets)}
        transfers: dict[str, list[Transfer]] = {"offline": [], "offline_honour": [], "offline_release": []}
        reserves: dict[str, int] = {}
        released: dict[str, int] = {}
        returned: dict[str, int] = {}  # of released: value of unloaded devices, back in their wallet now
        payee_room = PayeeCredits(tx, self.limits)
        outcome = {"post": "posted", "honour": "honoured", "reject": "rejected"}.get(resolution)
        for payment in held:
            digest = bytes(payment["payment_hash"])
            payer, payee = devices.get(payment["payer_device"]), devices.get(payment["payee_device"])
            amount, in_budget = int(payment["amount"]), bool(payment["in_budget"])
            assert payer is not None  # payments are only kept for registered payers
            reference = digest.hex()
            if resolution == "reject":
                if in_budget:
                    released[payer["device_id"]] = released.get(payer["device_id"], 0) + amount
                    if payer["status"] == "unloaded":  # its other value went back at unload: this goes back now
                        returned[payer["device_id"]] = returned.get(payer["device_id"], 0) + amount
                        transfers["offline_release"].append(Transfer(
                            "rel_" + reference[:24], reference, journal.reserve_account(payer["wallet_id"]),
                            journal.wallet_account(payer["wallet_id"]), amount, "held offline payment rejected"))
                continue
            if payee is None:
                raise ResolutionRefused(f"payee {payment['payee_device']} is not a registered device: reject instead",
                                        ["unknown-payee"])
            if status.get(payee["wallet_id"]) != "active":
                raise ResolutionRefused(f"the payee's wallet {payee['wallet_id']} is not active",
                                        ["payee-wallet-not-active"])
            if not payee_room.take(payee["wallet_id"], amount):
                raise ResolutionRefused(f"the payee's wallet {payee['wallet_id']} would go above its tier's balance "
                                        f"cap of {payee_room.cap(payee['wallet_id'])} fen: post it once the wallet has "
                                        "room, or reject it", ["balance-cap-exceeded"])
            memo = f"offline {payment['payer_device']}#{payment['counter']} to {payment['payee_device']} ({resolution})"
            if in_budget:
                available = reserves.setdefault(payer["wallet_id"], journal.balance(
                    tx, journal.reserve_account(payer["wallet_id"])))
                if available < amount:
                    raise ResolutionRefused("the payer's offline reserve is short", ["reserve-short"])
                reserves[payer["wallet_id"]] = available - amount
                transfers["offline"].append(Transfer(
                    offline_entry_id(digest), reference, journal.reserve_account(payer["wallet_id"]),
                    journal.wallet_account(payee["wallet_id"]), amount, memo))
            elif resolution == "post":
                raise ResolutionRefused("the payment is beyond the value loaded onto the payer device: honour it "
                                        "(the bank pays from suspense) or reject it", ["not-within-loaded-value"])
            else:
                transfers["offline_honour"].append(Transfer(
                    offline_entry_id(digest), reference, journal.SUSPENSE, journal.wallet_account(payee["wallet_id"]),
                    amount, memo))
        for kind, batch in transfers.items():
            post_offline(tx, kind, batch, entry.actor)
        now = clock.now_iso()
        if outcome is not None:
            tx.execute("UPDATE offline_payments SET status = ?, posted_at = ? WHERE discrepancy_id = ? "
                       "AND status = 'held'", (outcome, now if outcome != "rejected" else None, discrepancy_id))
        for transfer in (*transfers["offline"], *transfers["offline_honour"]):  # each payment names its entry
            tx.execute("UPDATE offline_payments SET entry_id = ? WHERE payment_hash = ?",
                       (transfer.entry_id, bytes.fromhex(transfer.reference)))
        for device_id, amount in released.items():
            tx.execute("UPDATE devices SET spent_fen = spent_fen - ?, returned_fen = returned_fen + ?, updated_at = ? "
                       "WHERE device_id = ?", (amount, returned.get(device_id, 0), now, device_id))
        tx.execute("UPDATE discrepancies SET status = 'resolved', resolution = ?, note = ?, resolved_by = ?, "
                   "resolved_at = ? WHERE discrepancy_id = ?", (resolution, note, entry.actor, now, discrepancy_id))
        entry.result = {"discrepancy_id": discrepancy_id, "kind": row["kind"], "resolution": resolution,
                        "payments": [bytes(p["payment_hash"]).hex() for p in held],
                        "amount_fen": sum(int(p["amount"]) for p in held)}
        append(tx, [entry])
        return discrepancy_in(tx, discrepancy_id)


def discrepancy_in(tx: Tx, discrepancy_id: str) -> dict[str, Any]:
    row = tx.fetchone("SELECT * FROM discrepancies WHERE discrepancy_id = ?", (discrepancy_id,))
    if row is None:
        raise DiscrepancyNotFound(f"no discrepancy {discrepancy_id[:40]}")
    held = [bytes(r["payment_hash"]).hex() for r in tx.fetchall(
        "SELECT payment_hash FROM offline_payments WHERE discrepancy_id = ? ORDER BY payer_device, counter",
        (discrepancy_id,))]
    return discrepancy_document(row, held)


def _flag(tx: Tx, kind: str, key: str, device_id: str, evidence: dict[str, Any], amount: int) -> str:
    """Raise a discrepancy outside a reconciliation (once per key); returns its id."""
    from gateway.offline.rules import Reconciliation

    reconciliation = Reconciliation(tx, OfflineSettings(), "")
    discrepancy_id = reconciliation.flag(kind, key, device_id, evidence, amount)
    reconciliation.write()
    return discrepancy_id


HONOUR = "offline_honour"
DEVICE_LOAD = "device_load"


def _check_honour_caps(held: list[dict[str, Any]], devices: dict[str, Any]) -> None:
    """No held payment above its payer certificate's per-payment cap is honoured: an honest device
    never signs one, and the bank's suspense account would have no bound but the amount field."""
    for payment in held:
        payer = devices.get(payment["payer_device"])
        cap = int(payer["cap_per_payment"]) if payer is not None else 0
        if int(payment["amount"]) > cap:
            raise HonourAboveCap(
                f"payment {bytes(payment['payment_hash']).hex()[:16]}… of {payment['amount']} fen is above its payer's "
                f"per-payment cap of {cap} fen: reject it", ["above-payment-cap"])


def honour_payload(discrepancy: Row, held: list[dict[str, Any]], note: str) -> dict[str, Any]:
    """What a second supervisor approves when they approve an honour: the exact payments and amounts."""
    payments = [{"payment_hash": bytes(p["payment_hash"]).hex(), "payer_device": p["payer_device"],
                 "payee_device": p["payee_device"], "amount_fen": int(p["amount"]), "in_budget": bool(p["in_budget"])}
                for p in held]
    return {"discrepancy_id": discrepancy["discrepancy_id"], "discrepancy_kind": discrepancy["kind"],
            "device_id": discrepancy["device_id"], "resolution": "honour", "note": note, "payments": payments,
            "amount_fen": sum(p["amount_fen"] for p in payments),
            "from_suspense_fen": sum(p["amount_fen"] for p in payments if not p["in_budget"])}


class OfflineApprovals:
    """The :class:`~gateway.approvals.workflow.ApprovalHandler` of honours and device loads."""

    def __init__(self, devices: Devices) -> None:
        self.devices = devices

    def execute_in(self, tx: Tx, approval: Row, payload: dict[str, Any], entry: AuditEntry) -> dict[str, Any]:
        if approval["kind"] == DEVICE_LOAD:
            executed = execution_entry(approval, entry, "devices.load")
            loaded = self.devices.load_in(tx, payload["device_id"], int(payload["amount_fen"]), executed, approved=True)
            assert isinstance(loaded, LoadResult)
            return {"device_id": loaded.device_id, "load_seq": loaded.load_seq, "amount_fen": loaded.amount,
                    "entry_id": loaded.entry_id}
        discrepancy_id = payload["discrepancy_id"]
        tx.lock(f"discrepancy:{discrepancy_id}")
        row = tx.fetchone("SELECT status FROM discrepancies WHERE discrepancy_id = ?", (discrepancy_id,))
        if row is None or row["status"] != "open":
            raise ResolutionRefused(f"discrepancy {discrepancy_id} is no longer open", ["discrepancy-not-open"])
        held = sorted(bytes(r["payment_hash"]).hex() for r in tx.fetchall(
            "SELECT payment_hash FROM offline_payments WHERE discrepancy_id = ? AND status = 'held'",
            (discrepancy_id,)))
        if held != sorted(p["payment_hash"] for p in payload["payments"]):
            raise ResolutionRefused("the discrepancy holds other payments than the approved ones",
                                    ["held-payments-changed"])
        executed = execution_entry(approval, entry, "reconciliation.resolve")
        try:
            document = self.devices.resolve_in(tx, discrepancy_id, "honour", payload["note"], executed, approved=True)
        except DiscrepancyNotOpen as exc:  # checked above under the same lock; kept for safety
            raise ResolutionRefused(exc.detail, ["discrepancy-not-open"]) from exc
        return {"discrepancy_id": discrepancy_id, "resolution": "honour", "status": document["status"],
                "amount_fen": payload["amount_fen"], "payments": [p["payment_hash"] for p in payload["payments"]]}

    def reject_in(self, tx: Tx, approval: Row, payload: dict[str, Any]) -> None:
        """Nothing moved and nothing was reserved: the discrepancy stays open, the load never happened."""

    def expire_in(self, tx: Tx, approval: Row, payload: dict[str, Any]) -> None:
        """As for a rejection."""

    async def finish(self, document: dict[str, Any]) -> dict[str, Any] | None:
        if document["kind"] == DEVICE_LOAD and document["result"]:
            result = document["result"]
            return await self.devices.seal_voucher(result["device_id"], int(result["load_seq"]))
        return None


class VoucherSigning:
    """The :class:`~gateway.operations.signed.SigningStep` of loads: a COSE_Sign1 voucher over the payload
    fixed at posting, with the voucher key. The subject is the load's row (``device_id``, ``load_seq``,
    ``payload``, ``voucher`` at least); a reference is ``<device_id>#<load_seq>``."""

    def __init__(self, devices: Devices) -> None:
        self.devices = devices

    async def load(self, reference: str) -> Any:
        device_id, _, load_seq = reference.rpartition("#")
        return await self.devices.database.read(lambda tx: Devices._load_row(tx, device_id, int(load_seq)))

    def answered(self, row: Any) -> Answer | None:
        return None if row["voucher"] is None else Answer(201, load_document(row))

    async def sign(self, row: Any) -> tuple[bytes, str]:
        return await self.devices.sign(bytes(row["payload"]))

    def store_in(self, tx: Tx, row: Any, signature: tuple[bytes, str]) -> Stored:
        envelope, kid = signature
        device_id, load_seq = row["device_id"], int(row["load_seq"])
        tx.queue("UPDATE device_loads SET voucher = ?, kid = ? WHERE device_id = ? AND load_seq = ? "
                 "AND voucher IS NULL", (envelope, kid, device_id, load_seq))
        return Stored(Answer(201, load_document({**row, "voucher": envelope, "kid": kid})),
                      "SELECT 1 FROM device_loads WHERE device_id = ? AND load_seq = ? AND voucher = ?",
                      (device_id, load_seq, envelope))


def register_offline_approvals(approvals: Approvals, devices: Devices) -> None:
    """Route honour and device-load approvals to :class:`OfflineApprovals`."""
    handler = OfflineApprovals(devices)
    approvals.register(HONOUR, handler)
    approvals.register(DEVICE_LOAD, handler)
