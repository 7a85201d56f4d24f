"""EVM transactions: check and record with a gap-free nonce in one store transaction, sign after commit.

One request (``POST /v1/evm/transactions``):

1. The body is parsed into an :class:`~gateway.schemes.evm.transactions.UnsignedTransaction` minus its nonce, and
   its decoded :class:`~gateway.policy.evm.Intent` (pure, no store).
2. One write transaction, holding the lock of the (chain, address): expire stale approvals and free
   their nonces; read the day's spend; evaluate the policy (the fee caps, and the most the fees can
   cost counted against the native coin's caps) — a refusal rolls everything back, so a
   refused request consumes no nonce —; allocate the nonce (the lowest freed one, else the next);
   record the unsigned transaction, its signing hash, the spend, the audit entry and the
   idempotency record (a reference to the transaction) — all or nothing.
3. After commit, the HSM signs the signing hash; the signature is normalised to low-S, its recovery
   id found by public-key recovery, and the raw transaction stored. The HSM round trip never holds
   the lock. A crash between 2 and 3 leaves an ``unsigned`` row that the next replay of the same
   Idempotency-Key (or the approval's result) signs: the nonce is fixed, so the retry gets the same
   transaction, never a second nonce.

Above the approval threshold, step 2 records the transaction as ``pending_approval`` (its nonce
allocated, so the supervisor approves the exact signing hash) and a supervisor's approval signs it.
A rejected, expired or failed approval returns its never-signed nonce to the free list, and the
next request for the address takes it: no nonce is skipped, none is signed twice.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway import clock
from gateway.approvals.workflow import canonical_json
from gateway.audit.chain import AuditEntry, append
from gateway.config import Settings
from gateway.errors import (
    ApprovalPayloadMismatch,
    InvalidEvmTransaction,
    NonceConflict,
    NotFound,
    PolicyRefused,
    UnknownToken,
)
from gateway.keys import KeyDirectory, KeyRecord, Usage, evm_address
from gateway.ledger.store import Database, Tx
from gateway.operations.idempotency import Answer, IdempotentRequest
from gateway.operations.signed import SignedOperation, Stored, ToSign
from gateway.policy import evm as policy
from gateway.policy.chains import EvmChainSettings
from gateway.policy.evm import Intent
from gateway.risk.signals import record_signal_in
from gateway.schemes.evm.transactions import (
    MAX_NONCE,
    Fees,
    SignedTransaction,
    UnsignedTransaction,
    finish_transaction,
)
from gateway.signing import Signer
from gateway.wallets.accounts import Wallets

APPROVAL_KIND = "evm_transaction"
ALGORITHM = "ecdsa-secp256k1"
LIVE = ("unsigned", "signed", "pending_approval")


@dataclass(frozen=True)
class Draft:
    """A checked transaction waiting for its nonce: everything else is fixed."""

    key: KeyRecord
    chain: EvmChainSettings
    unsigned: UnsignedTransaction  # its nonce is a placeholder until allocated
    intent: Intent
    nonce: int | None  # the caller's explicit nonce, if any
    address: str = ""  # EIP-55 address of the key (derived when not given)

    def __post_init__(self) -> None:
        if not self.address:
            object.__setattr__(self, "address", evm_address(self.key.public_key))


@dataclass(frozen=True)
class Recorded:
    """A transaction as :meth:`EvmTransactions.record_in` recorded it."""

    unsigned: UnsignedTransaction
    row: dict[str, Any]
    """The row as inserted (not read back), for its answer."""

    @property
    def transaction_id(self) -> str:
        return str(self.row["transaction_id"])

    @property
    def status(self) -> str:
        """``unsigned`` or ``pending_approval``."""
        return str(self.row["status"])

    @property
    def nonce(self) -> int:
        return int(self.row["nonce"])


def business_day() -> str:
    """The UTC day amounts count against (EVM chains know no business days)."""
    return clock.now_iso()[:10]


def lock_name(chain_id: int, address: str) -> str:
    """The lock held while an address's nonces and daily spend are read and written."""
    return f"evm:{chain_id}:{address}"


