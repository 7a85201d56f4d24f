"""Numbered SQL migrations, one folder per dialect (``migrations/sqlite``, ``migrations/postgresql``)."""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from typing import Any

from gateway.clock import now_iso


def migration_files(dialect: str) -> list[tuple[str, str]]:
    """The numbered migrations of one dialect, in order: (name, SQL)."""
    folder = resources.files("gateway.ledger") / "migrations" / dialect
    files = sorted((item for item in folder.iterdir() if item.name.endswith(".sql")), key=lambda item: item.name)
    return [(item.name.removesuffix(".sql"), item.read_text(encoding="utf-8")) for item in files]


MigrationProgress = Callable[[int, int], None]
"""Told (migrations applied so far, migrations to apply) as ``migrate`` goes; the CLI's progress bar."""


def apply_migrations(tx: Any, dialect: str, progress: MigrationProgress | None = None) -> list[str]:
    """Apply, inside ``tx``, the migrations not recorded in ``schema_migrations``."""
    tx.lock("schema-migrations")
    tx.execute("CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
    done = {row["name"] for row in tx.fetchall("SELECT name FROM schema_migrations")}
    applied: list[str] = []
    pending = [(name, sql) for name, sql in migration_files(dialect) if name not in done]
    for name, sql in pending:
        if progress is not None:
            progress(len(applied), len(pending))
        for statement in _statements(sql):
            tx.execute(statement)
        tx.execute(
            "INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)", (name, now_iso())
        )
        applied.append(name)
    if progress is not None:
        progress(len(applied), len(pending))
    return applied


def _statements(sql: str) -> list[str]:
    """Split a migration into statements: at a ``;`` that ends a line, outside a ``$$``-quoted function
    body (whose own statements end in ``;`` too). Whole-line ``--`` comments outside bodies are dropped."""
    parts, current = [], []
    in_body = False
    for line in sql.splitlines():
        if not in_body and line.strip().startswith("--"):
            continue
        current.append(line)
        if line.count("$$") % 2:
            in_body = not in_body
        if not in_body and line.rstrip().endswith(";"):
            parts.append("\n".join(current).strip().rstrip(";"))
            current = []
    if "".join(current).strip():
        parts.append("\n".join(current).strip())
    return [p for p in parts if p]
