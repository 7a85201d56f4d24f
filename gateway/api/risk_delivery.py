"""Delivery of risk events: the webhook deliveries and their dead letters (read, replay), the signed daily
report for a regulator (COSE_Sign1) and the chart of a day's events per hour (PNG).

The events themselves (``GET /v1/risk/events``, the stream, triage) are served by ``gateway.api.risk``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from gateway import clock
from gateway.api.call import Call
from gateway.api.codecs import json_response
from gateway.api.endpoints import Endpoint
from gateway.auth.roles import Permission
from gateway.errors import ValidationFailed
from gateway.keys import Usage
from gateway.monitor import chart, report, webhooks

MAX_LIMIT = 1000
REPORT_MEDIA = "application/cose"
CHART_MEDIA = "image/png"
_STATUSES = ("pending", "delivered", "dead", "all")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RiskDelivery(_Model):
    """One delivery of one risk event to one configured webhook."""

    event_id: str
    endpoint: str
    status: Literal["pending", "delivered", "dead"]
    attempts: Annotated[int, Field(ge=0)]
    next_attempt_at: str
    last_error: str
    delivered_at: str | None
    event_seq: int
    rule: str
    severity: str
    configured: bool = Field(description="false: no [[risk_webhooks]] of this name now; a pending delivery waits")


class RiskDeliveryPage(_Model):
    deliveries: list[RiskDelivery]
    next_after: int | None = Field(description="pass as `after` (with `after_endpoint`) for the next page")
    next_after_endpoint: str | None


def _configured(call: Call) -> list[str]:
    return [webhook.name for webhook in call.runtime.settings.risk_webhooks]


async def list_deliveries(call: Call) -> web.Response:
    status = call.request.query.get("status", "all")
    if status not in _STATUSES:
        raise ValidationFailed(f"status must be one of {', '.join(_STATUSES)}")
    after = call.query_int("after", 0, 0, 10**18)
    after_endpoint = call.request.query.get("after_endpoint", "")
    if len(after_endpoint) > 64:
        raise ValidationFailed("after_endpoint is at most 64 characters")
    limit = call.query_int("limit", 100, 1, MAX_LIMIT)
    configured = _configured(call)
    rows = await call.runtime.database.read(lambda tx: webhooks.deliveries_in(
        tx, configured, None if status == "all" else status, after, after_endpoint, limit))
    full = len(rows) == limit
    return json_response({"deliveries": rows, "next_after": rows[-1]["event_seq"] if full else None,
                          "next_after_endpoint": rows[-1]["endpoint"] if full else None})


async def replay(call: Call) -> web.Response:
    event_id, endpoint = call.request.match_info["event_id"], call.request.match_info["endpoint"]
    if len(event_id) > 64 or len(endpoint) > 64:
        raise ValidationFailed("event_id and endpoint are at most 64 characters")
    configured = _configured(call)
    entry = call.audit_entry("risk.delivery.replay", decision="allowed")
    now = clock.now_iso()
    document = await call.runtime.database.write(
        lambda tx: webhooks.replay_in(tx, event_id, endpoint, configured, entry, now))
    return json_response(document)


async def daily_report(call: Call) -> web.Response:
    runtime = call.runtime
    day = report.parse_day(call.request.match_info["date"], clock.now().date())
    settings = runtime.settings.risk_delivery
    signed = await report.signed_report(runtime.database, runtime.signer_for(Usage.REPORT), runtime.profile,
                                        settings.report_key_id, day, settings.source)
    await runtime.audit.record(call.audit_entry(
        "risk.report", decision="allowed", key_id=signed.key_id, payload_hash=signed.payload_sha256,
        result={"date": day.isoformat(), "events": signed.events}))
    return web.Response(body=signed.envelope, content_type=REPORT_MEDIA, headers={
        "Content-Disposition": f'attachment; filename="risk-report-{day.isoformat()}.cose"',
        "Cache-Control": "no-store"})


async def hourly_chart(call: Call) -> web.Response:
    today = clock.now().date()
    text = call.request.query.get("date")  # absent: today; present, even empty, it must be a day
    day = report.parse_day(text, today) if text is not None else today
    png = await chart.chart_png(call.runtime.database, day)
    return web.Response(body=png, content_type=CHART_MEDIA, headers={"Cache-Control": "no-store"})


ENDPOINTS = [
    Endpoint(
        "GET", "/v1/risk/deliveries", list_deliveries, "Webhook deliveries of risk events (the dead letters with "
        "status=dead)", Permission.RISK_DELIVERIES_READ, "risk", response_model=RiskDeliveryPage,
        audited_action="risk.deliveries",
        query=(("status", {"type": "string", "enum": list(_STATUSES)}, "Only deliveries in this status (default all)"),
               ("after", {"type": "integer", "minimum": 0, "maximum": 10**18},
                "Deliveries of events with seq above this, or equal to it with an endpoint after `after_endpoint`"),
               ("after_endpoint", {"type": "string", "maxLength": 64}, "The cursor's endpoint name (default none)"),
               ("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
                "At most this many deliveries, 1–1000 (default 100)")),
    ),
    Endpoint(
        "POST", "/v1/risk/deliveries/{event_id}/{endpoint}/replay", replay,
        "Send a dead delivery again (pending, due now, attempts counted afresh)", Permission.RISK_DELIVERIES_REPLAY,
        "risk", response_model=RiskDelivery, idempotency="optional", audited_action="risk.delivery.replay",
        responses={409: "The delivery is not dead (pending or delivered)"},
    ),
    Endpoint(
        "GET", "/v1/risk/reports/{date}", daily_report,
        "The signed daily risk report of a UTC day (COSE_Sign1 over CBOR, key of usage report)",
        Permission.RISK_REPORTS_READ, "risk", response_media=REPORT_MEDIA, audited_action="risk.report",
        responses={409: "Several report keys and none configured (ambiguous-key)",
                   503: "HSM or store unavailable; retry after Retry-After seconds"},
    ),
    Endpoint(
        "GET", "/v1/risk/chart.png", hourly_chart, "A day's risk events per hour and severity (PNG)",
        Permission.RISK_REPORTS_READ, "risk", response_media=CHART_MEDIA, audited_action="risk.chart",
        query=(("date", {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                "The UTC day, YYYY-MM-DD (default today)"),),
    ),
]
