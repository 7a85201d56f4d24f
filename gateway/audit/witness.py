"""The checkpoint witness: a copy of every signed checkpoint kept outside the store.

A checkpoint in the database fixes the history up to it, but someone who can write the database
can also delete the last entries *and* the checkpoints after them: what is left is a shorter chain
that verifies. The witness is an append-only file of its own (``[audit] witness_file``) that gets
every checkpoint the gateway signs, as one JSON line: ``seq``, ``head_hash``, ``key_id``,
``algorithm``, ``signature`` (hex) and ``ts``. ``ecny-gateway audit verify --witness FILE`` then
fails when the database's chain ends before the last witnessed checkpoint or disagrees with one.

The same documents are served by ``GET /v1/audit/checkpoints``, so a collector on another host can
copy them into a witness file of its own (one document per line) and verify against that.

Several processes and instances may append to one file: each line is one ``write`` on a descriptor
opened with ``O_APPEND`` (the kernel places it at the end atomically), then ``fsync``. The file is
created ``0600`` and never followed through a symbolic link.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError, ValidationFailed

#: File name of the default witness, next to the SQLite database (or under ``var/`` for PostgreSQL).
DEFAULT_NAME = "audit-witness.jsonl"


@dataclass(frozen=True)
class WitnessRecord:
    """One signed checkpoint as the witness (and ``GET /v1/audit/checkpoints``) holds it."""

    seq: int
    head_hash: bytes
    key_id: str
    algorithm: str
    signature: bytes
    ts: str

    @classmethod
    def from_row(cls, row: Any) -> WitnessRecord:
        """From an ``audit_checkpoints`` row."""
        return cls(int(row["seq"]), bytes(row["head_hash"]), str(row["key_id"]), str(row["algorithm"]),
                   bytes(row["signature"]), str(row["ts"]))

    def document(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "head_hash": self.head_hash.hex(),
            "key_id": self.key_id,
            "algorithm": self.algorithm,
            "signature": self.signature.hex(),
            "ts": self.ts,
        }

    def line(self) -> bytes:
        return json.dumps(self.document(), sort_keys=True, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def parse(cls, text: str) -> WitnessRecord:
        """One witness line. Raises ValueError (with what is wrong) for anything else."""
        document = json.loads(text)
        if not isinstance(document, dict):
            raise ValueError("not a JSON object")
        seq = document.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise ValueError("seq is not a positive integer")
        fields = {name: document.get(name) for name in ("head_hash", "key_id", "algorithm", "signature", "ts")}
        for name, value in fields.items():
            if not isinstance(value, str):
                raise ValueError(f"{name} is not a string")
        return cls(seq, bytes.fromhex(str(fields["head_hash"])), str(fields["key_id"]), str(fields["algorithm"]),
                   bytes.fromhex(str(fields["signature"])), str(fields["ts"]))


def witness_path(configured: Path | None, dsn: str) -> Path:
    """Where the witness is: ``configured``, else ``audit-witness.jsonl`` next to the SQLite file,
    else (PostgreSQL, in-memory SQLite) ``var/audit-witness.jsonl``."""
    if configured is not None:
        return configured
    path = dsn.removeprefix("sqlite:///") if dsn.startswith("sqlite:///") else ""
    if path and path != ":memory:":
        return Path(path).parent / DEFAULT_NAME
    return Path("var") / DEFAULT_NAME


def _open_for_append(path: Path) -> int:
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    if created:  # the new directory entry must survive a crash as well as the line
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    return fd


def prepare(path: Path) -> None:
    """Create the witness (0600) if it does not exist, so a path the gateway cannot write is found at
    start-up rather than at the first checkpoint.

    Raises:
        ConfigError: the file cannot be opened for appending.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(_open_for_append(path))
    except OSError as exc:
        raise ConfigError(f"audit.witness_file: cannot append to {path}: {exc.strerror}") from exc


def append(path: Path, record: WitnessRecord) -> None:
    """Append one line with a single ``write`` and make it durable. Raises OSError."""
    line = record.line()
    fd = _open_for_append(path)
    try:
        written = os.write(fd, line)
        if written != len(line):  # a full disk; a torn last line is reported by the reader
            raise OSError(f"short write to the audit witness ({written} of {len(line)} bytes)")
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path: Path) -> tuple[list[tuple[int, WitnessRecord]], list[str]]:
    """The witnessed checkpoints with their line numbers, and warnings.

    An unterminated last line (a crash in the middle of a write) is skipped with a warning; any
    other line that does not parse is an error.

    Raises:
        ValidationFailed: unreadable file or a malformed line (naming the line).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValidationFailed(f"--witness {path}: cannot read it: {exc}") from exc
    lines = text.split("\n")
    warnings = []
    if lines[-1] != "":
        warnings.append(f"witness {path}: line {len(lines)} is incomplete (no newline) and was ignored")
    records = []
    for number, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            records.append((number, WitnessRecord.parse(line)))
        except ValueError as exc:
            raise ValidationFailed(f"--witness {path}: line {number} is not a checkpoint: {exc}") from exc
    return records, warnings