def transaction_document(row: Any) -> dict[str, Any]:
    """The response document of a stored transaction."""
    unsigned = json.loads(row["unsigned_tx"])
    document: dict[str, Any] = {
        "status": row["status"],
        "transaction_id": row["transaction_id"],
        "chain_id": int(row["chain_id"]),
        "type": row["tx_type"],
        "from": row["from_address"],
        "nonce": int(row["nonce"]),
        "signing_hash": "0x" + row["signing_hash"],
        "transaction": unsigned,
        "intent": json.loads(row["intent"]),
    }
    if row["approval_id"]:
        document["approval_id"] = row["approval_id"]
    if row["raw_transaction"] is not None:
        document["raw_transaction"] = "0x" + bytes(row["raw_transaction"]).hex()
        document["tx_hash"] = row["tx_hash"]
    return document


@dataclass(frozen=True)
class ToSignTransaction:
    """A transaction recorded and committed, as the signing step sees it; ``document`` when it is not
    ``unsigned`` any more (signed already, pending, superseded...): nothing to sign."""

    transaction_id: str
    unsigned: UnsignedTransaction | None
    key: KeyRecord | None
    row: Any = None
    """The row as recorded, while it waits for its signature."""
    document: dict[str, Any] | None = None


def _transaction_answer(document: dict[str, Any]) -> Answer:
    # Only a signed transaction is an answer to record: any other status is answered 409, not kept.
    return Answer(200, document, final=document["status"] == "signed")


def _require_signed(answer: Answer) -> Answer:
    """Raises NonceConflict for a transaction that will not be signed (e.g. superseded meanwhile)."""
    if answer.status == 200 and not answer.final:
        transaction_id = answer.document["transaction_id"]
        raise NonceConflict(f"transaction {transaction_id} is {answer.document['status']} and will not be signed",
                            transaction_id=transaction_id)
    return answer


class TransactionSigning:
    """The :class:`~gateway.operations.signed.SigningStep` of EVM transactions. Before a recorded
    transaction is signed, its stored signing hash must be the hash of its stored fields; the signature
    must recover to the key's public key."""

    def __init__(self, transactions: EvmTransactions) -> None:
        self.transactions = transactions

    async def load(self, reference: str) -> ToSignTransaction:
        transactions = self.transactions
        row = await transactions.database.read(lambda tx: transactions.row_in(tx, reference))
        if row["status"] != "unsigned":
            return ToSignTransaction(reference, None, None, document=transaction_document(row))
        unsigned = UnsignedTransaction.from_json(json.loads(row["unsigned_tx"]))
        if unsigned.signing_hash().hex() != row["signing_hash"]:
            raise InvalidEvmTransaction(f"transaction {reference}: stored fields do not match the signing hash")
        return ToSignTransaction(reference, unsigned, await transactions.keys.for_signing(
            transactions.database, row["key_id"], Usage.EVM), row)

    def answered(self, subject: ToSignTransaction) -> Answer | None:
        return None if subject.document is None else _transaction_answer(subject.document)

    async def sign(self, subject: ToSignTransaction) -> SignedTransaction:
        assert subject.unsigned is not None and subject.key is not None
        return await self.transactions.sign_recorded(subject.transaction_id, subject.unsigned, subject.key)

    def store_in(self, tx: Tx, subject: ToSignTransaction, signed: SignedTransaction) -> Stored:
        tx_hash = "0x" + signed.tx_hash.hex()
        tx.queue("UPDATE evm_transactions SET status = 'signed', raw_transaction = ?, tx_hash = ?, signed_at = ? "
                 "WHERE transaction_id = ? AND status = 'unsigned'",
                 (signed.raw, tx_hash, clock.now_iso(), subject.transaction_id))
        document = transaction_document({**subject.row, "status": "signed", "raw_transaction": signed.raw,
                                         "tx_hash": tx_hash})
        return Stored(_transaction_answer(document),
                      "SELECT 1 FROM evm_transactions WHERE transaction_id = ? AND raw_transaction = ?",
                      (subject.transaction_id, signed.raw))


