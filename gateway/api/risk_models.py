"""Bodies of the risk endpoints (docs/spec.md §5.3, docs/risk.md). Strict: no coercion, no extra fields."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class RiskEventDocument(_Body):
    seq: int
    event_id: str
    ts: str
    rule: str
    rule_version: int
    severity: Literal["info", "low", "medium", "high", "critical"]
    score: int
    subject: str
    evidence: dict[str, Any]
    status: Literal["open", "acknowledged", "closed"]
    assignee: str | None
    updated_at: str
    parties: list[str] | None = None


class RiskEventPage(_Body):
    events: list[RiskEventDocument]
    next_after: int | None


class TriageRequest(_Body):
    note: Annotated[str, StringConstraints(max_length=500)] = ""


class AssignRequest(TriageRequest):
    assignee: Annotated[str, StringConstraints(min_length=1, max_length=64)]
