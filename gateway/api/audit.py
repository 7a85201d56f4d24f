"""Audit log: read pages of entries and of signed checkpoints, verify the chain and its checkpoints."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from gateway.api.call import Call
from gateway.api.codecs import json_response
from gateway.api.endpoints import Endpoint
from gateway.api.models import AuditCheckpointPage, AuditPage, AuditVerifyResponse
from gateway.audit.chain import pending_count
from gateway.audit.verify import verify_store
from gateway.audit.witness import WitnessRecord
from gateway.auth.roles import Permission
from gateway.ledger.store import Tx

MAX_LIMIT = 1000


def _document(row: Any) -> dict[str, Any]:
    return {
        "seq": int(row["seq"]),
        "ts": row["ts"],
        "actor": row["actor"],
        "role": row["role"],
        "action": row["action"],
        "decision": row["decision"],
        "reasons": json.loads(row["reasons"]),
        "payload_hash": row["payload_hash"],
        "key_id": row["key_id"],
        "result": json.loads(row["result"]),
        "request_id": row["request_id"],
        "entry_hash": bytes(row["entry_hash"]).hex(),
    }


async def read_page(call: Call) -> web.Response:
    after = call.query_int("after_seq", 0, 0, 10**18)
    limit = call.query_int("limit", 100, 1, MAX_LIMIT)
    await call.runtime.audit.settle()  # PostgreSQL: chain what committed before this request

    def page(tx: Tx) -> tuple[list[Any], int]:
        rows = tx.fetchall("SELECT * FROM audit_log WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit))
        return rows, pending_count(tx)

    rows, pending = await call.runtime.database.read(page)
    entries = [_document(row) for row in rows]
    next_after = entries[-1]["seq"] if len(entries) == limit else None
    return json_response({"entries": entries, "next_after_seq": next_after, "pending": pending})


async def checkpoints_page(call: Call) -> web.Response:
    """Signed checkpoints after ``after`` in witness form, for collectors that keep a copy off this host."""
    after = call.query_int("after", 0, 0, 10**18)
    limit = call.query_int("limit", 100, 1, MAX_LIMIT)
    rows = await call.runtime.database.read(
        lambda tx: tx.fetchall("SELECT * FROM audit_checkpoints WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit))
    )
    documents = [WitnessRecord.from_row(row).document() for row in rows]
    next_after = documents[-1]["seq"] if len(documents) == limit else None
    return json_response({"checkpoints": documents, "next_after": next_after})


async def verify(call: Call) -> web.Response:
    await call.runtime.audit.settle()  # PostgreSQL: chain what committed before this request
    report = await verify_store(call.runtime.database, call.actor.scope)
    return json_response(report.document())


ENDPOINTS = [
    Endpoint(
        "GET", "/v1/audit", read_page, "Read audit entries after a sequence number", Permission.AUDIT_READ, "audit",
        response_model=AuditPage, audited_action="audit.read",
        query=(("after_seq", {"type": "integer", "minimum": 0, "maximum": 10**18},
                "Return entries with seq greater than this (default 0)"),
               ("limit", {"type": "integer", "minimum": 1, "maximum": 1000},
                "At most this many entries, 1–1000 (default 100)")),
    ),
    Endpoint(
        "GET", "/v1/audit/checkpoints", checkpoints_page,
        "Read signed checkpoints after a sequence number (one witness line each)", Permission.AUDIT_READ, "audit",
        response_model=AuditCheckpointPage, audited_action="audit.checkpoints",
        query=(("after", {"type": "integer", "minimum": 0, "maximum": 10**18},
                "Return checkpoints with seq greater than this (default 0)"),
               ("limit", {"type": "integer", "minimum": 1, "maximum": 1000},
                "At most this many checkpoints, 1–1000 (default 100)")),
    ),
    Endpoint(
        "GET", "/v1/audit/verify", verify, "Verify the audit hash chain and its HSM-signed checkpoints",
        Permission.AUDIT_READ, "audit", response_model=AuditVerifyResponse, audited_action="audit.verify",
    ),
]
