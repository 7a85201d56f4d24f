"""Offline verification of the audit chain and its checkpoints.

Works on the database alone (``ecny-gateway audit verify --db DSN``), with no HSM: checkpoint
signatures are checked with the audit key's public key using `cryptography`. The public key is
read from the key table, or pinned by the operator (``--public-key``) so that someone able to
rewrite the database cannot swap it too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.audit.chain import GENESIS, checkpoint_message, entry_hash
from gateway.hsm.profile import Algorithm
from gateway.keyring import signing_input, verify
from gateway.ledger.store import Tx

PAGE = 5000


@dataclass
class VerifyReport:
    ok: bool = True
    entries: int = 0
    checkpoints: int = 0
    last_checkpoint_seq: int = 0
    head_seq: int = 0
    first_bad_seq: int | None = None
    problem: str = ""
    warnings: list[str] = field(default_factory=list)

    def fail(self, seq: int, problem: str) -> None:
        if self.ok:
            self.ok, self.first_bad_seq, self.problem = False, seq, problem

    def document(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "entries": self.entries,
            "checkpoints": self.checkpoints,
            "last_checkpoint_seq": self.last_checkpoint_seq,
            "head_seq": self.head_seq,
            "first_bad_seq": self.first_bad_seq,
            "problem": self.problem,
            "warnings": self.warnings,
        }


def verify_chain(tx: Tx, pinned_public_keys: dict[str, bytes] | None = None) -> VerifyReport:
    """Walk the whole chain in order, then every checkpoint.

    Args:
        tx: a read transaction (a consistent snapshot).
        pinned_public_keys: key id → public key bytes to trust instead of the key table.
    Returns:
        The report; ``first_bad_seq`` names the first entry (or checkpoint) that does not verify.
    """
    report = VerifyReport()
    hashes: dict[int, bytes] = {}
    expected_seq, prev = 1, GENESIS
    last_seq = 0
    while True:
        rows = tx.fetchall("SELECT * FROM audit_log WHERE seq > ? ORDER BY seq LIMIT ?", (last_seq, PAGE))
        if not rows:
            break
        for row in rows:
            seq = int(row["seq"])
            last_seq = seq
            report.entries += 1
            if seq != expected_seq:
                report.fail(expected_seq, f"entry {expected_seq} is missing (next present is {seq})")
            elif bytes(row["prev_hash"]) != prev:
                report.fail(seq, f"entry {seq} does not follow entry {seq - 1} (prev_hash mismatch)")
            elif entry_hash(prev, dict(row)) != bytes(row["entry_hash"]):
                report.fail(seq, f"entry {seq} was altered (its hash does not match its content)")
            prev = bytes(row["entry_hash"])
            hashes[seq] = prev
            expected_seq = seq + 1
    report.head_seq = last_seq

    keys = {row["key_id"]: row for row in tx.fetchall("SELECT key_id, algorithm, public_key FROM keys")}
    for cp in tx.fetchall("SELECT * FROM audit_checkpoints ORDER BY seq"):
        seq = int(cp["seq"])
        report.checkpoints += 1
        if hashes.get(seq) != bytes(cp["head_hash"]):
            report.fail(seq, f"checkpoint at {seq} does not match the chain (entries up to {seq} were rewritten)")
            continue
        key_id = cp["key_id"]
        algorithm = Algorithm(cp["algorithm"])
        public_key = (pinned_public_keys or {}).get(key_id)
        if public_key is None:
            if key_id not in keys:
                report.fail(seq, f"checkpoint at {seq} is signed by unknown key {key_id}")
                continue
            public_key = bytes(keys[key_id]["public_key"])
        data = signing_input(algorithm, checkpoint_message(seq, bytes(cp["head_hash"])))
        if algorithm is Algorithm.SM2:
            report.warnings.append(f"checkpoint {seq}: SM2 signatures cannot be verified offline here")
        elif not verify(algorithm, public_key, data, bytes(cp["signature"])):
            report.fail(seq, f"checkpoint at {seq} has an invalid signature")
            continue
        report.last_checkpoint_seq = seq
    if report.ok and report.head_seq > report.last_checkpoint_seq:
        report.warnings.append(
            f"entries {report.last_checkpoint_seq + 1}..{report.head_seq} follow the last signed checkpoint"
        )
    return report
