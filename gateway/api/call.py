"""The one argument every handler receives: :class:`Call`, an authenticated request with its parsed
body. Kept apart from the endpoint table (:mod:`gateway.api.endpoints`) so that the modules the table
uses, such as :mod:`gateway.api.idempotency`, can take a Call without importing the table.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.audit.chain import AuditEntry
from gateway.auth.credentials import Principal
from gateway.errors import ValidationFailed
from gateway.operations.idempotency import IdempotentRequest
from gateway.runtime import Runtime

Handler = Callable[["Call"], Awaitable[web.StreamResponse]]


@dataclass
class Call:
    """One authenticated request, as a handler sees it."""

    request: web.Request
    runtime: Runtime
    principal: Principal | None
    body: Any  # the validated request model, or None
    raw_body: bytes
    request_id: str
    idempotency_key: str | None
    idempotent: IdempotentRequest | None = None  # its Idempotency-Key, set by idempotency.run

    @property
    def actor(self) -> Principal:
        assert self.principal is not None, "public endpoints have no actor"
        return self.principal

    def query_int(self, name: str, default: int, low: int, high: int) -> int:
        """The query parameter ``name`` as an integer in ``low..high`` (``default`` when absent or empty).

        ASCII digits only, at most 20: ``str.isdigit()`` also passes "²", and ``int()`` refuses more than
        4,300 digits, both of which would otherwise leave as a 500.

        Raises:
            ValidationFailed: not a non-negative integer, or out of range.
        """
        text = self.request.query.get(name, "")
        if text == "":
            return default
        if not (text.isascii() and text.isdigit()) or len(text) > 20:
            raise ValidationFailed(f"query parameter {name} must be a non-negative integer")
        value = int(text)
        if not low <= value <= high:
            raise ValidationFailed(f"query parameter {name} must be between {low} and {high}")
        return value

    def payload_hash(self) -> str:
        return hashlib.sha256(self.raw_body).hexdigest()

    def audit_entry(self, action: str, **fields: Any) -> AuditEntry:
        principal = self.principal
        return AuditEntry(
            actor=principal.scope if principal else "anonymous",
            role=principal.role.value if principal else "",
            action=action,
            request_id=self.request_id,
            **fields,
        )
