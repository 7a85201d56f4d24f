"""Risk events: pages, one event, a live Server-Sent Events stream, and triage (the rules live in
gateway/monitor; who reads and triages what in gateway/monitor/triage.py)."""

from __future__ import annotations

import json
import time
from functools import partial

from aiohttp import web

from gateway.api.call import Call
from gateway.api.codecs import json_response
from gateway.api.endpoints import Endpoint
from gateway.api.risk_models import AssignRequest, RiskEventDocument, RiskEventPage, TriageRequest
from gateway.auth.roles import Permission
from gateway.errors import ValidationFailed
from gateway.monitor import triage
from gateway.monitor.rules import RULE_NAMES
from gateway.risk.events import SEVERITIES

PAGE_DEFAULT = 100
STREAM_PAGE = 100
CURSOR_MAX = 10**18


def _filters(call: Call) -> tuple[str | None, str | None]:
    severity = call.request.query.get("severity") or None
    rule = call.request.query.get("rule") or None
    triage.check_filters(severity, rule)
    return severity, rule


async def list_events(call: Call) -> web.Response:
    after = call.query_int("after", 0, 0, CURSOR_MAX)
    limit = call.query_int("limit", PAGE_DEFAULT, 1, triage.PAGE_MAX)
    severity, rule = _filters(call)
    reader = call.actor
    page = await call.runtime.database.read(lambda tx: triage.page_in(tx, reader, after, severity, rule, limit))
    return json_response(page)


async def show_event(call: Call) -> web.Response:
    event_id = call.request.match_info["event_id"]
    reader = call.actor
    return json_response(await call.runtime.database.read(lambda tx: triage.read_in(tx, reader, event_id)))


def _last_event_id(call: Call) -> int | None:
    """The cursor to resume after: ``Last-Event-ID`` (a reconnecting EventSource), else ``after``, else None."""
    text = call.request.headers.get("Last-Event-ID")
    if text is None:
        return call.query_int("after", 0, 0, CURSOR_MAX) if call.request.query.get("after") else None
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise ValidationFailed("Last-Event-ID must be the id (seq) of an event received")
    return int(text)


async def stream(call: Call) -> web.StreamResponse:
    """Events as they are stored: ``id:`` is the event's seq (the cursor ``Last-Event-ID`` resumes after),
    ``data:`` its document; a comment line every ``[risk] heartbeat_seconds`` when nothing happens."""
    severity, rule = _filters(call)
    reader, runtime = call.actor, call.runtime
    cursor = _last_event_id(call)
    if cursor is None:  # live from now on
        cursor = await runtime.monitor.head()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no",  # sent now: the middleware adds it too late
                                           "X-Request-Id": call.request_id})
    await response.prepare(call.request)
    risk = runtime.settings.risk
    beat = time.monotonic()
    try:
        await response.write(b"retry: 1000\n: stream open\n\n")
        while not runtime.monitor.closing:
            page = await runtime.database.read(partial(triage.page_in, reader=reader, after=cursor,
                                                       severity=severity, rule=rule, limit=STREAM_PAGE))
            for event in page["events"]:
                cursor = event["seq"]
                data = json.dumps(event, sort_keys=True, separators=(",", ":"))
                await response.write(f"id: {cursor}\nevent: risk\ndata: {data}\n\n".encode())
            if page["next_after"] is not None:
                continue
            if time.monotonic() - beat >= risk.heartbeat_seconds:
                await response.write(b": heartbeat\n\n")
                beat = time.monotonic()
            await runtime.monitor.wait_for_events(min(risk.poll_seconds, risk.heartbeat_seconds))
    except (ConnectionResetError, ConnectionError):  # the client went away
        pass
    return response


def _triage(action: triage.TriageAction) -> object:
    async def handler(call: Call) -> web.Response:
        event_id = call.request.match_info["event_id"]
        body: TriageRequest = call.body
        assignee = body.assignee if isinstance(body, AssignRequest) else None
        entry = call.audit_entry(f"risk.{action}", decision="allowed")
        actor = call.actor
        document = await call.runtime.database.write(
            lambda tx: triage.triage_in(tx, event_id, action, actor, assignee, body.note, entry))
        return json_response(document)

    handler.__name__ = action
    return handler


EVENT = "/v1/risk/events/{event_id}"
TRIAGE_REFUSALS = {403: "A teller or backend client, or the event names you (or the assignee)",
                   404: "No such event", 409: "The event is closed"}
FILTERS = (
    ("severity", {"type": "string", "enum": list(SEVERITIES)}, "Only events of this severity"),
    ("rule", {"type": "string", "enum": list(RULE_NAMES)}, "Only events of this rule"),
)

ENDPOINTS = [
    Endpoint("GET", "/v1/risk/events", list_events,
             "Risk events after a cursor (a backend client: only those naming it)", Permission.RISK_READ, "risk",
             response_model=RiskEventPage, audited_action="risk.events",
             query=(("after", {"type": "integer", "minimum": 0, "maximum": CURSOR_MAX},
                     "Return events with seq greater than this (default 0)"),
                    *FILTERS,
                    ("limit", {"type": "integer", "minimum": 1, "maximum": triage.PAGE_MAX},
                     "At most this many events, 1–1000 (default 100)"))),
    Endpoint("GET", EVENT, show_event, "One risk event, with the parties it names", Permission.RISK_READ, "risk",
             response_model=RiskEventDocument, audited_action="risk.event"),
    Endpoint("GET", "/v1/risk/stream", stream,
             "Risk events live as Server-Sent Events (Last-Event-ID resumes; heartbeat comments)",
             Permission.RISK_READ, "risk", response_media="text/event-stream", audited_action="risk.stream",
             query=(("after", {"type": "integer", "minimum": 0, "maximum": CURSOR_MAX},
                     "Start after this seq (default: live from now; Last-Event-ID wins)"), *FILTERS)),
    Endpoint("POST", EVENT + "/acknowledge", _triage("acknowledge"),  # type: ignore[arg-type]
             "Acknowledge a risk event (supervisors, auditors; not one that names you)", Permission.RISK_TRIAGE,
             "risk", request_model=TriageRequest, response_model=RiskEventDocument,
             audited_action="risk.acknowledge", responses=TRIAGE_REFUSALS),
    Endpoint("POST", EVENT + "/assign", _triage("assign"),  # type: ignore[arg-type]
             "Assign a risk event to a supervisor or auditor it does not name", Permission.RISK_TRIAGE, "risk",
             request_model=AssignRequest, response_model=RiskEventDocument, audited_action="risk.assign",
             responses={**TRIAGE_REFUSALS, 400: "No such user, or one who may not triage"}),
    Endpoint("POST", EVENT + "/close", _triage("close"),  # type: ignore[arg-type]
             "Close a risk event (supervisors, auditors; not one that names you)", Permission.RISK_TRIAGE, "risk",
             request_model=TriageRequest, response_model=RiskEventDocument, audited_action="risk.close",
             responses=TRIAGE_REFUSALS),
]
