"""Wallet operations: open, status, tier, cash in/out, transfers — and what their approvals execute.

Each operation that moves money does its policy check and its postings in one write transaction,
with the wallets it touches locked (SQLite: the ``BEGIN IMMEDIATE`` write lock; PostgreSQL:
advisory locks taken in wallet-id order), so concurrent requests never overdraw a wallet or pass
a limit twice. The audit entry and the idempotency record are written in the same transaction.
On PostgreSQL the check and post of a transfer, a cash-in and a cash-out (below their approval
thresholds) run as one server-side function each (``ecny_post_transfer``, ``ecny_post_cash``,
migration 0016): the same locks, figures, reasons and rows, in one round trip (docs/scaling.md).

A transfer's COSE_Sign1 envelope is signed *after* the posting commits (the HSM round trip does
not hold the ledger lock); the payload is fixed at posting time, and a transfer whose envelope is
missing (a crash in between) is signed on the next read or replay of it.

Above their thresholds (``[approvals]``: one operation, or for cash-ins and cash-outs also the day's
total on the wallet), transfers, cash-ins and cash-outs — and every upgrade to tier 1, including a
wallet opened at tier 1 — are not carried out but requested from :mod:`gateway.approvals`; :class:`WalletApprovals`
carries them out when a second person approves.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass
from typing import Any

import cbor2
import orjson

from gateway import clock
from gateway.approvals.workflow import Approvals, execution_entry, needs_approval
from gateway.audit.chain import AuditEntry, append
from gateway.config import Settings
from gateway.errors import (
    ConfigError,
    Conflict,
    Forbidden,
    GatewayError,
    InsufficientFunds,
    InvalidAmount,
    InvalidWalletId,
    LimitExceeded,
    NotFound,
    PolicyRefused,
    SameWallet,
    ServerRefused,
    WalletNotActive,
    WalletNotFound,
)
from gateway.hsm.profile import HsmProfile
from gateway.keys import (
    KEY_COLUMNS,
    KeyRecord,
    KeyStatus,
    Usage,
    active_key_of,
    active_key_query,
    key_for_usage,
    may_sign_for,
    no_key_for,
    signing_refusal,
)
from gateway.keys import sign1_with_profile as sign1
from gateway.ledger import journal
from gateway.ledger.store import Database, Row, Tx
from gateway.operations import idempotency
from gateway.operations.idempotency import Answer, IdempotentRequest
from gateway.operations.signed import SignedOperation, Stored, ToSign
from gateway.policy.limits import Decision, check_payment, check_receipt, check_status
from gateway.risk.signals import record_signal_in
from gateway.schemes.canonical import map_around
from gateway.signing import Signer
from gateway.wallets.ids import is_valid_wallet_id, new_wallet_id


def require_wallet_id(text: str) -> str:
    if not is_valid_wallet_id(text):
        raise InvalidWalletId(f"{text[:32]!r} is not a wallet id (16 digits, the last a Luhn check digit)")
    return text


def mask_id_number(id_number: str | None) -> str | None:
    if not id_number:
        return None
    return id_number[:4] + "*" * max(0, len(id_number) - 8) + id_number[-4:] if len(id_number) > 8 else "****"


def wallet_document(row: Any) -> dict[str, Any]:
    return {
        "wallet_id": row["wallet_id"],
        "holder_name": row["holder_name"],
        "id_number": mask_id_number(row["id_number"]),
        "phone": row["phone"],
        "tier": int(row["tier"]),
        "kind": row["kind"],
        "status": row["status"],
        "status_reason": row["status_reason"],
        "balance_fen": int(row["balance_fen"]),
        "offline_reserve_fen": int(row["offline_reserve_fen"]),
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


SECOND_TIER = 2
"""The tier a wallet asked for at tier 1 is opened at, until its upgrade is approved."""


WALLET_SELECT = (
    "SELECT w.*, a.balance AS balance_fen, r.balance AS offline_reserve_fen FROM wallets w "
    "JOIN accounts a ON a.account_id = 'w:' || w.wallet_id JOIN accounts r ON r.account_id = 'r:' || w.wallet_id "
)


def load_wallet(tx: Tx, wallet_id: str) -> Any:
    row = tx.fetchone(WALLET_SELECT + "WHERE w.wallet_id = ?", (wallet_id,))
    if row is None:
        raise WalletNotFound(f"no wallet {wallet_id}")
    return row


def bigint_array(values: list[int | None]) -> str:
    """A PostgreSQL ``bigint[]`` literal of integers (None: NULL), for a ``?::bigint[]`` parameter."""
    return "{" + ",".join("NULL" if value is None else str(int(value)) for value in values) + "}"


def refuse(decisions: list[Decision], detail: str) -> None:
    """Raise the most specific refusal for the failed decisions, carrying every reason."""
    reasons = [reason for decision in decisions for reason in decision.reasons]
    if reasons:
        raise refusal_of(reasons, detail)


def refusal_of(reasons: list[str], detail: str) -> PolicyRefused:
    """The most specific refusal for these reasons (at least one), carrying every reason."""
    if any(r.endswith(("-frozen", "-closed")) for r in reasons):
        return WalletNotActive(detail, reasons)
    if reasons == ["insufficient-funds"]:
        return InsufficientFunds(detail, reasons)
    if any(r.endswith("-exceeded") for r in reasons):
        return LimitExceeded(detail, reasons)
    return PolicyRefused(detail, reasons)


def transfer_payload(transfer_id: str, from_wallet: str, to_wallet: str, amount: int, ts: int, seq: int) -> bytes:
    """A transfer's envelope payload: canonical CBOR of its fields, fixed at posting."""
    return cbor2.dumps({"v": 1, "id": transfer_id, "from": from_wallet, "to": to_wallet, "amount": amount,
                        "ccy": "CNY", "ts": ts, "seq": seq}, canonical=True)


