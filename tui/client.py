"""The teller UI's only way into the system: an async HTTP client of the gateway's API.

Every call returns a typed, immutable result (:mod:`tui.models`, built here from the gateway's JSON) or
raises one error type, :class:`ApiError`, which carries the RFC 9457 problem document the gateway sent
(or one this client made up when there was no answer at all). Two subclasses matter to the UI:
:class:`SessionExpired` (a 401 on a call made with a session token: the UI goes back to the login
screen) and :class:`GatewayUnreachable` (no connection, or no answer in time).

Money-moving calls take an ``idempotency_key``: the caller makes one per confirmed action and sends
the same one again when it retries that action, so a retry never moves money twice.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import aiohttp

from tui.models import (
    Approval,
    Attestation,
    AttestationVerdict,
    AuditEntry,
    AuditPage,
    AuditVerification,
    CashResult,
    DeviceRecord,
    Discrepancy,
    FinancingHit,
    LoadVoucher,
    MetricsSample,
    Readiness,
    Registration,
    RiskEvent,
    RiskPage,
    Session,
    Transaction,
    TransactionPage,
    Wallet,
)

PROBLEM_BASE = "https://ecny-gateway.dev/problems/"
DEFAULT_GATEWAY = "http://127.0.0.1:8700"
CBOR = "application/cbor"


def new_idempotency_key() -> str:
    """A fresh key for one confirmed money-moving action (kept for its retries)."""
    return uuid.uuid4().hex


class ApiError(Exception):
    """A call failed. ``problem`` is the gateway's problem document (type, title, status, detail, …)."""

    def __init__(self, status: int, problem: Mapping[str, Any]) -> None:
        self.status = status
        self.problem: dict[str, Any] = dict(problem)
        super().__init__(self.detail)

    @property
    def code(self) -> str:
        """The stable problem code: the last part of the problem ``type``."""
        kind = str(self.problem.get("type", ""))
        return kind.rsplit("/", 1)[-1] if kind else "error"

    @property
    def title(self) -> str:
        return str(self.problem.get("title") or "Request failed")

    @property
    def detail(self) -> str:
        return str(self.problem.get("detail") or self.problem.get("title") or "request failed")

    @property
    def reasons(self) -> list[str]:
        reasons = self.problem.get("reasons")
        return [str(r) for r in reasons] if isinstance(reasons, list) else []

    @property
    def endpoint_missing(self) -> bool:
        """The gateway has no such endpoint (an older gateway, or a feature not deployed)."""
        return (self.status == 404 and self.detail == "no such endpoint") or self.status == 405

    @property
    def transient(self) -> bool:
        """Worth retrying the same request (with the same idempotency key) later."""
        return self.status in (0, 429, 502, 503, 504)

    @property
    def kind(self) -> str:
        """The failure kind the UI notifies once about: one wording per kind."""
        if isinstance(self, GatewayUnreachable):
            return "unreachable"
        if isinstance(self, SessionExpired):
            return "session-expired"
        if self.endpoint_missing:
            return "not-available"
        return {401: "unauthenticated", 403: "forbidden", 404: "not-found", 409: "conflict", 412: "refused",
                422: "refused", 429: "rate-limited", 503: "unavailable"}.get(
            self.status, "bad-request" if 400 <= self.status < 500 else "server-error")

    def describe(self) -> str:
        """One line for a notification: the detail and, when given, the policy reasons."""
        text = self.detail
        if self.reasons:
            text += " (" + ", ".join(self.reasons) + ")"
        return text


class SessionExpired(ApiError):
    """The session token is no longer accepted (expired or revoked): log in again."""


class GatewayUnreachable(ApiError):
    """No connection to the gateway, or no answer within the timeout."""

    def __init__(self, detail: str) -> None:
        super().__init__(0, {"type": PROBLEM_BASE + "unreachable", "title": "Gateway unreachable", "status": 0,
                             "detail": detail})


# --- parsing -------------------------------------------------------------------------------------------------


def _str(document: Mapping[str, Any], name: str, default: str = "") -> str:
    value = document.get(name, default)
    return default if value is None else str(value)


def _int(document: Mapping[str, Any], name: str, default: int = 0) -> int:
    value = document.get(name, default)
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return default


