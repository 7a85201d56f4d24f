"""Offline verification of the audit chain, its checkpoints and (optionally) the witness.

Works on the database alone (``ecny-gateway audit verify --db DSN``), with no HSM: checkpoint
signatures are checked with `cryptography`.

**Whom it trusts.** With pinned keys (``--public-key KEY_ID=PEM``, repeatable) those keys are the
whole trust set: a checkpoint by any other key fails, whatever the key table says, and each key's
algorithm comes from its PEM (the curve), never from the checkpoint row — a row naming another
algorithm fails. This is the outsider-grade check: someone who can rewrite the database cannot
rewrite what the auditor pinned. Without pins the key table of the database being verified is
trusted (only its keys with ``audit`` usage, with the algorithm the table gives them); that is a
self-check for operators — whoever can rewrite the chain can rewrite that table — and the report
says so (``trust = "key-table"``). The gateway's own ``GET /v1/audit/verify`` is such a self-check.

**SM2** checkpoints are verified in software (:mod:`gateway.audit.sm2`, checked against the GB/T
32918 examples and OpenSSL) with the GM/T 0009 default user ID the HSM's SM2-with-SM3 uses; where
the platform has no SM3 they are refused — a failure, never a warning.

**A cut tail** (the last entries deleted with the checkpoints after them) leaves a shorter chain that
verifies on its own; only a copy of the checkpoints kept elsewhere shows it. With ``--witness FILE``
every witnessed checkpoint must be in the database with the same head hash, key and signature,
and a database chain that ends before the last witnessed checkpoint fails.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from gateway.audit import sm2
from gateway.audit.chain import GENESIS, checkpoint_message, entry_hash, pending_count
from gateway.audit.witness import WitnessRecord
from gateway.errors import ValidationFailed
from gateway.keys import Usage
from gateway.ledger.store import Database, Tx
from gateway.risk.signals import record_signal_in
from gateway.signing import Algorithm, signing_input, verify

PAGE = 5000

#: Algorithms an audit key can have (``gateway.keys``: secp256k1 keys are for EVM only).
AUDIT_ALGORITHMS = frozenset({Algorithm.ECDSA_P256, Algorithm.ED25519, Algorithm.SM2})

TRUST_PINNED = "pinned"
TRUST_KEY_TABLE = "key-table"

_SM2_POINT_BLOCK = "SM2 PUBLIC KEY POINT"
#: DER of SEQUENCE{SEQUENCE{id-ecPublicKey, sm2p256v1 (1.2.156.10197.1.301)}, BIT STRING 00 ‖ 04 x y}
#: up to the point: the only SM2 SubjectPublicKeyInfo form there is.
_SM2_SPKI_PREFIX = bytes.fromhex("3059301306072a8648ce3d020106082a811ccf5501822d034200")


@dataclass(frozen=True)
class TrustedKey:
    """A key whose checkpoint signatures count, with the algorithm it is trusted for."""

    key_id: str
    algorithm: Algorithm
    public_key: bytes  # as the key table stores it: a SEC1 point for ECDSA/SM2, 32 bytes for Ed25519


def pinned_key(spec: str) -> TrustedKey:
    """Parse ``KEY_ID=PEM_FILE``: a SubjectPublicKeyInfo PEM (P-256, Ed25519 or SM2) or the SM2 point
    block ``keys show`` prints. The algorithm is the key's own (its curve).

    Raises:
        ValidationFailed: malformed spec, unreadable file, or a key that cannot be an audit key.
    """
    key_id, sep, path = spec.partition("=")
    if not sep or not key_id:
        raise ValidationFailed(f"--public-key {spec!r}: write KEY_ID=PEM_FILE")
    try:
        with open(path, "rb") as handle:
            pem = handle.read()
    except OSError as exc:
        raise ValidationFailed(f"--public-key {path}: {exc.strerror}") from exc
    text = pem.decode("ascii", "replace")
    sm2_point = _sm2_spki_point(pem)
    if sm2_point is not None:
        return TrustedKey(key_id, Algorithm.SM2, sm2_point)
    if f"-----BEGIN {_SM2_POINT_BLOCK}-----" in text:
        body = text.split(f"-----BEGIN {_SM2_POINT_BLOCK}-----", 1)[1].split("-----END", 1)[0]
        try:
            point = bytes.fromhex("".join(body.split()))
        except ValueError as exc:
            raise ValidationFailed(f"--public-key {path}: the SM2 point is not hex") from exc
        if len(point) != 65 or point[0] != 4:
            raise ValidationFailed(f"--public-key {path}: an SM2 point is 65 bytes starting 04")
        return TrustedKey(key_id, Algorithm.SM2, point)
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValidationFailed(f"--public-key {path}: not a public key PEM this tool reads ({exc})") from exc
    if isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return TrustedKey(key_id, Algorithm.ED25519, raw)
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        point = key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        return TrustedKey(key_id, Algorithm.ECDSA_P256, point)
    raise ValidationFailed(f"--public-key {path}: an audit key is P-256, Ed25519 or SM2; this is not one")


def _sm2_spki_point(pem: bytes) -> bytes | None:
    """The point of an SM2 SubjectPublicKeyInfo PEM (``openssl pkey -pubout`` of an SM2 key), which
    `cryptography` does not load; None for anything else."""
    text = pem.decode("ascii", "replace")
    if "-----BEGIN PUBLIC KEY-----" not in text:
        return None
    body = text.split("-----BEGIN PUBLIC KEY-----", 1)[1].split("-----END PUBLIC KEY-----", 1)[0]
    try:
        der = base64.b64decode("".join(body.split()), validate=True)
    except ValueError:
        return None
    if len(der) != len(_SM2_SPKI_PREFIX) + 65 or not der.startswith(_SM2_SPKI_PREFIX):
        return None
    return der[len(_SM2_SPKI_PREFIX):]


Progress = Callable[[int, int], None]
"""Told (items done, items in all) as a long check goes; the CLI draws its progress bar from it."""


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
    trust: str = TRUST_KEY_TABLE
    witnessed: int = 0
    pending: int = 0

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
            "trust": self.trust,
            "pending": self.pending,
        }


def _walk_entries(tx: Tx, report: VerifyReport, progress: Progress | None = None, total: int = 0) -> dict[int, bytes]:
    """Check every entry follows the one before; returns seq → entry hash."""
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
        if progress is not None:
            progress(report.entries, total)
    report.head_seq = last_seq
    return hashes


def _key_table(tx: Tx) -> dict[str, tuple[Algorithm | None, frozenset[str], bytes]]:
    """key id → (algorithm or None if unknown, usages, public key) as the database says."""
    table = {}
    for row in tx.fetchall("SELECT key_id, algorithm, usages, public_key FROM keys"):
        try:
            algorithm: Algorithm | None = Algorithm(row["algorithm"])
        except ValueError:
            algorithm = None
        table[row["key_id"]] = (algorithm, frozenset(u for u in str(row["usages"]).split(",") if u),
                                bytes(row["public_key"]))
    return table


def _trust_set(
    tx: Tx, pinned: Sequence[TrustedKey] | None, report: VerifyReport
) -> tuple[dict[str, TrustedKey], dict[str, str]]:
    """The keys whose checkpoints count, and why each other key of the table does not."""
    table = _key_table(tx)
    refused: dict[str, str] = {}
    if pinned:
        report.trust = TRUST_PINNED
        trusted = {key.key_id: key for key in pinned}
        for key in pinned:
            # The table cannot add trust, only take it away: a pinned key the table does not give
            # `audit` usage is the wrong key pinned (say a `raw` key, which signs anything).
            if key.key_id in table:
                _, usages, public_key = table[key.key_id]
                if Usage.AUDIT.value not in usages:
                    refused[key.key_id] = (f"the key table gives pinned key {key.key_id} usages {sorted(usages)}, "
                                           "not 'audit'")
                elif public_key != key.public_key:  # the pin decides; the signatures will show who is right
                    report.warnings.append(f"the key table holds another public key for pinned key {key.key_id}")
        for key_id in table.keys() - trusted.keys():
            refused[key_id] = f"key {key_id} is not pinned"
        return trusted, refused
    report.trust = TRUST_KEY_TABLE
    report.warnings.append(
        "no key pinned: trusting the 'audit' keys of the key table in the database being verified; whoever can "
        "rewrite the chain can rewrite that table too, so this is not an outsider-grade verification"
    )
    trusted = {}
    for key_id, (algorithm, usages, public_key) in table.items():
        if Usage.AUDIT.value not in usages:
            refused[key_id] = f"key {key_id} has usages {sorted(usages)}, not 'audit'"
        elif algorithm is None or algorithm not in AUDIT_ALGORITHMS:
            refused[key_id] = f"key {key_id} is a {algorithm} key, which cannot be an audit key"
        else:
            trusted[key_id] = TrustedKey(key_id, algorithm, public_key)
    return trusted, refused


def _check_checkpoint(cp: Any, hashes: dict[int, bytes], trusted: dict[str, TrustedKey],
                      refused: dict[str, str]) -> str:
    """What is wrong with one checkpoint row, or "" when it verifies."""
    seq = int(cp["seq"])
    if hashes.get(seq) != bytes(cp["head_hash"]):
        return f"checkpoint at {seq} does not match the chain (entries up to {seq} were rewritten)"
    key_id = str(cp["key_id"])
    if key_id in refused:
        return f"checkpoint at {seq} is signed by a key that is not trusted: {refused[key_id]}"
    key = trusted.get(key_id)
    if key is None:
        return f"checkpoint at {seq} is signed by key {key_id}, which is neither pinned nor in the key table"
    if cp["algorithm"] != key.algorithm.value:
        return (f"checkpoint at {seq} says algorithm {cp['algorithm']!r} but the trusted key {key_id} is "
                f"{key.algorithm.value}: the row cannot choose how it is verified")
    message = checkpoint_message(seq, bytes(cp["head_hash"]))
    if key.algorithm is Algorithm.SM2:
        if not sm2.available():
            return (f"checkpoint at {seq} is an SM2 signature: refused, this platform's OpenSSL has no SM3 "
                    "(verify on a machine whose OpenSSL has SM2/SM3)")
        valid = sm2.verify(key.public_key, message, bytes(cp["signature"]))
    else:
        valid = verify(key.algorithm, key.public_key, signing_input(key.algorithm, message), bytes(cp["signature"]))
    if not valid:
        return f"checkpoint at {seq} has an invalid signature (key {key_id})"
    return ""


def _check_witness(
    witnessed: Iterable[tuple[int, WitnessRecord]], checkpoints: dict[int, Any], report: VerifyReport
) -> None:
    """Every witnessed checkpoint is in the database, byte for byte; the chain reaches the last one."""
    for line, record in sorted(witnessed, key=lambda item: item[1].seq):
        report.witnessed += 1
        row = checkpoints.get(record.seq)
        if record.seq > report.head_seq:
            report.fail(record.seq, f"the chain ends at entry {report.head_seq}, before the checkpoint at "
                                    f"{record.seq} the witness holds (line {line}): its tail was cut off")
        elif row is None:
            report.fail(record.seq, f"the checkpoint at {record.seq} the witness holds (line {line}) is missing "
                                    "from the database")
        elif (bytes(row["head_hash"]), str(row["key_id"]), bytes(row["signature"])) != (
            record.head_hash, record.key_id, record.signature
        ):
            report.fail(record.seq, f"the checkpoint at {record.seq} differs from the one the witness holds "
                                    f"(line {line}): head hash, key or signature was replaced")


def verify_chain(
    tx: Tx, pinned: Sequence[TrustedKey] | None = None,
    witnessed: Sequence[tuple[int, WitnessRecord]] | None = None,
    progress: Progress | None = None,
) -> VerifyReport:
    """Walk the whole chain in order, then every checkpoint, then the witness.

    Args:
        tx: a read transaction (a consistent snapshot).
        pinned: the whole trust set; None or empty trusts the key table's ``audit`` keys (not
            outsider-grade, and the report says so).
        witnessed: (line number, checkpoint) from a witness file, if one is given.
        progress: told (entries and checkpoints done, their total) as the walk goes (the CLI's bar).
    Returns:
        The report; ``first_bad_seq`` names the first entry (or checkpoint) that does not verify.
    """
    report = VerifyReport()
    total = 0
    if progress is not None:
        counts = tx.fetchone("SELECT (SELECT COUNT(*) FROM audit_log) AS entries, "
                             "(SELECT COUNT(*) FROM audit_checkpoints) AS checkpoints")
        total = int(counts["entries"]) + int(counts["checkpoints"]) if counts is not None else 0
        progress(0, total)
    hashes = _walk_entries(tx, report, progress, total)
    trusted, refused = _trust_set(tx, pinned, report)
    checkpoints: dict[int, Any] = {}
    for cp in tx.fetchall("SELECT * FROM audit_checkpoints ORDER BY seq"):
        seq = int(cp["seq"])
        checkpoints[seq] = cp
        report.checkpoints += 1
        if progress is not None and report.checkpoints % PAGE == 0:
            progress(report.entries + report.checkpoints, total)
        problem = _check_checkpoint(cp, hashes, trusted, refused)
        if problem:
            report.fail(seq, problem)
        else:
            report.last_checkpoint_seq = seq
    if progress is not None:
        progress(report.entries + report.checkpoints, total)
    if witnessed is not None:
        _check_witness(witnessed, checkpoints, report)
        if not report.witnessed:
            report.warnings.append("the witness holds no checkpoint: it cannot show a cut tail")
    report.pending = pending_count(tx)
    if report.pending:
        report.warnings.append(
            f"{report.pending} entries are pending: committed and staged, not chained yet (the chainer numbers "
            "them within milliseconds while it runs; they are not covered by this verification)"
        )
    if report.ok and report.head_seq > report.last_checkpoint_seq:
        report.warnings.append(
            f"entries {report.last_checkpoint_seq + 1}..{report.head_seq} follow the last signed checkpoint"
        )
    return report


async def verify_store(database: Database, actor: str, pinned: Sequence[TrustedKey] | None = None,
                       witnessed: Sequence[tuple[int, WitnessRecord]] | None = None,
                       progress: Progress | None = None) -> VerifyReport:
    """:func:`verify_chain` over a snapshot of ``database``; a failure is also a risk signal
    (``audit.verify_failed``, by ``actor``), written in a transaction of its own — a verification
    is a read and has none to share."""
    report = await database.read(lambda tx: verify_chain(tx, pinned, witnessed, progress))
    if not report.ok:
        await database.write(lambda tx: record_signal_in(
            tx, "audit.verify_failed", "audit", actor=actor, first_bad_seq=report.first_bad_seq,
            problem=report.problem[:500], trust=report.trust))
    return report
