"""What the risk tests share: a gateway whose rules have small thresholds (so a scenario needs a handful of
requests, not thousands), and helpers that read events through the API as an auditor would."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from gateway.auth.roles import Role
from gateway.config import EvmSettings, FanRule, RefusalsRule, RiskSettings, StructuringRule, VelocityRule
from gateway.risk.signals import pending_signals_in
from gateway.runtime import RUNTIME
from tests.conftest import Gateway, Token, evm_test_chain, make_settings, start_gateway

STRUCTURING_COUNT = 6  # the example: six transfers of ¥49,999 within ten minutes
JUST_UNDER = 4_999_900  # ¥49,999: the approval threshold is ¥50,000 ([approvals] transfer_threshold_fen)


def risk_settings(evaluator: Literal["process", "inline"] = "inline") -> RiskSettings:
    """Thresholds small enough for a test; the documented defaults are in gateway/config.py and docs/risk.md.
    ``inline`` by default: tests change thresholds at run time, which an evaluator process would not see."""
    return RiskSettings(
        evaluator=evaluator,
        poll_seconds=0.2,
        structuring=StructuringRule(min_count=STRUCTURING_COUNT, window_seconds=600),
        velocity=VelocityRule(wallet_max=8),
        fan=FanRule(out_payees=4, in_payers=4),
        refusals=RefusalsRule(min_count=5),
    )


async def start_risk_gateway(token: Token, dsn: str, evaluator: Literal["process", "inline"] = "inline") -> Gateway:
    settings = make_settings(token, dsn, evm={"chains": [*EvmSettings().chains, evm_test_chain()]})
    settings.risk = risk_settings(evaluator)
    gateway = await start_gateway(settings)
    for label, usage in (("ecny-risk", "ecny"), ("audit-risk", "audit")):
        response = await gateway.client.post("/v1/keys", json={"label": label, "algorithm": "ecdsa-p256",
                                                               "usage": [usage]}, headers=gateway.auth(Role.ADMIN))
        assert response.status == 201, await response.text()
    return gateway


def idem() -> dict[str, str]:
    return {"Idempotency-Key": uuid.uuid4().hex}


async def all_events(gw: Gateway, headers: dict[str, str] | None = None, **query: str) -> list[dict[str, Any]]:
    """Every event the caller may read, page by page (cursor ``after``)."""
    events: list[dict[str, Any]] = []
    after = 0
    while True:
        response = await gw.client.get("/v1/risk/events", params={"after": str(after), "limit": "1000", **query},
                                       headers=headers or gw.auth(Role.AUDITOR))
        assert response.status == 200, await response.text()
        page = await response.json()
        events += page["events"]
        if page["next_after"] is None:
            return events
        after = page["next_after"]


async def settled(gw: Gateway, timeout: float = 15.0) -> None:
    """Wait until the monitor has evaluated every committed signal (read from the store: the oracle)."""
    database = gw.client.server.app[RUNTIME].database
    deadline = time.monotonic() + timeout
    while True:
        pending = await database.read(pending_signals_in)
        if pending == 0:
            return
        assert time.monotonic() < deadline, f"{pending} signals still unevaluated"
        await asyncio.sleep(0.05)


async def events_where(gw: Gateway, predicate: Callable[[dict[str, Any]], bool],
                       headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The events the caller reads that satisfy ``predicate``, once the monitor has caught up."""
    await settled(gw)
    return [event for event in await all_events(gw, headers) if predicate(event)]