def transfer_payload_parts(transfer_id: str, from_wallet: str, to_wallet: str, amount: int, ts: int
                           ) -> tuple[bytes, bytes]:
    """:func:`transfer_payload` around its ``seq``, which only the server knows when it posts:
    ``head + CBOR(seq) + tail`` is the payload (:func:`gateway.schemes.canonical.map_around`)."""
    return map_around({"v": 1, "id": transfer_id, "from": from_wallet, "to": to_wallet, "amount": amount,
                       "ccy": "CNY", "ts": ts, "seq": 0}, "seq")


@dataclass
class TransferIntent:
    from_wallet: str
    to_wallet: str
    amount: int
    memo: str


class Wallets:
    """The wallets of one gateway process: opening, tiers, cash, transfers and their approvals."""

    def __init__(self, database: Database, signer: Signer, profile: HsmProfile, settings: Settings,
                 approvals: Approvals | None = None) -> None:
        self.database = database
        self.signer = signer
        self.profile = profile
        self.settings = settings
        self.approvals = approvals if approvals is not None else Approvals(settings.approvals)
        self.signed_transfers = SignedOperation(database, TransferSigning(self))
        handler = WalletApprovals(self)
        for kind in WALLET_APPROVAL_KINDS:
            self.approvals.register(kind, handler)

    def check_amount(self, amount: int) -> int:
        if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
            raise InvalidAmount("amount_fen must be a positive integer number of fen")
        if amount > self.settings.wallets.max_amount_fen:
            raise InvalidAmount(f"amount_fen exceeds the maximum of {self.settings.wallets.max_amount_fen}")
        return amount

    # --- wallets ---------------------------------------------------------------------------

    def open_in(self, tx: Tx, fields: dict[str, Any], entry: AuditEntry) -> dict[str, Any]:
        """Open a wallet. One asked for at tier 1 (no limits) is opened at tier 2 and its upgrade to
        tier 1 requested at once, in the same transaction, exactly as ``POST /v1/wallets/{id}/tier``
        would: the wallet's document then carries the pending approval as ``tier_approval``, and the
        wallet is tier 1 only once a second person approves it."""
        requested_tier = int(fields["tier"])
        opened_tier = SECOND_TIER if requested_tier == 1 else requested_tier
        for _ in range(5):
            wallet_id = new_wallet_id(self.settings.wallets.id_prefix)
            if tx.fetchone("SELECT 1 FROM wallets WHERE wallet_id = ?", (wallet_id,)) is None:
                break
        now = clock.now_iso()
        tx.execute(
            "INSERT INTO wallets (wallet_id, holder_name, id_number, phone, tier, kind, status, status_reason, "
            "created_at, created_by, updated_at) VALUES (?, ?, ?, ?, ?, ?, 'active', '', ?, ?, ?)",
            (wallet_id, fields["holder_name"], fields.get("id_number"), fields["phone"], opened_tier,
             fields["kind"], now, entry.actor, now),
        )
        journal.open_accounts(tx, wallet_id)
        entry.result = {"wallet_id": wallet_id, "tier": opened_tier, "kind": fields["kind"]}
        if requested_tier != opened_tier:
            entry.result["requested_tier"] = requested_tier
        append(tx, [entry])
        document = wallet_document(load_wallet(tx, wallet_id))
        if requested_tier != opened_tier:
            upgrade = AuditEntry(actor=entry.actor, role=entry.role, action="wallets.tier", decision="allowed",
                                 payload_hash=entry.payload_hash, request_id=entry.request_id)
            document["tier_approval"] = self.set_tier_in(tx, wallet_id, requested_tier, upgrade)
        return document

    def set_status_in(self, tx: Tx, wallet_id: str, status: str, reason: str, may_unfreeze: bool,
                      entry: AuditEntry) -> dict[str, Any]:
        tx.lock(f"wallet:{wallet_id}")
        wallet = load_wallet(tx, wallet_id)
        current = wallet["status"]
        if current == "closed":
            raise Conflict(f"wallet {wallet_id} is closed; a closed wallet stays closed")
        if status in ("active", "closed") and not may_unfreeze:
            raise Forbidden("only a supervisor may unfreeze or close a wallet")
        if status == "closed" and (int(wallet["balance_fen"]) or int(wallet["offline_reserve_fen"])):
            raise PolicyRefused("a wallet with a balance or offline reserve cannot be closed",
                                ["balance-not-zero"])
        tx.execute("UPDATE wallets SET status = ?, status_reason = ?, updated_at = ? WHERE wallet_id = ?",
                   (status, reason, clock.now_iso(), wallet_id))
        entry.result = {"wallet_id": wallet_id, "from": current, "to": status, "reason": reason}
        append(tx, [entry])
        return wallet_document(load_wallet(tx, wallet_id))

    def set_tier_in(self, tx: Tx, wallet_id: str, tier: int, entry: AuditEntry, approved: bool = False) -> dict[
            str, Any]:
        """Change a wallet's tier — or, for an upgrade to tier 1 (no limits), request an approval
        (``approved``: carried out by that approval). Returns the wallet, or the pending approval."""
        tx.lock(f"wallet:{wallet_id}")
        wallet = load_wallet(tx, wallet_id)
        if wallet["status"] == "closed":
            raise WalletNotActive("a closed wallet cannot change tier", ["wallet-closed"])
        limits = self.settings.wallets.limits(tier)
        if limits.balance_cap is not None and int(wallet["balance_fen"]) > limits.balance_cap:
            raise LimitExceeded(f"the balance exceeds tier {tier}'s cap of {limits.balance_cap} fen",
                                ["balance-cap-exceeded"])
        if tier == 1 and int(wallet["tier"]) != 1 and not approved:
            return self.approvals.park_in(tx, "wallet_tier", {"wallet_id": wallet_id, "from_tier": int(wallet["tier"]),
                                                    "tier": tier}, entry)
        tx.execute(
            "UPDATE wallets SET tier = ?, updated_at = ? WHERE wallet_id = ?", (tier, clock.now_iso(), wallet_id)
        )
        entry.result = {"wallet_id": wallet_id, "from": int(wallet["tier"]), "to": tier}
        append(tx, [entry])
        return wallet_document(load_wallet(tx, wallet_id))

    def _park_if_large(self, tx: Tx, kind: str, wallet_id: str, amount: int, single: int, daily: int,
                       entry: AuditEntry) -> dict[str, Any] | None:
        """The pending approval of a cash movement above ``single``, or above ``daily`` with what the
        wallet moved of that kind today; None when it may go through on one person's word."""
        why = needs_approval(amount, single, journal.moved_today(tx, wallet_id, kind, journal.business_day()), daily)
        if why is None:
            return None
        return self.approvals.park_in(tx, kind, {"wallet_id": wallet_id, "amount_fen": amount, **why}, entry)

    def cash_in(self, tx: Tx, wallet_id: str, amount: int, actor: str, entry: AuditEntry,
                approved: bool = False) -> dict[str, Any]:
        """Credit a wallet against issuance — or, above ``cash_in_threshold_fen``, request an approval
        (``approved``: carried out by that approval). Returns the result, or the pending approval."""
        if tx.dialect == "postgresql":
            done = self._cash_on_server(tx, "cash_in", wallet_id, amount, actor, entry, approved)
            if done is not None:
                return done
        tx.lock(f"wallet:{wallet_id}")
        wallet = load_wallet(tx, wallet_id)
        limits = self.settings.wallets.limits(int(wallet["tier"]))
        refuse([check_status(wallet["status"], "payee"), check_receipt(limits, amount, int(wallet["balance_fen"]))],
               f"cash-in of {amount} fen to {wallet_id} refused")
        if not approved:
            settings = self.settings.approvals
            pending = self._park_if_large(tx, "cash_in", wallet_id, amount, settings.cash_in_threshold_fen,
                                          settings.cash_in_daily_threshold_fen, entry)
            if pending is not None:
                return pending
        entry_id = journal.post(tx, "cash_in", wallet_id, [(journal.wallet_account(wallet_id), amount),
                                                         (journal.ISSUANCE, -amount)], actor)
        record_signal_in(tx, "cash.in", wallet_id, amount, actor=actor, entry_id=entry_id)
        return self._cash_result(tx, wallet_id, entry_id, amount, entry)

    def cash_out(self, tx: Tx, wallet_id: str, amount: int, actor: str, entry: AuditEntry,
                 approved: bool = False) -> dict[str, Any]:
        """Debit a wallet against issuance — or, above ``cash_out_threshold_fen``, request an approval
        (``approved``: carried out by that approval). Returns the result, or the pending approval."""
        if tx.dialect == "postgresql":
            done = self._cash_on_server(tx, "cash_out", wallet_id, amount, actor, entry, approved)
            if done is not None:
                return done
        tx.lock(f"wallet:{wallet_id}")
        wallet = load_wallet(tx, wallet_id)
        decisions = [check_status(wallet["status"], "payer")]
        if amount > int(wallet["balance_fen"]):
            decisions.append(Decision(False, ("insufficient-funds",)))
        refuse(decisions, f"cash-out of {amount} fen from {wallet_id} refused")
        if not approved:
            settings = self.settings.approvals
            pending = self._park_if_large(tx, "cash_out", wallet_id, amount, settings.cash_out_threshold_fen,
                                          settings.cash_out_daily_threshold_fen, entry)
            if pending is not None:
                return pending
        entry_id = journal.post(tx, "cash_out", wallet_id, [(journal.wallet_account(wallet_id), -amount),
                                                          (journal.ISSUANCE, amount)], actor)
        record_signal_in(tx, "cash.out", wallet_id, amount, actor=actor, entry_id=entry_id)
        return self._cash_result(tx, wallet_id, entry_id, amount, entry)

    def _cash_on_server(self, tx: Tx, kind: str, wallet_id: str, amount: int, actor: str, entry: AuditEntry,
                        approved: bool) -> dict[str, Any] | None:
        """PostgreSQL: a cash-in or cash-out's check and post as one server-side function,
        ``ecny_post_cash`` (migration 0016), the audit entry travelling with the ``COMMIT``. Returns the
        result, or None when the Python path must decide: an unconfigured tier, or an amount a second
        person must approve (that path parks it; nothing was written).

        Raises:
            WalletNotFound, and the refusals of :func:`refuse` with the Python path's reasons.
        """
        arrays = self._tier_arrays()
        if arrays is None:
            return None
        settings = self.settings.approvals
        single, daily = ((settings.cash_in_threshold_fen, settings.cash_in_daily_threshold_fen) if kind == "cash_in"
                         else (settings.cash_out_threshold_fen, settings.cash_out_daily_threshold_fen))
        entry_id = secrets.token_hex(12)
        outcome = tx.fetchone(
            "SELECT reasons, missing, park, balance FROM ecny_post_cash(?, ?, ?::bigint, ?, ?, ?, ?, ?::bigint[], "
            "?::bigint, ?::bigint)",
            (kind, wallet_id, amount, entry_id, actor, journal.business_day(), clock.now_iso(), arrays[0],
             None if approved else single, None if approved else daily))
        assert outcome is not None  # a function call always answers one row
        if outcome["missing"]:
            raise WalletNotFound(f"no wallet {wallet_id}")
        detail = (f"cash-in of {amount} fen to {wallet_id} refused" if kind == "cash_in"
                  else f"cash-out of {amount} fen from {wallet_id} refused")
        refuse([Decision(False, tuple(outcome["reasons"]))], detail)
        if outcome["park"]:
            return None
        balance = int(outcome["balance"])
        record_signal_in(tx, "cash.in" if kind == "cash_in" else "cash.out", wallet_id, amount, actor=actor,
                         entry_id=entry_id)
        entry.result = {"wallet_id": wallet_id, "amount_fen": amount, "entry_id": entry_id, "balance_fen": balance}
        append(tx, [entry])
        return {"entry_id": entry_id, "wallet_id": wallet_id, "amount_fen": amount, "balance_fen": balance}

    def _cash_result(self, tx: Tx, wallet_id: str, entry_id: str, amount: int, entry: AuditEntry) -> dict[str, Any]:
        balance = journal.balance(tx, journal.wallet_account(wallet_id))
        entry.result = {"wallet_id": wallet_id, "amount_fen": amount, "entry_id": entry_id, "balance_fen": balance}
        append(tx, [entry])
        return {"entry_id": entry_id, "wallet_id": wallet_id, "amount_fen": amount, "balance_fen": balance}

    # --- transfers -------------------------------------------------------------------------

    def _check_transfer(self, tx: Tx, intent: TransferIntent) -> None:
        for wallet_id in sorted({intent.from_wallet, intent.to_wallet}):
            tx.lock(f"wallet:{wallet_id}")
        payer = load_wallet(tx, intent.from_wallet)
        payee = load_wallet(tx, intent.to_wallet)
        day = journal.business_day()
        today, year = journal.spent(tx, intent.from_wallet, day)
        payer_limits = self.settings.wallets.limits(int(payer["tier"]))
        payee_limits = self.settings.wallets.limits(int(payee["tier"]))
        refuse(
            [
                check_status(payer["status"], "payer"),
                check_status(payee["status"], "payee"),
                check_payment(payer_limits, intent.amount, int(payer["balance_fen"]), today, year),
                check_receipt(payee_limits, intent.amount, int(payee["balance_fen"])),
            ],
            f"transfer of {intent.amount} fen from {intent.from_wallet} to {intent.to_wallet} refused",
        )

    def _post_transfer(self, tx: Tx, transfer_id: str, intent: TransferIntent, actor: str) -> dict[str, Any]:
        """Post a checked transfer and fix its envelope payload. Returns the transfer row values."""
        entry_id = journal.post(
            tx, "transfer", transfer_id,
            [(journal.wallet_account(intent.from_wallet), -intent.amount),
             (journal.wallet_account(intent.to_wallet), intent.amount)],
            actor, intent.memo,
        )
        journal.add_spend(tx, intent.from_wallet, intent.amount, journal.business_day())
        record_signal_in(tx, "transfer.posted", intent.from_wallet, intent.amount, actor=actor,
                         counterparty=intent.to_wallet, transfer_id=transfer_id, entry_id=entry_id)
        seq = int(tx.fetchone(  # type: ignore[index]
            "UPDATE wallets SET out_seq = out_seq + 1 WHERE wallet_id = ? RETURNING out_seq", (intent.from_wallet,)
        )["out_seq"])
        ts = journal.epoch_millis()
        payload = transfer_payload(transfer_id, intent.from_wallet, intent.to_wallet, intent.amount, ts, seq)
        return {"entry_id": entry_id, "seq": seq, "ts": ts, "payload": payload}

    def transfer_in(self, tx: Tx, intent: TransferIntent, entry: AuditEntry,
                    ends: Ending | None = None) -> dict[str, Any]:
        """Check and post a transfer — or, above the approval threshold, park it for a supervisor.

        ``ends``: the transaction ends with the transfer (step 1 of the signed operation, which records the
        Idempotency-Key's reference here): on PostgreSQL the check, its refusal and the ``COMMIT`` then
        take one round trip (:meth:`_transfer_on_server`).

        Returns:
            The transfer's row, with status ``posted`` (envelope still to sign) or ``pending_approval``.
        Raises:
            PolicyRefused (and subclasses), WalletNotFound.
        """
        if intent.from_wallet == intent.to_wallet:
            raise SameWallet("payer and payee are the same wallet")
        if tx.dialect == "postgresql" and intent.amount <= self.settings.approvals.transfer_threshold_fen:
            posted = self._transfer_on_server(tx, intent, entry, ends)
            if posted is not None:
                return posted
        self._check_transfer(tx, intent)
        transfer_id = "t_" + secrets.token_hex(12)
        now = clock.now_iso()
        entry.result = {"transfer_id": transfer_id, "from": intent.from_wallet, "to": intent.to_wallet,
                        "amount_fen": intent.amount}
        if intent.amount > self.settings.approvals.transfer_threshold_fen:
            approval_id = self.approvals.request_in(tx, "transfer", {
                "transfer_id": transfer_id, "from_wallet": intent.from_wallet, "to_wallet": intent.to_wallet,
                "amount_fen": intent.amount, "memo": intent.memo, "ccy": "CNY"}, entry.actor)
            tx.execute(
                "INSERT INTO transfers (transfer_id, from_wallet, to_wallet, amount, memo, status, approval_id, "
                "requested_by, created_at) VALUES (?, ?, ?, ?, ?, 'pending_approval', ?, ?, ?)",
                (transfer_id, intent.from_wallet, intent.to_wallet, intent.amount, intent.memo, approval_id,
                 entry.actor, now),
            )
            entry.decision = "pending_approval"
            entry.result["approval_id"] = approval_id
            append(tx, [entry])
            return dict(self._transfer_row(tx, transfer_id))
        posted = self._post_transfer(tx, transfer_id, intent, entry.actor)
        row = {"transfer_id": transfer_id, "from_wallet": intent.from_wallet, "to_wallet": intent.to_wallet,
               "amount": intent.amount, "memo": intent.memo, "status": "posted", "entry_id": posted["entry_id"],
               "seq": posted["seq"], "ts": posted["ts"], "payload": posted["payload"], "envelope": None, "kid": None,
               "approval_id": None, "requested_by": entry.actor, "created_at": now}
        tx.queue(f"INSERT INTO transfers ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                 tuple(row.values()))  # a fresh random transfer id
        entry.result["entry_id"] = posted["entry_id"]
        append(tx, [entry])
        return row  # what the table now holds, without reading it back

    def _tier_arrays(self) -> list[str] | None:
        """The tier limits as the server-side check takes them — balance caps, single, daily, annual,
        each indexed by tier 1..4, as PostgreSQL array literals (``{500000,NULL,...}``: a string is
        sent by psycopg's C dumper, a list by its Python one) — or None when a tier is not configured
        (the Python check then raises the ConfigError it always has)."""
        try:
            limits = [self.settings.wallets.limits(tier) for tier in (1, 2, 3, 4)]
        except ConfigError:
            return None
        return [bigint_array([limit.balance_cap for limit in limits]), bigint_array([limit.single for limit in limits]),
                bigint_array([limit.daily for limit in limits]), bigint_array([limit.annual for limit in limits])]

    def _transfer_on_server(self, tx: Tx, intent: TransferIntent, entry: AuditEntry,
                            ends: Ending | None = None) -> dict[str, Any] | None:
        """PostgreSQL: the check and post of :meth:`transfer_in` (below the approval threshold) as one
        server-side function, ``ecny_post_transfer`` (migration 0016): the same wallet locks, figures,
        limits, reasons and postings in one round trip instead of one per statement; the audit entry
        and the rest travel with the ``COMMIT``. Returns the transfer's row (as :meth:`transfer_in`),
        or None when the limits cannot be passed (an unconfigured tier: the Python path decides).

        When the transaction ends with the transfer (``ends``) and the active e-CNY key signs (none is
        pinned), the audit entry, the risk signal and the Idempotency-Key reference are sent *before* the
        check, and the ``COMMIT`` right behind it (:meth:`_transfer_decided`): one round trip in all, and
        the payer's lock is released as soon as the server has posted."""
        arrays = self._tier_arrays()
        if arrays is None:
            return None
        transfer_id = "t_" + secrets.token_hex(12)
        entry_id = secrets.token_hex(12)
        now, ts, day = clock.now_iso(), journal.epoch_millis(), journal.business_day()
        head, tail = transfer_payload_parts(transfer_id, intent.from_wallet, intent.to_wallet, intent.amount, ts)
        call = ("ecny_post_transfer(?, ?, ?, ?, ?::bigint, ?, ?, ?, ?, ?::bigint, "
                "?::bigint[], ?::bigint[], ?::bigint[], ?::bigint[], ?, ?) AS t")
        params = (transfer_id, entry_id, intent.from_wallet, intent.to_wallet, intent.amount, intent.memo,
                  entry.actor, day, now, ts, *arrays, head, tail)
        if ends is not None and not self.settings.ecny.key_id:
            return self._transfer_decided(tx, intent, entry, ends, call, params,
                                          (transfer_id, entry_id, now, ts, head, tail))
        if self.settings.ecny.key_id:  # a pinned key family: record_transfer_in reads its newest version
            outcome = tx.fetchone(f"SELECT t.reasons, t.missing, t.seq FROM {call}", params)
        else:  # the active e-CNY key rides along (the signing step needs it): one round trip for both
            outcome = tx.fetchone(
                f"WITH ecny_key AS ({active_key_query(tx.dialect)}) SELECT t.reasons, t.missing, t.seq, "
                f"{', '.join(f'ecny_key.{c} AS k_{c}' for c in ACTIVE_KEY_COLUMNS)} FROM {call} "
                "LEFT JOIN ecny_key ON true", (Usage.ECNY.value, *params))
        assert outcome is not None  # a function call always answers one row
        if outcome["missing"]:
            raise WalletNotFound(f"no wallet {outcome['missing']}")
        refuse([Decision(False, tuple(outcome["reasons"]))],
               f"transfer of {intent.amount} fen from {intent.from_wallet} to {intent.to_wallet} refused")
        seq = int(outcome["seq"])
        record_posted_in(tx, intent, entry, transfer_id, entry_id)
        key = None if self.settings.ecny.key_id else active_key_of(outcome, "k_")
        return posted_row(intent, entry.actor, (transfer_id, entry_id, now, ts, head, tail), seq, key)

    def _transfer_decided(self, tx: Tx, intent: TransferIntent, entry: AuditEntry, ends: Ending, call: str,
                          params: tuple[Any, ...], made: tuple[str, str, str, int, bytes, bytes]) -> dict[str, Any]:
        """The one-round-trip transfer of :meth:`_transfer_on_server`: what commits with the transfer is sent
        first; ``ecny_decided`` (migration 0019) raises when the check refused, a wallet is unknown or the
        e-CNY key may not sign, which rolls all of it back; the ``COMMIT`` follows the check."""
        transfer_id, entry_id = made[0], made[1]
        record_posted_in(tx, intent, entry, transfer_id, entry_id)
        ends.refer_in(tx, transfer_id)
        key_json = ("json_build_object('key_id', ecny_key.key_id, 'status', ecny_key.status, 'status_changed_at', "
                    "ecny_key.status_changed_at, 'version', ecny_key.version, 'family_id', ecny_key.family_id)")
        try:
            outcome = tx.fetchone(
                f"WITH ecny_key AS ({active_key_query(tx.dialect)}) SELECT t.seq, "
                f"{', '.join(f'ecny_key.{c} AS k_{c}' for c in ACTIVE_KEY_COLUMNS)}, "
                f"ecny_decided(t.reasons, t.missing, ecny_key.status, {key_json}) AS decided "
                f"FROM {call} LEFT JOIN ecny_key ON true", (Usage.ECNY.value, *params), then_commit=True)
        except ServerRefused as refused:
            raise transfer_refusal(refused, intent) from None
        assert outcome is not None  # a function call always answers one row
        return posted_row(intent, entry.actor, made, int(outcome["seq"]), active_key_of(outcome, "k_"))

    def ecny_key_in(self, tx: Tx) -> KeyRecord:
        """The key that signs envelopes now, read in the transaction that decides: a rotation or a disable
        in any process is seen at once, at the cost of an indexed read (no transaction of its own).

        Raises:
            KeyNotFound, KeyDisabled, KeyUsageNotAllowed: see :func:`gateway.keys.key_for_usage`.
        """
        return key_for_usage(tx, Usage.ECNY, self.settings.ecny.key_id, "ecny.key_id")

    async def transfer(self, request: IdempotentRequest | None, intent: TransferIntent,
                       entry: AuditEntry) -> Answer:
        """A transfer as one signed operation: checked, posted and recorded (or parked for a supervisor:
        202), committed, its envelope signed and stored with the answer (201)."""

        return await self.signed_transfers.run(
            request, lambda tx: self.record_transfer_in(tx, intent, entry, Ending(request)))

    def record_transfer_in(self, tx: Tx, intent: TransferIntent, entry: AuditEntry,
                           ends: Ending | None = None) -> Answer | ToSign[ToSeal]:
        """Step 1 of a transfer: checked and recorded (:meth:`transfer_in`), with the e-CNY key that will sign
        its envelope — part of the decision: a disabled key refuses the transfer before anything is written,
        rather than posting it with no envelope. ``ends``: as :meth:`transfer_in`'s."""
        row = self.transfer_in(tx, intent, entry, ends)
        if row["status"] != "posted":
            return Answer(transfer_status(row["status"]), transfer_document(row))
        active: KeyRecord | None = row.pop(ACTIVE_ECNY_KEY, None)  # read with PostgreSQL's server-side transfer
        key = may_sign_for(active, Usage.ECNY, "ecny.key_id") if active is not None else self.ecny_key_in(tx)
        return ToSign(row["transfer_id"], ToSeal(row, key))

    async def signed_transfer(self, transfer_id: str) -> dict[str, Any]:
        """The transfer's document, its envelope signed first if it has none yet (a read, an approval)."""
        answer = await self.signed_transfers.reference(transfer_id)
        document: dict[str, Any] = answer.document
        return document

    async def seal(self, key: KeyRecord, payload: bytes) -> tuple[bytes, str]:
        """Step 3 of a transfer: the COSE_Sign1 envelope over its payload, with the e-CNY key, and the key's id."""
        return await sign1(self.signer, self.profile, key, payload), key.key_id

    @staticmethod
    def _transfer_row(tx: Tx, transfer_id: str) -> Any:
        row = tx.fetchone("SELECT * FROM transfers WHERE transfer_id = ?", (transfer_id,))
        if row is None:
            raise NotFound(f"no transfer {transfer_id[:40]}")
        return row

@dataclass(frozen=True)
class Ending:
    """Step 1 of a signed transfer ends its transaction: the Idempotency-Key's reference (if the request has a
    key) is recorded by the transfer, before the statement the ``COMMIT`` follows
    (:meth:`Wallets._transfer_decided`); the signed operation then records nothing more."""

    request: IdempotentRequest | None

    def refer_in(self, tx: Tx, reference: str) -> None:
        idempotency.refer_in(tx, self.request, reference)


def transfer_refusal(refused: ServerRefused, intent: TransferIntent) -> GatewayError:
    """The refusal a transfer's check in the database raised (``ecny_decided``), as the Python path raises it."""
    if refused.state == "EC404":
        return WalletNotFound(f"no wallet {refused.detail}")
    if refused.state == "EC409" and refused.detail:
        return refusal_of(refused.detail.split(","),
                          f"transfer of {intent.amount} fen from {intent.from_wallet} to {intent.to_wallet} refused")
    if refused.state == "EC410":
        if not refused.detail:
            return no_key_for(Usage.ECNY)
        key = orjson.loads(refused.detail)
        refusal = signing_refusal(Usage.ECNY, "ecny.key_id", key["key_id"], KeyStatus(key["status"]),
                                  key["status_changed_at"], int(key["version"]), key["family_id"] or key["key_id"])
        if refusal is not None:
            return refusal
    return refused  # a refusal this code does not know: an internal error, never an answer of its own


def record_posted_in(tx: Tx, intent: TransferIntent, entry: AuditEntry, transfer_id: str, entry_id: str) -> None:
    """What commits with a transfer the server posts: its risk signal and its audit entry (queued)."""
    record_signal_in(tx, "transfer.posted", intent.from_wallet, intent.amount, actor=entry.actor,
                     counterparty=intent.to_wallet, transfer_id=transfer_id, entry_id=entry_id)
    entry.result = {"transfer_id": transfer_id, "from": intent.from_wallet, "to": intent.to_wallet,
                    "amount_fen": intent.amount, "entry_id": entry_id}
    append(tx, [entry])


def posted_row(intent: TransferIntent, actor: str, made: tuple[str, str, str, int, bytes, bytes], seq: int,
               key: KeyRecord | None) -> dict[str, Any]:
    """The row of a transfer the server posted (as :meth:`Wallets.transfer_in` returns it, not read back):
    ``made`` is what the gateway made for it (transfer id, entry id, time, epoch ms, the payload around
    ``seq``); ``key``, the active e-CNY key read with it (None when a key family is pinned)."""
    transfer_id, entry_id, now, ts, head, tail = made
    return {"transfer_id": transfer_id, "from_wallet": intent.from_wallet, "to_wallet": intent.to_wallet,
            "amount": intent.amount, "memo": intent.memo, "status": "posted", "entry_id": entry_id,
            "seq": seq, "ts": ts, "payload": head + cbor2.dumps(seq) + tail, "envelope": None, "kid": None,
            "approval_id": None, "requested_by": actor, "created_at": now, ACTIVE_ECNY_KEY: key}


ACTIVE_ECNY_KEY = "active_ecny_key"
"""A row of PostgreSQL's server-side transfer carries the active e-CNY key read with it (the signing step's)."""
ACTIVE_KEY_COLUMNS = (*KEY_COLUMNS, "active_for")


def _awaits_envelope(row: Any) -> bool:
    return bool(row["status"] == "posted" and row["envelope"] is None)


def transfer_status(status: str) -> int:
    """The HTTP-like status of a transfer's answer: 201 once posted, 202 while it waits for a supervisor."""
    return 201 if status == "posted" else 202


@dataclass(frozen=True)
class ToSeal:
    """A transfer as its signing step needs it: the row as recorded, and the e-CNY key chosen in the same
    transaction (None when the row needs no envelope)."""

    row: Any
    key: KeyRecord | None


class TransferSigning:
    """The :class:`~gateway.operations.signed.SigningStep` of transfers: a COSE_Sign1 envelope over the
    payload fixed at posting, with the e-CNY key. The subject is the transfer's row and that key."""

    def __init__(self, wallets: Wallets) -> None:
        self.wallets = wallets

    async def load(self, reference: str) -> ToSeal:
        def read(tx: Tx) -> ToSeal:
            row = Wallets._transfer_row(tx, reference)
            return ToSeal(row, self.wallets.ecny_key_in(tx) if _awaits_envelope(row) else None)

        return await self.wallets.database.read(read)

    def answered(self, subject: ToSeal) -> Answer | None:
        if _awaits_envelope(subject.row):
            return None
        return Answer(transfer_status(subject.row["status"]), transfer_document(subject.row))

    async def sign(self, subject: ToSeal) -> tuple[bytes, str]:
        assert subject.key is not None  # chosen with the row whenever it awaits its envelope
        return await self.wallets.seal(subject.key, bytes(subject.row["payload"]))

    def store_in(self, tx: Tx, subject: ToSeal, signature: tuple[bytes, str]) -> Stored:
        row = subject.row
        envelope, kid = signature
        transfer_id = row["transfer_id"]
        tx.queue("UPDATE transfers SET envelope = ?, kid = ? WHERE transfer_id = ? AND envelope IS NULL",
                 (envelope, kid, transfer_id))
        document = transfer_document({**row, "envelope": envelope, "kid": kid})
        return Stored(Answer(transfer_status(document["status"]), document),
                      "SELECT 1 FROM transfers WHERE transfer_id = ? AND envelope = ?", (transfer_id, envelope))


def transfer_document(row: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "transfer_id": row["transfer_id"],
        "from_wallet": row["from_wallet"],
        "to_wallet": row["to_wallet"],
        "amount_fen": int(row["amount"]),
        "memo": row["memo"],
        "status": row["status"],
        "created_at": row["created_at"],
    }
    if row["approval_id"]:
        document["approval_id"] = row["approval_id"]
    if row["envelope"] is not None:
        document["envelope"] = base64.b64encode(bytes(row["envelope"])).decode()
        document["kid"] = row["kid"]
    if row["seq"] is not None:
        document["seq"] = int(row["seq"])
    return document


WALLET_APPROVAL_KINDS = ("transfer", "cash_in", "cash_out", "wallet_tier")


class WalletApprovals:
    """The :class:`~gateway.approvals.workflow.ApprovalHandler` of transfers, cash-ins, cash-outs and
    tier upgrades: each is checked again against the policy as it stands and carried out as requested."""

    def __init__(self, wallets: Wallets) -> None:
        self.wallets = wallets

    def execute_in(self, tx: Tx, approval: Row, payload: dict[str, Any], entry: AuditEntry) -> dict[str, Any]:
        wallets = self.wallets
        kind = approval["kind"]
        if kind == "transfer":
            return self._transfer_in(tx, approval, payload, entry)
        executed = execution_entry(approval, entry, {"cash_in": "wallets.cash_in", "cash_out": "wallets.cash_out",
                                                     "wallet_tier": "wallets.tier"}[kind])
        if kind == "wallet_tier":
            document = wallets.set_tier_in(tx, payload["wallet_id"], int(payload["tier"]), executed, approved=True)
            return {"wallet_id": document["wallet_id"], "tier": document["tier"]}
        operation = wallets.cash_in if kind == "cash_in" else wallets.cash_out
        return operation(tx, payload["wallet_id"], int(payload["amount_fen"]), approval["requested_by"], executed,
                         approved=True)

    def _transfer_in(self, tx: Tx, approval: Row, payload: dict[str, Any], entry: AuditEntry) -> dict[str, Any]:
        transfer_id = payload["transfer_id"]
        intent = TransferIntent(payload["from_wallet"], payload["to_wallet"], payload["amount_fen"], payload["memo"])
        try:
            self.wallets._check_transfer(tx, intent)  # reads and locks only: nothing to undo if it refuses
        except PolicyRefused:
            tx.execute("UPDATE transfers SET status = 'failed' WHERE transfer_id = ?", (transfer_id,))
            raise
        posted = self.wallets._post_transfer(tx, transfer_id, intent, approval["requested_by"])
        tx.execute(
            "UPDATE transfers SET status = 'posted', entry_id = ?, seq = ?, ts = ?, payload = ? WHERE transfer_id = ?",
            (posted["entry_id"], posted["seq"], posted["ts"], posted["payload"], transfer_id),
        )
        entry.result["entry_id"] = posted["entry_id"]
        return {"transfer_id": transfer_id, "status": "posted"}

    def reject_in(self, tx: Tx, approval: Row, payload: dict[str, Any]) -> None:
        if approval["kind"] == "transfer":
            tx.execute("UPDATE transfers SET status = 'rejected' WHERE transfer_id = ?", (payload["transfer_id"],))

    def expire_in(self, tx: Tx, approval: Row, payload: dict[str, Any]) -> None:
        if approval["kind"] == "transfer":
            tx.execute("UPDATE transfers SET status = 'expired' WHERE transfer_id = ?", (payload["transfer_id"],))

    async def finish(self, document: dict[str, Any]) -> dict[str, Any] | None:
        if document["kind"] == "transfer":
            return await self.wallets.signed_transfer(document["payload"]["transfer_id"])
        return None