class EvmTransactions:
    """EVM signing for one gateway process; also the approval handler of kind ``evm_transaction``."""

    def __init__(self, database: Database, signer: Signer, settings: Settings, keys: KeyDirectory,
                 wallets: Wallets) -> None:
        self.database = database
        self.signer = signer
        self.settings = settings
        self.keys = keys
        self.wallets = wallets
        self.signed = SignedOperation(database, TransactionSigning(self))

    # --- nonces ----------------------------------------------------------------------------

    @staticmethod
    def _next_nonce(tx: Tx, chain_id: int, address: str) -> int | None:
        row = tx.fetchone("SELECT next_nonce FROM evm_nonces WHERE chain_id = ? AND address = ?", (chain_id, address))
        return None if row is None else int(row["next_nonce"])

    @staticmethod
    def _store_next(tx: Tx, chain_id: int, address: str, next_nonce: int, exists: bool) -> None:
        if exists:
            tx.execute("UPDATE evm_nonces SET next_nonce = ?, updated_at = ? WHERE chain_id = ? AND address = ?",
                       (next_nonce, clock.now_iso(), chain_id, address))
        else:
            tx.execute("INSERT INTO evm_nonces (chain_id, address, next_nonce, updated_at) VALUES (?, ?, ?, ?)",
                       (chain_id, address, next_nonce, clock.now_iso()))

    def allocate_in(self, tx: Tx, chain_id: int, address: str, requested: int | None) -> int:
        """The nonce for a new transaction of ``address`` (the caller holds the address's lock).

        Without ``requested``: the lowest freed nonce, else the next one. With it: it must be a freed
        nonce or exactly the next one.

        Raises:
            NonceConflict: ``requested`` is already used, or would leave a gap.
        """
        stored = self._next_nonce(tx, chain_id, address)
        next_nonce = stored or 0
        free = [int(row["nonce"]) for row in tx.fetchall(
            "SELECT nonce FROM evm_free_nonces WHERE chain_id = ? AND address = ? ORDER BY nonce LIMIT 1000",
            (chain_id, address))]
        if requested is None:
            nonce = free[0] if free else next_nonce
        elif requested in free or requested == next_nonce:
            nonce = requested
        elif requested < next_nonce:
            raise NonceConflict(f"nonce {requested} of {address} on chain {chain_id} is already used; "
                                f"the next is {next_nonce}", next_nonce=next_nonce)
        else:
            raise NonceConflict(f"nonce {requested} of {address} on chain {chain_id} would leave a gap; "
                                f"the next is {next_nonce}", next_nonce=next_nonce)
        if nonce in free:
            tx.execute("DELETE FROM evm_free_nonces WHERE chain_id = ? AND address = ? AND nonce = ?",
                       (chain_id, address, nonce))
        else:
            if nonce >= MAX_NONCE:
                raise NonceConflict(f"the nonces of {address} on chain {chain_id} are exhausted")
            self._store_next(tx, chain_id, address, nonce + 1, stored is not None)
        return nonce

    def next_nonce_in(self, tx: Tx, chain_id: int, address: str) -> int:
        """The nonce the next transaction of ``address`` would get now (the lowest freed one, else the
        next): what a node's transaction count is compared with (read only)."""
        row = tx.fetchone("SELECT MIN(nonce) AS nonce FROM evm_free_nonces WHERE chain_id = ? AND address = ?",
                          (chain_id, address))
        if row is not None and row["nonce"] is not None:
            return int(row["nonce"])
        return self._next_nonce(tx, chain_id, address) or 0

    @staticmethod
    def _free_nonce(tx: Tx, chain_id: int, address: str, nonce: int) -> None:
        tx.execute("INSERT INTO evm_free_nonces (chain_id, address, nonce) VALUES (?, ?, ?)",
                   (chain_id, address, nonce))

    def _sweep_in(self, tx: Tx, chain_id: int, address: str, now: str) -> None:
        """Close transactions whose approval ended without executing them, and free their nonces."""
        rows = tx.fetchall(
            "SELECT t.transaction_id, t.nonce, a.approval_id, a.status AS approval_status, a.expires_at "
            "FROM evm_transactions t JOIN approvals a ON a.approval_id = t.approval_id "
            "WHERE t.chain_id = ? AND t.from_address = ? AND t.status = 'pending_approval'", (chain_id, address))
        for row in rows:
            state = row["approval_status"]
            if state == "executed" or (state == "pending" and row["expires_at"] > now):
                continue
            if state == "pending":
                tx.execute("UPDATE approvals SET status = 'expired', decided_at = ? WHERE approval_id = ? "
                           "AND status = 'pending'", (now, row["approval_id"]))
            status = {"rejected": "rejected", "failed": "failed"}.get(state, "expired")
            tx.execute("UPDATE evm_transactions SET status = ? WHERE transaction_id = ?",
                       (status, row["transaction_id"]))
            self._free_nonce(tx, chain_id, address, int(row["nonce"]))

    def set_next_nonce_in(self, tx: Tx, chain_id: int, address: str, next_nonce: int,
                          entry: AuditEntry) -> dict[str, Any]:
        """Set the next nonce of an address (admin: e.g. after transactions were dropped from the mempool,
        or to adopt an address already used elsewhere). Transactions recorded with a nonce at or above it
        that were never mined are marked ``superseded`` (and never signed, if they were not yet); the free
        list is cleared.

        Raises:
            NonceConflict: a transaction at or above ``next_nonce`` is waiting for a supervisor.
        """
        tx.lock(lock_name(chain_id, address))
        self._sweep_in(tx, chain_id, address, clock.now_iso())
        waiting = tx.fetchall(
            "SELECT transaction_id FROM evm_transactions WHERE chain_id = ? AND from_address = ? AND nonce >= ? "
            "AND status = 'pending_approval'", (chain_id, address, next_nonce))
        if waiting:
            raise NonceConflict(f"{len(waiting)} transaction(s) at or above nonce {next_nonce} await approval; "
                                "reject them first", transactions=[row["transaction_id"] for row in waiting])
        superseded = [row["transaction_id"] for row in tx.fetchall(
            "SELECT transaction_id FROM evm_transactions WHERE chain_id = ? AND from_address = ? AND nonce >= ? "
            "AND status IN ('unsigned', 'signed') ORDER BY nonce", (chain_id, address, next_nonce))]
        tx.execute("UPDATE evm_transactions SET status = 'superseded' WHERE chain_id = ? AND from_address = ? "
                   "AND nonce >= ? AND status IN ('unsigned', 'signed')", (chain_id, address, next_nonce))
        tx.execute("DELETE FROM evm_free_nonces WHERE chain_id = ? AND address = ?", (chain_id, address))
        previous = self._next_nonce(tx, chain_id, address)
        self._store_next(tx, chain_id, address, next_nonce, previous is not None)
        result = {"chain_id": chain_id, "address": address, "next_nonce": next_nonce,
                  "previous_next_nonce": previous or 0, "superseded": superseded}
        entry.result = dict(result)
        append(tx, [entry])
        record_signal_in(tx, "evm.nonce_set", address, actor=entry.actor, chain_id=chain_id, next_nonce=next_nonce,
                         previous_next_nonce=previous or 0, superseded=len(superseded))
        return result

    # --- recording -------------------------------------------------------------------------

    @staticmethod
    def spent_in(tx: Tx, chain_id: int, address: str, assets: Iterable[str], day: str) -> dict[str, int]:
        """What ``address`` has signed today per asset (base units), for the daily caps."""
        spent = {}
        for asset in assets:
            row = tx.fetchone("SELECT amount FROM evm_spend WHERE chain_id = ? AND address = ? AND asset = ? "
                              "AND business_day = ?", (chain_id, address, asset, day))
            spent[asset] = 0 if row is None else int(row["amount"])
        return spent

    @staticmethod
    def add_spend_in(tx: Tx, chain_id: int, address: str, amounts: Mapping[str, int], day: str) -> None:
        """Count ``amounts`` (per asset) against the day's caps of ``address``."""
        for asset, amount in amounts.items():
            row = tx.fetchone("SELECT amount FROM evm_spend WHERE chain_id = ? AND address = ? AND asset = ? "
                              "AND business_day = ?", (chain_id, address, asset, day))
            if row is None:
                tx.execute("INSERT INTO evm_spend (chain_id, address, asset, business_day, amount) "
                           "VALUES (?, ?, ?, ?, ?)", (chain_id, address, asset, day, str(amount)))
            else:
                tx.execute("UPDATE evm_spend SET amount = ? WHERE chain_id = ? AND address = ? AND asset = ? "
                           "AND business_day = ?", (str(int(row["amount"]) + amount), chain_id, address, asset, day))

    def check_in(self, tx: Tx, chain: EvmChainSettings, address: str, intent: Intent, day: str,
                 fees: Fees | None = None) -> dict[str, int]:
        """Refuse unless the intent (and the fees, when a transaction pays them) passes the policy with
        today's spend; return what signing spends per asset, for :meth:`add_spend_in`.

        Raises:
            EvmFeeCapExceeded, EvmCapExceeded, RecipientNotAllowed, PolicyRefused.
        """
        fee = fees.max_total if fees is not None else 0
        amounts = policy.spending(intent, fee)
        spent = self.spent_in(tx, chain.chain_id, address, amounts, day)
        decisions = [policy.evaluate(chain, intent, spent, fee)]
        if fees is not None:
            decisions.insert(0, policy.check_fee_caps(chain, fees))
        policy.refuse(decisions, f"{intent.method} of {intent.amount} {intent.symbol} base units on chain "
                                 f"{chain.chain_id} refused")
        return amounts

    def record_in(self, tx: Tx, draft: Draft, entry: AuditEntry) -> Recorded:
        """Check the policy, allocate the nonce and record the unsigned transaction — or park it for a
        supervisor above the threshold. Nothing is written if any check fails.

        Raises:
            PolicyRefused (and subclasses), NonceConflict.
        """
        chain_id, address = draft.chain.chain_id, draft.address
        tx.lock(lock_name(chain_id, address))
        now = clock.now_iso()
        self._sweep_in(tx, chain_id, address, now)
        day = now[:10]
        amounts = self.check_in(tx, draft.chain, address, draft.intent, day, draft.unsigned.fees)
        nonce = self.allocate_in(tx, chain_id, address, draft.nonce)
        unsigned = UnsignedTransaction(draft.unsigned.tx_type, chain_id, nonce, draft.unsigned.fees,
                                       draft.unsigned.to, draft.unsigned.value, draft.unsigned.data)
        signing_hash = unsigned.signing_hash().hex()
        transaction_id = "etx_" + secrets.token_hex(12)
        pending = policy.needs_approval(draft.chain, draft.intent)
        intent_document = draft.intent.document()
        unsigned_document = unsigned.to_json()
        approval_id = None
        if pending:
            approval_id = self.wallets.approvals.request_in(tx, APPROVAL_KIND, {
                "transaction_id": transaction_id, "key_id": draft.key.key_id, "from": address,
                "chain_id": chain_id, "chain": draft.chain.name, "signing_hash": "0x" + signing_hash,
                "transaction": unsigned_document, "intent": intent_document,
                "max_fee": str(unsigned.fees.max_total)}, entry.actor)
        else:
            self.add_spend_in(tx, chain_id, address, amounts, day)
        status = "pending_approval" if pending else "unsigned"
        row: dict[str, Any] = {
            "transaction_id": transaction_id, "chain_id": chain_id, "key_id": draft.key.key_id,
            "from_address": address, "nonce": nonce, "tx_type": unsigned.tx_type,
            "unsigned_tx": canonical_json(unsigned_document), "signing_hash": signing_hash,
            "intent": canonical_json(intent_document), "asset": draft.intent.asset, "amount": str(draft.intent.amount),
            "business_day": day, "status": status, "approval_id": approval_id, "requested_by": entry.actor,
            "created_at": now}
        tx.execute(f"INSERT INTO evm_transactions ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                   tuple(row.values()))
        entry.key_id = draft.key.key_id
        entry.decision = "pending_approval" if pending else "allowed"
        entry.result = {"transaction_id": transaction_id, "chain_id": chain_id, "from": address, "nonce": nonce,
                        "signing_hash": signing_hash, "intent": intent_document}
        if approval_id is not None:
            entry.result["approval_id"] = approval_id
        append(tx, [entry])
        record_signal_in(tx, "evm.transaction", address, actor=entry.actor, counterparty=draft.intent.recipient or "",
                         transaction_id=transaction_id, chain_id=chain_id, asset=draft.intent.asset,
                         symbol=draft.intent.symbol, decimals=draft.intent.decimals, amount=str(draft.intent.amount),
                         status=status)
        return Recorded(unsigned, {**row, "raw_transaction": None, "tx_hash": None, "signed_at": None})

    # --- signing after commit ----------------------------------------------------------------

    @staticmethod
    def row_in(tx: Tx, transaction_id: str) -> Any:
        """The stored row of a transaction. Raises NotFound."""
        row = tx.fetchone("SELECT * FROM evm_transactions WHERE transaction_id = ?", (transaction_id,))
        if row is None:
            raise NotFound(f"no EVM transaction {transaction_id[:40]}")
        return row

    async def transact(self, request: IdempotentRequest | None, draft: Draft, entry: AuditEntry) -> Answer:
        """A transaction as one signed operation: checked and recorded with its nonce (or parked for a
        supervisor: 202), committed, signed and stored with the answer (200).

        Raises:
            PolicyRefused (and subclasses), NonceConflict (also when the recorded transaction was
            superseded before it could be signed).
        """

        def record(tx: Tx) -> Answer | ToSign[ToSignTransaction]:
            recorded = self.record_in(tx, draft, entry)
            if recorded.status == "pending_approval":
                return Answer(202, transaction_document(recorded.row))
            return ToSign(recorded.transaction_id,
                          ToSignTransaction(recorded.transaction_id, recorded.unsigned, draft.key, recorded.row))

        return _require_signed(await self.signed.run(request, record))

    async def resume(self, reference: str, request: IdempotentRequest | None) -> Answer:
        """A replay meeting a transaction recorded but not signed (a crash between commit and signing):
        sign that same transaction — same nonce — and answer as the first request would have."""
        return _require_signed(await self.signed.resume(reference, request))

    async def seal(self, transaction_id: str) -> dict[str, Any]:
        """Sign a recorded transaction if it is not signed yet; return its document (an approval, a test)."""
        document: dict[str, Any] = (await self.signed.reference(transaction_id)).document
        return document

    async def sign_recorded(self, transaction_id: str, unsigned: UnsignedTransaction,
                            key: KeyRecord) -> SignedTransaction:
        """Step 3 of a transaction: the HSM signs the signing hash; the signature is normalised to low-S
        and must recover to the key's public key (``finish_transaction``)."""
        signature = await self.signer.sign(key.key_id, ALGORITHM, unsigned.signing_hash())
        return finish_transaction(unsigned, signature, key.public_key)

    # --- approvals (ApprovalHandler) -----------------------------------------------------------

    def execute_in(self, tx: Tx, approval: Any, payload: dict[str, Any], entry: AuditEntry) -> dict[str, Any]:
        """Approve: the stored transaction must still hash to the approved signing hash and pass the policy
        as configured now (caps count today's spend); it then waits only for its signature.

        Raises:
            PolicyRefused: the policy refuses it now; the transaction fails and its nonce is freed.
            ApprovalPayloadMismatch: the stored transaction is not the one approved.
        """
        row = self.row_in(tx, payload["transaction_id"])
        chain_id, address = int(row["chain_id"]), row["from_address"]
        tx.lock(lock_name(chain_id, address))
        row = self.row_in(tx, payload["transaction_id"])
        unsigned = UnsignedTransaction.from_json(json.loads(row["unsigned_tx"]))
        signing_hash = unsigned.signing_hash().hex()
        if row["status"] != "pending_approval":
            raise ApprovalPayloadMismatch(f"transaction {row['transaction_id']} is {row['status']}")
        if "0x" + signing_hash != payload["signing_hash"] or signing_hash != row["signing_hash"]:
            raise ApprovalPayloadMismatch("the stored transaction does not hash to the approved signing hash")
        intent_document = json.loads(row["intent"])
        try:
            chain = policy.require_chain(self.settings.evm, chain_id)
            intent = _intent_from_document(chain, intent_document)
            day = business_day()
            amounts = self.check_in(tx, chain, address, intent, day, unsigned.fees)
        except PolicyRefused:
            tx.execute("UPDATE evm_transactions SET status = 'failed' WHERE transaction_id = ?",
                       (row["transaction_id"],))
            self._free_nonce(tx, chain_id, address, int(row["nonce"]))
            raise
        self.add_spend_in(tx, chain_id, address, amounts, day)
        tx.execute("UPDATE evm_transactions SET status = 'unsigned', business_day = ? WHERE transaction_id = ?",
                   (day, row["transaction_id"]))
        entry.key_id = row["key_id"]
        return {"transaction_id": row["transaction_id"], "status": "approved", "nonce": int(row["nonce"]),
                "signing_hash": "0x" + signing_hash}

    def reject_in(self, tx: Tx, approval: Any, payload: dict[str, Any]) -> None:
        """Reject: the transaction is never signed and its nonce returns to the free list."""
        row = self.row_in(tx, payload["transaction_id"])
        chain_id, address = int(row["chain_id"]), row["from_address"]
        tx.lock(lock_name(chain_id, address))
        if tx.execute("UPDATE evm_transactions SET status = 'rejected' WHERE transaction_id = ? "
                      "AND status = 'pending_approval'", (row["transaction_id"],)):
            self._free_nonce(tx, chain_id, address, int(row["nonce"]))

    def expire_in(self, tx: Tx, approval: Any, payload: dict[str, Any]) -> None:
        """Expired undecided: the transaction is never signed and its nonce returns to the free list."""
        row = self.row_in(tx, payload["transaction_id"])
        chain_id, address = int(row["chain_id"]), row["from_address"]
        tx.lock(lock_name(chain_id, address))
        if tx.execute("UPDATE evm_transactions SET status = 'expired' WHERE transaction_id = ? "
                      "AND status = 'pending_approval'", (row["transaction_id"],)):
            self._free_nonce(tx, chain_id, address, int(row["nonce"]))

    async def finish(self, document: dict[str, Any]) -> dict[str, Any] | None:
        """After an approval executed: sign (once) and return the signed transaction document."""
        return await self.seal(document["payload"]["transaction_id"])


def _intent_from_document(chain: EvmChainSettings, document: dict[str, Any]) -> Intent:
    """Rebuild an intent recorded earlier, against the registry as configured now."""
    asset = document["asset"]
    if asset != policy.NATIVE and chain.token(asset) is None:
        raise UnknownToken(f"token {asset} is no longer registered on chain {chain.chain_id}", ["unknown-token"])
    return Intent(chain.chain_id, asset, document["symbol"], int(document["decimals"]), document["method"],
                  document["recipient"], int(document["amount"]))
