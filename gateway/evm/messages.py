"""EIP-191 personal messages (``personal_sign``, ``eth_sign``): the one place they are signed.

A personal message is what dapps ask a wallet to sign for a log-in (SIWE), an off-chain order or a
consent. The HSM never signs the caller's bytes or a caller's hash: it signs
``keccak256("\\x19Ethereum Signed Message:\\n" ‖ len(message) ‖ message)``, whose prefix no transaction
(RLP) and no EIP-712 digest (``0x19 0x01``) can start with, so a signed message is never a signed
transaction or permit. Only keys of usage ``message`` sign them: such a message may still be honoured by
some contract as an authorisation, and the gateway cannot read it, so a key gets the usage on purpose.

Like every signed operation (:mod:`gateway.operations.signed`): the message, its digest and the audit
entry are recorded in one store transaction, and the HSM signs after commit; the signature is normalised
to low-S and must recover to the key (``recover_signature``).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from eth_hash.auto import keccak

from gateway import clock
from gateway.audit.chain import AuditEntry, append
from gateway.errors import ApprovalPayloadMismatch, NotFound
from gateway.evm.transactions import ALGORITHM
from gateway.keys import KeyDirectory, KeyRecord, Usage, evm_address
from gateway.ledger.store import Database, Tx
from gateway.operations.idempotency import Answer, IdempotentRequest
from gateway.operations.signed import SignedOperation, Stored, ToSign
from gateway.schemes.evm.signatures import recover_signature
from gateway.signing import Signer

MAX_MESSAGE_BYTES = 64 * 1024
"""Largest message signed: a SIWE text or an order is a few hundred bytes."""

MessageMethod = Literal["personal_sign", "eth_sign"]


def eip191_digest(message: bytes) -> bytes:
    """``keccak256("\\x19Ethereum Signed Message:\\n" ‖ decimal length ‖ message)`` (EIP-191 version 0x45)."""
    return bytes(keccak(b"\x19Ethereum Signed Message:\n" + str(len(message)).encode() + message))


@dataclass(frozen=True)
class MessageDraft:
    """A message to sign and the key that is to sign it (the key's usage checked by the caller)."""

    key: KeyRecord
    method: MessageMethod
    message: bytes

    def __post_init__(self) -> None:
        self.key.require(Usage.MESSAGE)


def message_document(row: Any) -> dict[str, Any]:
    """The answer of a stored message (``signature`` null until it is signed)."""
    return {"status": row["status"], "message_id": row["message_id"], "signer": row["signer"],
            "method": row["method"], "digest": "0x" + row["digest"], "signature": row["signature"]}


class MessageSigning:
    """The :class:`~gateway.operations.signed.SigningStep` of EIP-191 messages: the stored digest must be
    the digest of the stored message; the signature must recover to the key's public key."""

    def __init__(self, messages: EvmMessages) -> None:
        self.messages = messages

    async def load(self, reference: str) -> Any:
        return await self.messages.database.read(lambda tx: EvmMessages.row_in(tx, reference))

    def answered(self, row: Any) -> Answer | None:
        return None if row["status"] == "unsigned" else Answer(200, message_document(row))

    async def sign(self, row: Any) -> str:
        digest = eip191_digest(bytes.fromhex(row["message"][2:]))
        if digest.hex() != row["digest"]:
            raise ApprovalPayloadMismatch(f"message {row['message_id']}: the stored message does not hash to "
                                          "its digest")
        key = await self.messages.keys.get(self.messages.database, row["key_id"])
        key.require(Usage.MESSAGE)
        raw = await self.messages.signer.sign(key.key_id, ALGORITHM, digest)
        return "0x" + recover_signature(digest, raw, key.public_key).rsv().hex()

    def store_in(self, tx: Tx, row: Any, rsv: str) -> Stored:
        tx.queue("UPDATE evm_messages SET status = 'signed', signature = ?, signed_at = ? "
                 "WHERE message_id = ? AND status = 'unsigned'", (rsv, clock.now_iso(), row["message_id"]))
        return Stored(Answer(200, message_document({**row, "status": "signed", "signature": rsv})),
                      "SELECT 1 FROM evm_messages WHERE message_id = ? AND signature = ?", (row["message_id"], rsv))


class EvmMessages:
    """EIP-191 message signing of one gateway process."""

    def __init__(self, database: Database, signer: Signer, keys: KeyDirectory) -> None:
        self.database = database
        self.signer = signer
        self.keys = keys
        self.signed = SignedOperation(database, MessageSigning(self))

    @staticmethod
    def row_in(tx: Tx, message_id: str) -> Any:
        """The stored row of a message. Raises NotFound."""
        row = tx.fetchone("SELECT * FROM evm_messages WHERE message_id = ?", (message_id,))
        if row is None:
            raise NotFound(f"no EIP-191 message {message_id[:40]}")
        return row

    def record_in(self, tx: Tx, draft: MessageDraft, entry: AuditEntry) -> Any:
        """Record the message, its digest and the audit entry (which names the digest and the message's
        hash and length, not the message). Returns the stored row."""
        message_id = "emsg_" + secrets.token_hex(12)
        address = evm_address(draft.key.public_key)
        digest = eip191_digest(draft.message).hex()
        tx.execute(
            "INSERT INTO evm_messages (message_id, key_id, signer, method, message, digest, status, requested_by, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?, 'unsigned', ?, ?)",
            (message_id, draft.key.key_id, address, draft.method, "0x" + draft.message.hex(), digest, entry.actor,
             clock.now_iso()))
        entry.key_id = draft.key.key_id
        entry.decision = "allowed"
        entry.result = {"message_id": message_id, "signer": address, "method": draft.method, "digest": digest,
                        "message_sha256": hashlib.sha256(draft.message).hexdigest(),
                        "message_bytes": len(draft.message)}
        append(tx, [entry])
        return self.row_in(tx, message_id)

    async def sign(self, request: IdempotentRequest | None, draft: MessageDraft, entry: AuditEntry) -> Answer:
        """One message as a signed operation: recorded with its audit entry, committed, signed, stored."""

        def record(tx: Tx) -> ToSign[Any]:
            row = self.record_in(tx, draft, entry)
            return ToSign(row["message_id"], row)

        return await self.signed.run(request, record)

    async def resume(self, message_id: str, request: IdempotentRequest | None) -> Answer:
        """A replay meeting a message recorded but not signed when the first request ended: sign it now."""
        return await self.signed.resume(message_id, request)
