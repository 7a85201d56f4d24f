"""EIP-712 signing under the same policy as transactions; also the approval handler of kind ``evm_typed_data``.

A signed EIP-2612 permit or EIP-3009 authorisation moves tokens as surely as a transaction, without
a fee and without a nonce of ours. So ``POST /v1/evm/typed-data`` reads a document into what it does
(:func:`gateway.policy.evm.read_typed_data`) and refuses everything it cannot read, then:

1. One write transaction, under the lock of the (chain, address) that transactions use: the decoded
   intent meets the token's per-transaction and daily caps and the recipient lists with today's
   spend; the request is recorded with its digest and the audit entry. Below the token's approval
   threshold the amount counts against the day at once and the request waits only for its
   signature; above it (and always for a type the config lists without decoding) it waits for a
   supervisor, and counts when approved.
2. After commit the HSM signs the digest; the signature is normalised to low-S and stored.

An approval re-reads the stored document against the registry as configured now (caps count the day
of the decision), so what is signed is exactly what was shown, and no approval outlives a tightened cap.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from gateway import clock
from gateway.approvals.workflow import canonical_json
from gateway.audit.chain import AuditEntry, append
from gateway.config import Settings
from gateway.errors import ApprovalPayloadMismatch, NotFound, PolicyRefused
from gateway.evm.transactions import ALGORITHM, EvmTransactions, business_day, lock_name
from gateway.keys import KeyDirectory, KeyRecord, Usage, evm_address
from gateway.ledger.store import Database, Tx
from gateway.operations.idempotency import Answer, IdempotentRequest
from gateway.operations.signed import SignedOperation, Stored, ToSign
from gateway.policy import evm as policy
from gateway.policy.chains import EvmChainSettings
from gateway.schemes.evm.eip712 import TypedData, parse_typed_data
from gateway.schemes.evm.signatures import recover_signature
from gateway.signing import Signer
from gateway.wallets.accounts import Wallets

APPROVAL_KIND = "evm_typed_data"


@dataclass(frozen=True)
class TypedDataDraft:
    """A parsed document and the key that is to sign it (no store access yet)."""

    key: KeyRecord
    chain: EvmChainSettings
    document: dict[str, Any]  # the typed-data document as received
    typed: TypedData
    address: str = ""  # EIP-55 address of the key

    def __post_init__(self) -> None:
        if not self.address:
            object.__setattr__(self, "address", evm_address(self.key.public_key))


class TypedDataSigning:
    """The :class:`~gateway.operations.signed.SigningStep` of EIP-712 requests (the subject is the stored
    row). The stored digest must be the digest of the stored document, and the signature must recover
    to the key's public key."""

    def __init__(self, typed_data: EvmTypedData) -> None:
        self.typed_data = typed_data

    async def load(self, reference: str) -> Any:
        return await self.typed_data.database.read(lambda tx: EvmTypedData.row_in(tx, reference))

    def answered(self, row: Any) -> Answer | None:
        return None if row["status"] == "unsigned" else Answer(200, typed_data_document(row))

    async def sign(self, row: Any) -> str:
        typed_data = self.typed_data
        typed = parse_typed_data(json.loads(row["document"]))
        if typed.digest.hex() != row["digest"]:
            raise ApprovalPayloadMismatch(f"request {row['request_id']}: the stored document does not hash to "
                                          "its digest")
        key = await typed_data.keys.for_signing(typed_data.database, row["key_id"], Usage.EVM)
        raw = await typed_data.signer.sign(key.key_id, ALGORITHM, typed.digest)
        return "0x" + recover_signature(typed.digest, raw, key.public_key).rsv().hex()

    def store_in(self, tx: Tx, row: Any, rsv: str) -> Stored:
        tx.queue("UPDATE evm_typed_data SET status = 'signed', signature = ?, signed_at = ? "
                 "WHERE request_id = ? AND status = 'unsigned'", (rsv, clock.now_iso(), row["request_id"]))
        return Stored(Answer(200, typed_data_document({**row, "status": "signed", "signature": rsv})),
                      "SELECT 1 FROM evm_typed_data WHERE request_id = ? AND signature = ?", (row["request_id"], rsv))