def _optional_int(document: Mapping[str, Any], name: str) -> int | None:
    value = document.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


def attestation_from(document: Mapping[str, Any]) -> Attestation:
    fields = _dict(document.get("fields"))
    fingerprint = document.get("fingerprint")
    envelope = document.get("attestation")
    return Attestation(
        _str(document, "attestation_id"), _str(document, "document_type"), _str(document, "purpose"),
        _str(document, "member_id"), _str(fields, "number"), _str(_dict(fields.get("issuer")), "tax_id"),
        _int(fields, "amount_minor"), _str(fields, "currency"), fingerprint if isinstance(fingerprint, str) else None,
        _str(document, "created_at"), envelope if isinstance(envelope, str) else None)


def readiness_from(document: Mapping[str, Any]) -> Readiness:
    """From ``/v1/status``, or from ``/readyz`` (which has only the ``ready`` flags)."""
    hsm, store = _dict(document.get("hsm")), _dict(document.get("store"))
    return Readiness(
        ready=document.get("status") == "ready", hsm_ready=bool(hsm.get("ready")),
        hsm_workers=_int(hsm, "workers"), hsm_workers_up=_int(hsm, "workers_up"),
        hsm_detail=_str(hsm, "detail"), store_ready=bool(store.get("ready")),
    )


def wallet_from(document: Mapping[str, Any]) -> Wallet:
    return Wallet(
        wallet_id=_str(document, "wallet_id"), holder_name=_str(document, "holder_name"),
        id_number=document.get("id_number"), phone=_str(document, "phone"), tier=_int(document, "tier"),
        kind=_str(document, "kind"), status=_str(document, "status"), status_reason=_str(document, "status_reason"),
        balance_fen=_int(document, "balance_fen"), offline_reserve_fen=_int(document, "offline_reserve_fen"),
        created_at=_str(document, "created_at"), updated_at=_str(document, "updated_at"),
    )


def pending_approval(document: Mapping[str, Any]) -> Approval | None:
    """The pending approval an operation answered with (202: above its threshold, nothing moved yet),
    or None when the operation was carried out."""
    if document.get("status") == "pending" and document.get("approval_id") and document.get("payload_hash"):
        return approval_from(document)
    return None


def approval_from(document: Mapping[str, Any]) -> Approval:
    result = document.get("result")
    return Approval(
        approval_id=_str(document, "approval_id"), kind=_str(document, "kind"), payload=_dict(document.get("payload")),
        payload_hash=_str(document, "payload_hash"), requested_by=_str(document, "requested_by"),
        status=_str(document, "status"), decided_by=document.get("decided_by"), decided_at=document.get("decided_at"),
        note=_str(document, "note"), result=_dict(result) if result is not None else None,
        created_at=_str(document, "created_at"), expires_at=_str(document, "expires_at"),
    )


def discrepancy_from(document: Mapping[str, Any]) -> Discrepancy:
    evidence = document.get("evidence")
    amount = _optional_int(document, "amount_fen")
    if amount is None:
        amount = _optional_int(document, "amount")
    return Discrepancy(
        discrepancy_id=_str(document, "discrepancy_id") or _str(document, "id"),
        kind=_str(document, "kind") or _str(document, "rule"), status=_str(document, "status", "open"),
        device_id=_str(document, "device_id"), wallet_id=_str(document, "wallet_id"), amount_fen=amount,
        evidence=_dict(evidence) if isinstance(evidence, Mapping) else ({"items": evidence} if evidence else {}),
        created_at=_str(document, "created_at"), document=dict(document),
    )


def risk_event_from(document: Mapping[str, Any]) -> RiskEvent:
    assignee = document.get("assignee")
    return RiskEvent(
        seq=_int(document, "seq"), event_id=_str(document, "event_id"), ts=_str(document, "ts"),
        rule=_str(document, "rule"), rule_version=_int(document, "rule_version"),
        severity=_str(document, "severity"), score=_int(document, "score"), subject=_str(document, "subject"),
        evidence=_dict(document.get("evidence")), status=_str(document, "status", "open"),
        assignee=str(assignee) if assignee else None,
    )