def typed_data_document(row: Any) -> dict[str, Any]:
    """The response document of a stored request (signature fields null until it is signed)."""
    typed = parse_typed_data(json.loads(row["document"]))
    signature = row["signature"]
    rsv = bytes.fromhex(signature[2:]) if signature else None
    return {
        "status": row["status"], "request_id": row["request_id"], "chain_id": int(row["chain_id"]),
        "primary_type": row["primary_type"], "verifying_contract": row["verifying_contract"],
        "signer": row["signer"], "digest": "0x" + row["digest"],
        "domain_separator": "0x" + typed.domain_separator.hex(), "message_hash": "0x" + typed.message_hash.hex(),
        "intent": json.loads(row["intent"]) if row["intent"] else None,
        "approval_id": row["approval_id"],
        "signature": signature,
        "r": hex(int.from_bytes(rsv[:32], "big")) if rsv else None,
        "s": hex(int.from_bytes(rsv[32:64], "big")) if rsv else None,
        "v": rsv[64] if rsv else None,
    }


class EvmTypedData:
    """EIP-712 requests of one gateway process; the approval handler of kind ``evm_typed_data``."""

    def __init__(self, database: Database, signer: Signer, settings: Settings, keys: KeyDirectory,
                 wallets: Wallets, transactions: EvmTransactions) -> None:
        self.database = database
        self.signer = signer
        self.settings = settings
        self.keys = keys
        self.wallets = wallets
        self.transactions = transactions  # its daily spend, shared: a permit and a transfer count together
        self.signed = SignedOperation(database, TypedDataSigning(self))

    @staticmethod
    def row_in(tx: Tx, request_id: str) -> Any:
        """The stored row of a request. Raises NotFound."""
        row = tx.fetchone("SELECT * FROM evm_typed_data WHERE request_id = ?", (request_id,))
        if row is None:
            raise NotFound(f"no EIP-712 request {request_id[:40]}")
        return row

    def record_in(self, tx: Tx, draft: TypedDataDraft, entry: AuditEntry) -> Any:
        """Read the document, check the policy with today's spend and record the request — waiting for its
        signature, or for a supervisor. Nothing is written if a check fails.

        Returns:
            The stored row.
        Raises:
            TypedDataDomainNotAllowed, TypedDataNotAllowed, EvmCapExceeded, RecipientNotAllowed, PolicyRefused.
        """
        chain, address, typed = draft.chain, draft.address, draft.typed
        reading = policy.read_typed_data(chain, typed, address)
        tx.lock(lock_name(chain.chain_id, address))
        now = clock.now_iso()
        day = now[:10]
        amounts = None
        if reading.intent is not None:
            amounts = self.transactions.check_in(tx, chain, address, reading.intent, day)
        pending = reading.listed or (reading.intent is not None and policy.needs_approval(chain, reading.intent))
        request_id = "etd_" + secrets.token_hex(12)
        digest = typed.digest.hex()
        intent_document = reading.intent.document() if reading.intent is not None else None
        approval_id = None
        if pending:
            approval_id = self.wallets.approvals.request_in(tx, APPROVAL_KIND, {
                "request_id": request_id, "key_id": draft.key.key_id, "signer": address, "chain_id": chain.chain_id,
                "chain": chain.name, "primary_type": reading.primary_type,
                "verifying_contract": reading.verifying_contract, "digest": "0x" + digest,
                "intent": intent_document, "typed_data": draft.document}, entry.actor)
        elif amounts is not None:
            self.transactions.add_spend_in(tx, chain.chain_id, address, amounts, day)
        tx.execute(
            "INSERT INTO evm_typed_data (request_id, chain_id, key_id, signer, primary_type, verifying_contract, "
            "document, digest, intent, business_day, status, approval_id, requested_by, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (request_id, chain.chain_id, draft.key.key_id, address, reading.primary_type, reading.verifying_contract,
             canonical_json(draft.document), digest,
             canonical_json(intent_document) if intent_document is not None else None, day,
             "pending_approval" if pending else "unsigned", approval_id, entry.actor, now))
        entry.key_id = draft.key.key_id
        entry.decision = "pending_approval" if pending else "allowed"
        entry.result = {"request_id": request_id, "chain_id": chain.chain_id, "primary_type": reading.primary_type,
                        "verifying_contract": reading.verifying_contract, "digest": digest,
                        "intent": intent_document}
        if approval_id is not None:
            entry.result["approval_id"] = approval_id
        append(tx, [entry])
        return self.row_in(tx, request_id)

    async def request(self, request: IdempotentRequest | None, draft: TypedDataDraft, entry: AuditEntry) -> Answer:
        """An EIP-712 request as one signed operation: read, checked and recorded (or parked for a
        supervisor: 202), committed, signed and stored with the answer (200)."""

        def record(tx: Tx) -> Answer | ToSign[Any]:
            row = self.record_in(tx, draft, entry)
            if row["status"] == "pending_approval":
                return Answer(202, typed_data_document(row))
            return ToSign(row["request_id"], row)

        return await self.signed.run(request, record)

    async def seal(self, request_id: str) -> dict[str, Any]:
        """Sign a recorded request unless it is signed already (or waits, or was refused); return its document."""
        document: dict[str, Any] = (await self.signed.reference(request_id)).document
        return document

    # --- approvals (ApprovalHandler) -----------------------------------------------------------

    def execute_in(self, tx: Tx, approval: Any, payload: dict[str, Any], entry: AuditEntry) -> dict[str, Any]:
        """Approve: the stored document must still hash to the approved digest and pass the policy as
        configured now (a decoded intent's caps count today's spend); it then waits only for its signature.

        Raises:
            PolicyRefused: the policy refuses it now; the request fails.
            ApprovalPayloadMismatch: the stored request is not the one approved.
        """
        row = self.row_in(tx, payload["request_id"])
        chain_id, address = int(row["chain_id"]), row["signer"]
        tx.lock(lock_name(chain_id, address))
        row = self.row_in(tx, payload["request_id"])
        if row["status"] != "pending_approval":
            raise ApprovalPayloadMismatch(f"request {row['request_id']} is {row['status']}")
        typed = parse_typed_data(json.loads(row["document"]))
        if "0x" + typed.digest.hex() != payload["digest"] or typed.digest.hex() != row["digest"]:
            raise ApprovalPayloadMismatch("the stored document does not hash to the approved digest")
        day = business_day()
        try:
            chain = policy.require_chain(self.settings.evm, chain_id)
            reading = policy.read_typed_data(chain, typed, address)
            if reading.intent is not None:
                amounts = self.transactions.check_in(tx, chain, address, reading.intent, day)
                self.transactions.add_spend_in(tx, chain_id, address, amounts, day)
        except PolicyRefused:
            tx.execute("UPDATE evm_typed_data SET status = 'failed' WHERE request_id = ?", (row["request_id"],))
            raise
        tx.execute("UPDATE evm_typed_data SET status = 'unsigned', business_day = ? WHERE request_id = ?",
                   (day, row["request_id"]))
        entry.key_id = row["key_id"]
        return {"request_id": row["request_id"], "status": "approved", "digest": "0x" + row["digest"]}

    def reject_in(self, tx: Tx, approval: Any, payload: dict[str, Any]) -> None:
        """Reject: the request is never signed (nothing was counted against the day)."""
        tx.execute("UPDATE evm_typed_data SET status = 'rejected' WHERE request_id = ? AND status = 'pending_approval'",
                   (payload["request_id"],))

    def expire_in(self, tx: Tx, approval: Any, payload: dict[str, Any]) -> None:
        """Expired undecided: the request is never signed (nothing was counted against the day)."""
        tx.execute("UPDATE evm_typed_data SET status = 'expired' WHERE request_id = ? AND status = 'pending_approval'",
                   (payload["request_id"],))

    async def finish(self, document: dict[str, Any]) -> dict[str, Any] | None:
        """After an approval executed: sign (once) and return the signed request's document."""
        return await self.seal(document["payload"]["request_id"])