def device_from(document: Mapping[str, Any]) -> DeviceRecord:
    return DeviceRecord(device_id=_str(document, "device_id"), wallet_id=_str(document, "wallet_id"),
                        status=_str(document, "status"), model=_str(document, "model"), document=dict(document))


def _b64(value: Any) -> bytes:
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=False)
        except ValueError:
            return b""
    return b""


_METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text: str) -> MetricsSample:
    """Sum the counters the dashboard needs over all their label sets (Prometheus text format)."""
    totals = {"ecny_signatures_total": 0.0, "ecny_http_requests_total": 0.0, "ecny_refusals_total": 0.0}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _METRIC_LINE.match(line)
        if match and match.group(1) in totals:
            try:
                totals[match.group(1)] += float(match.group(3))
            except ValueError:
                continue
    return MetricsSample(totals["ecny_signatures_total"], totals["ecny_http_requests_total"],
                         totals["ecny_refusals_total"])


# --- the client ------------------------------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    content_type: str
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body) if self.body else None
        except ValueError:
            return None


class GatewayClient:
    """One teller's connection to the gateway. Holds the session token after :meth:`login`."""

    def __init__(self, base_url: str = DEFAULT_GATEWAY, *, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session: Session | None = None
        self._http: aiohttp.ClientSession | None = None

    # -- transport (overridden by test doubles) --

    async def _send(self, method: str, path: str, *, params: Mapping[str, str] | None, headers: dict[str, str],
                    body: bytes | None, timeout: float) -> Response:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession()
        try:
            async with self._http.request(method, self.base_url + path, params=params, headers=headers, data=body,
                                          timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                return Response(response.status, response.content_type, await response.read())
        except TimeoutError as error:
            raise GatewayUnreachable(f"no answer from {self.base_url} within {timeout:g} s") from error
        except aiohttp.ClientError as error:
            raise GatewayUnreachable(f"cannot reach {self.base_url}: {error.__class__.__name__}") from error
        except OSError as error:
            raise GatewayUnreachable(f"cannot reach {self.base_url}: {error.strerror or error}") from error

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def request(self, method: str, path: str, *, json_body: Any = None, cbor_body: bytes | None = None,
                      params: Mapping[str, str] | None = None, idempotency_key: str | None = None,
                      authenticated: bool = True, timeout: float | None = None) -> Response:
        """Send one request; return the response if it is 2xx, else raise :class:`ApiError`."""
        headers = {"Accept": "application/json"}
        body: bytes | None = None
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        elif cbor_body is not None:
            body = cbor_body
            headers["Content-Type"] = CBOR
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        with_session = authenticated and self.session is not None
        if with_session:
            assert self.session is not None
            headers["Authorization"] = f"Bearer {self.session.token}"
        response = await self._send(method, path, params=params, headers=headers, body=body,
                                    timeout=self.timeout if timeout is None else timeout)
        if 200 <= response.status < 300:
            return response
        raise self._error(response, with_session)

    def _error(self, response: Response, with_session: bool) -> ApiError:
        document = response.json()
        if not isinstance(document, dict) or "type" not in document:
            text = response.body.decode("utf-8", "replace").strip()[:200]
            document = {"type": "about:blank", "title": f"HTTP {response.status}", "status": response.status,
                        "detail": text or f"HTTP {response.status}"}
        if response.status == 401 and with_session:
            return SessionExpired(response.status, document)
        return ApiError(response.status, document)

    async def _json(self, method: str, path: str, **options: Any) -> dict[str, Any]:
        document = (await self.request(method, path, **options)).json()
        if not isinstance(document, dict):
            raise ApiError(502, {"type": "about:blank", "title": "Unexpected answer",
                                 "detail": f"{method} {path} did not answer with a JSON object"})
        return document

    # -- sessions --

    async def login(self, username: str, password: str) -> Session:
        document = await self._json("POST", "/v1/sessions", json_body={"username": username, "password": password},
                                    authenticated=False)
        self.session = Session(username, _str(document, "token"), _str(document, "role"),
                               _str(document, "expires_at"))
        return self.session

    async def logout(self) -> None:
        """End the session on the gateway (``DELETE /v1/sessions``: the token is dead from then on),
        then forget it. The token is forgotten even when the gateway cannot be told (unreachable,
        or the session had ended already): it then dies when it expires."""
        if self.session is None:
            return
        try:
            await self.request("DELETE", "/v1/sessions", timeout=min(self.timeout, 5.0))
        except ApiError:  # GatewayUnreachable included
            pass
        finally:
            self.session = None

    def forget_session(self) -> None:
        """Forget the session token without telling the gateway (it refused the token already)."""
        self.session = None

    # -- service --

    async def readiness(self, timeout: float | None = None) -> Readiness:
        """``/v1/status`` (HSM workers and what went wrong; needs a session). When it cannot answer
        (no session, or the store is down so no session can be checked), the public ``/readyz``:
        ready or not per part, whose 503 is a result, not an error."""
        if self.session is not None:
            try:
                return readiness_from(await self._json("GET", "/v1/status", timeout=timeout))
            except ApiError as error:
                if error.status != 503:
                    raise
        try:
            document = await self._json("GET", "/readyz", authenticated=False, timeout=timeout)
        except ApiError as error:
            if error.status != 503 or "hsm" not in error.problem:
                raise
            document = error.problem
        return readiness_from(document)

    async def metrics(self, timeout: float | None = None) -> MetricsSample:
        response = await self.request("GET", "/metrics", timeout=timeout)
        return parse_metrics(response.body.decode("utf-8", "replace"))

    # -- wallets --

    async def search_wallets(self, query: str = "") -> list[Wallet]:
        document = await self._json("GET", "/v1/wallets", params={"q": query} if query else None)
        return [wallet_from(w) for w in document.get("wallets", []) if isinstance(w, dict)]

    async def wallet(self, wallet_id: str) -> Wallet:
        return wallet_from(await self._json("GET", f"/v1/wallets/{wallet_id}"))

    async def open_wallet(self, holder_name: str, phone: str, tier: int, kind: str, id_number: str | None = None,
                          idempotency_key: str | None = None) -> Wallet:
        body: dict[str, Any] = {"holder_name": holder_name, "phone": phone, "tier": tier, "kind": kind}
        if id_number:
            body["id_number"] = id_number
        document = await self._json("POST", "/v1/wallets", json_body=body, idempotency_key=idempotency_key)
        upgrade = document.get("tier_approval")
        wallet = wallet_from(document)
        if isinstance(upgrade, dict):
            wallet = replace(wallet, tier_approval=approval_from(upgrade))
        return wallet

    async def set_status(self, wallet_id: str, status: str, reason: str, idempotency_key: str | None = None) -> Wallet:
        return wallet_from(await self._json("POST", f"/v1/wallets/{wallet_id}/status",
                                            json_body={"status": status, "reason": reason},
                                            idempotency_key=idempotency_key))

    async def set_tier(self, wallet_id: str, tier: int, idempotency_key: str | None = None) -> Wallet | Approval:
        """The wallet at its new tier — or, for an upgrade to tier 1, the approval it now waits for."""
        document = await self._json("POST", f"/v1/wallets/{wallet_id}/tier", json_body={"tier": tier},
                                    idempotency_key=idempotency_key)
        return pending_approval(document) or wallet_from(document)

    async def cash(self, direction: str, wallet_id: str, amount_fen: int, idempotency_key: str
                   ) -> CashResult | Approval:
        """Cash in (``direction="in"``) or out. ``idempotency_key`` is required by the gateway. Above the
        approval thresholds the answer is the pending approval (nothing moved yet)."""
        if direction not in ("in", "out"):
            raise ValueError(direction)
        document = await self._json("POST", f"/v1/wallets/{wallet_id}/cash-{direction}",
                                    json_body={"amount_fen": amount_fen}, idempotency_key=idempotency_key)
        pending = pending_approval(document)
        if pending is not None:
            return pending
        return CashResult(_str(document, "entry_id"), _str(document, "wallet_id"), _int(document, "amount_fen"),
                          _int(document, "balance_fen"))

    async def transactions(self, wallet_id: str, cursor: str | None = None) -> TransactionPage:
        document = await self._json("GET", f"/v1/wallets/{wallet_id}/transactions",
                                    params={"cursor": cursor} if cursor else None)
        items = tuple(
            Transaction(_int(t, "posting_id"), _str(t, "entry_id"), _str(t, "kind"), _str(t, "reference"),
                        _str(t, "memo"), _str(t, "account"), _int(t, "amount_fen"), _str(t, "business_day"),
                        _str(t, "created_at"))
            for t in document.get("transactions", []) if isinstance(t, dict)
        )
        next_cursor = document.get("next_cursor")
        return TransactionPage(items, str(next_cursor) if next_cursor else None)

    # -- approvals --

    async def approvals(self, status: str = "pending") -> list[Approval]:
        document = await self._json("GET", "/v1/approvals", params={"status": status})
        return [approval_from(a) for a in document.get("approvals", []) if isinstance(a, dict)]

    async def approval(self, approval_id: str) -> Approval:
        return approval_from(await self._json("GET", f"/v1/approvals/{approval_id}"))

    async def decide(self, approval: Approval, approve: bool, note: str = "",
                     idempotency_key: str | None = None) -> Approval:
        """Approve or reject ``approval`` as shown: the hash sent is that of the payload the user saw."""
        verb = "approve" if approve else "reject"
        document = await self._json("POST", f"/v1/approvals/{approval.approval_id}/{verb}",
                                    json_body={"payload_hash": approval.shown_hash(), "note": note},
                                    idempotency_key=idempotency_key)
        return approval_from(document)

    # -- audit --

    async def audit(self, after_seq: int = 0, limit: int = 100) -> AuditPage:
        document = await self._json("GET", "/v1/audit", params={"after_seq": str(after_seq), "limit": str(limit)})
        entries = tuple(
            AuditEntry(_int(e, "seq"), _str(e, "ts"), _str(e, "actor"), _str(e, "role"), _str(e, "action"),
                       _str(e, "decision"), tuple(str(r) for r in e.get("reasons") or ()), _str(e, "payload_hash"),
                       _str(e, "key_id"), _dict(e.get("result")), _str(e, "request_id"), _str(e, "entry_hash"))
            for e in document.get("entries", []) if isinstance(e, dict)
        )
        return AuditPage(entries, _optional_int(document, "next_after_seq"))

    async def verify_audit(self) -> AuditVerification:
        document = await self._json("GET", "/v1/audit/verify", timeout=max(self.timeout, 60.0))
        return AuditVerification(bool(document.get("ok")), _int(document, "entries"), _int(document, "checkpoints"),
                                 _int(document, "head_seq"), _optional_int(document, "first_bad_seq"),
                                 _str(document, "problem"), tuple(str(w) for w in document.get("warnings") or ()))

    # -- trade-finance attestations --

    async def search_attestations(self, number: str = "", issuer_tax_id: str = "") -> list[Attestation]:
        params = {key: value for key, value in (("number", number), ("issuer_tax_id", issuer_tax_id)) if value}
        document = await self._json("GET", "/v1/attestations", params=params)
        return [attestation_from(a) for a in document.get("attestations", []) if isinstance(a, dict)]

    async def verify_attestation(self, attestation_b64: str) -> AttestationVerdict:
        document = await self._json("POST", "/v1/attestations/verify", json_body={"attestation": attestation_b64})
        key = _dict(document.get("key"))
        return AttestationVerdict(bool(document.get("valid")), _str(document, "reason"),
                                  document.get("issuer") if isinstance(document.get("issuer"), str) else None,
                                  _str(key, "kid"), _dict(document.get("claims")))

    async def financing_hits(self, limit: int = 100) -> list[FinancingHit]:
        document = await self._json("GET", "/v1/attestations/hits", params={"limit": str(limit)})
        return [FinancingHit(_str(h, "hit_id"), _str(h, "ts"), _str(h, "document_type"), _str(h, "document_number"),
                             _str(h, "issuer_tax_id"), _str(h, "financed_by"), _str(h, "financed_at"),
                             _str(h, "requested_by"))
                for h in document.get("hits", []) if isinstance(h, dict)]

    # -- reconciliation --

    async def discrepancies(self, status: str = "open") -> list[Discrepancy]:
        document = await self._json("GET", "/v1/reconciliation/discrepancies", params={"status": status})
        items = document.get("discrepancies", document.get("items", []))
        return [discrepancy_from(d) for d in items if isinstance(d, dict)]

    async def resolve_discrepancy(self, discrepancy_id: str, resolution: str, note: str,
                                  idempotency_key: str | None = None) -> Discrepancy:
        document = await self._json("POST", f"/v1/reconciliation/discrepancies/{discrepancy_id}/resolve",
                                    json_body={"resolution": resolution, "note": note},
                                    idempotency_key=idempotency_key)
        return discrepancy_from(document)

    # -- risk events --

    async def risk_events(self, after: int = 0, limit: int = 200, timeout: float | None = None) -> RiskPage:
        """Risk events with ``seq`` above ``after``, oldest first (``GET /v1/risk/events?after=``)."""
        document = await self._json("GET", "/v1/risk/events", params={"after": str(after), "limit": str(limit)},
                                    timeout=timeout)
        events = tuple(risk_event_from(e) for e in document.get("events", []) if isinstance(e, dict))
        next_after = _optional_int(document, "next_after")
        if next_after is None and len(events) >= limit:  # a gateway that gives no cursor: page on by seq
            next_after = events[-1].seq
        return RiskPage(events, next_after)

    async def acknowledge_risk_event(self, event_id: str, note: str = "",
                                     idempotency_key: str | None = None) -> RiskEvent | None:
        """Acknowledge an event (supervisors and auditors); the event as it now stands, when the gateway
        answers with it."""
        response = await self.request("POST", f"/v1/risk/events/{event_id}/acknowledge",
                                      json_body={"note": note} if note else {}, idempotency_key=idempotency_key)
        document = response.json()
        return risk_event_from(document) if isinstance(document, dict) and document.get("event_id") else None

    # -- hard wallets --

    async def device(self, device_id: str) -> DeviceRecord:
        return device_from(await self._json("GET", f"/v1/devices/{device_id}"))

    async def register_device(self, wallet_id: str, device_id: str, public_key_pem: str, model: str,
                              idempotency_key: str | None = None) -> Registration:
        document = await self._json("POST", "/v1/devices", json_body={
            "wallet_id": wallet_id, "device_id": device_id, "public_key_pem": public_key_pem, "model": model},
            idempotency_key=idempotency_key)
        return Registration(_b64(document.get("certificate")), _str(document, "issuer_public_key_pem"), document)

    async def recertify_device(self, device_id: str) -> Registration:
        """A new certificate under the voucher key that signs now, with the endorsements the device needs."""
        document = await self._json("POST", f"/v1/devices/{device_id}/certificate")
        endorsements = document.get("endorsements")
        return Registration(_b64(document.get("certificate")), _str(document, "issuer_public_key_pem"), document,
                            tuple(_b64(item) for item in endorsements) if isinstance(endorsements, list) else ())

    async def load_device(self, device_id: str, amount_fen: int, idempotency_key: str) -> LoadVoucher | Approval:
        """The signed voucher — or, above the load thresholds, the approval the load now waits for
        (nothing moved yet; the voucher comes with the approval's result once a second person approves)."""
        document = await self._json("POST", f"/v1/devices/{device_id}/loads", json_body={"amount_fen": amount_fen},
                                    idempotency_key=idempotency_key)
        pending = pending_approval(document)
        if pending is not None:
            return pending
        return LoadVoucher(_b64(document.get("voucher")), _int(document, "load_seq"), document)

    async def sync_device(self, device_id: str, log_export: bytes,
                          idempotency_key: str | None = None) -> dict[str, Any]:
        """Upload the device's log export (CBOR); returns the reconciliation report."""
        return await self._json("POST", f"/v1/devices/{device_id}/sync", cbor_body=log_export,
                                idempotency_key=idempotency_key, timeout=max(self.timeout, 60.0))

    async def unload_device(self, device_id: str, statement: bytes, idempotency_key: str) -> dict[str, Any]:
        """Hand the device's signed final statement to the gateway: its offline reserve goes back to the wallet."""
        return await self._json("POST", f"/v1/devices/{device_id}/unload",
                                json_body={"statement": base64.b64encode(statement).decode()},
                                idempotency_key=idempotency_key)


async def gather_results(*calls: Any) -> list[Any]:
    """Run calls concurrently; each result is the value or the :class:`ApiError` it raised."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    out: list[Any] = []
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, ApiError):
            raise result
        out.append(result)
    return out
