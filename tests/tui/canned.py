"""A gateway client that answers from fixed documents (the real API's shapes) instead of the network,
so snapshots are the same on every run: no clock, no random ids."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from tui.client import GatewayClient, Response
from tui.models import Session

WALLET = {
    "wallet_id": "8123456789012344", "holder_name": "Li Lei", "id_number": "1101****1234", "phone": "13800138000",
    "tier": 3, "kind": "personal", "status": "active", "status_reason": "", "balance_fen": 1_234_567,
    "offline_reserve_fen": 50_000, "created_at": "2025-01-02T09:30:00Z", "updated_at": "2025-01-02T09:30:00Z",
}
OTHER = {**WALLET, "wallet_id": "8987654321098763", "holder_name": "Han Meimei", "tier": 4, "status": "frozen",
         "status_reason": "lost phone", "balance_fen": 8_800, "offline_reserve_fen": 0}
TRANSACTIONS = [
    {"posting_id": 40 - i, "entry_id": f"e_{i:04d}", "kind": kind, "reference": ref, "memo": "",
     "account": account, "amount_fen": amount, "business_day": "2025-01-03",
     "created_at": f"2025-01-03T1{i % 10}:0{i % 6}:00Z"}
    for i, (kind, ref, account, amount) in enumerate([
        ("cash_in", "8123456789012344", "wallet", 1_000_000), ("transfer", "t_5f2a", "wallet", -20_000),
        ("load", "d_sim01", "reserve", 50_000), ("load", "d_sim01", "wallet", -50_000),
        ("cash_in", "8123456789012344", "wallet", 304_567),
    ])
]
APPROVALS = [
    {"approval_id": "a_0001", "kind": "transfer",
     "payload": {"kind": "transfer", "transfer_id": "t_big1", "from_wallet": "8123456789012344",
                 "to_wallet": "8987654321098763", "amount_fen": 6_000_000, "memo": "house deposit", "ccy": "CNY"},
     "payload_hash": "", "requested_by": "user:teller1", "status": "pending", "decided_by": None,
     "decided_at": None, "note": "", "result": None, "created_at": "2025-01-03T10:00:00Z",
     "expires_at": "2025-01-04T10:00:00Z"},
    {"approval_id": "a_0002", "kind": "evm_transaction",
     # The shape gateway.evm.transactions.record_in stores (checked against a real gateway in test_flows).
     "payload": {"transaction_id": "etx_0001", "key_id": "k_hot", "chain_id": 1, "chain": "Ethereum",
                 "from": "0x9aF1b2c3D4e5F60718293a4B5c6D7e8F90a1B2c3",
                 "signing_hash": "0x" + "5e" * 32,
                 "transaction": {"type": "eip1559", "chain_id": 1, "nonce": 7, "gas_limit": 90000,
                                 "to": "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48", "value": "0",
                                 "data": "0xa9059cbb" + "00" * 64, "max_fee_per_gas": "30000000000",
                                 "max_priority_fee_per_gas": "2000000000"},
                 "intent": {"chain_id": 1, "asset": "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48",
                            "symbol": "USDC", "decimals": 6, "method": "transfer",
                            "recipient": "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed", "amount": "250000000000"}},
     "payload_hash": "", "requested_by": "client:backend", "status": "pending", "decided_by": None,
     "decided_at": None, "note": "", "result": None, "created_at": "2025-01-03T11:00:00Z",
     "expires_at": "2025-01-04T11:00:00Z"},
]
DISCREPANCIES = [
    {"discrepancy_id": "x_0001", "kind": "double_spend", "status": "open", "device_id": "d_sim01",
     "wallet_id": "8123456789012344", "amount_fen": 12_000, "created_at": "2025-01-03T12:00:00Z",
     "evidence": {"counter": 7, "payments": ["p_7a", "p_7b"], "note": "counter 7 used twice"}},
    {"discrepancy_id": "x_0002", "kind": "counter_gap", "status": "open", "device_id": "d_sim02",
     "wallet_id": "8987654321098763", "amount_fen": 3_000, "created_at": "2025-01-03T12:05:00Z",
     "evidence": {"expected": 4, "got": 6}},
]
ACTIONS = ("wallets.open", "wallets.cash_in", "approvals.approve")
AUDIT: list[dict[str, Any]] = [
    {"seq": i, "ts": f"2025-01-03T09:{i:02d}:00Z", "actor": "user:teller1" if i % 3 else "user:supervisor1",
     "role": "teller" if i % 3 else "supervisor", "action": ACTIONS[i % 3],
     "decision": "allowed", "reasons": [], "payload_hash": "ab" * 32, "key_id": "", "result": {"n": i},
     "request_id": f"r{i}", "entry_hash": "cd" * 32}
    for i in range(1, 18)
]
RISK_EVENTS: list[dict[str, Any]] = [
    {"seq": 1, "event_id": "r_0001", "ts": "2025-01-03T09:12:00.000000Z", "rule": "structuring", "rule_version": 1,
     "severity": "high", "score": 82, "subject": "8123456789012344",
     "evidence": {"transfer_ids": ["t_a1", "t_a2", "t_a3", "t_a4", "t_a5", "t_a6"], "amount_fen_each": 4_999_900,
                  "threshold_fen": 5_000_000, "window": "PT10M"},
     "status": "open", "assignee": None, "updated_at": "2025-01-03T09:12:00.000000Z"},
    {"seq": 2, "event_id": "r_0002", "ts": "2025-01-03T10:40:00.000000Z", "rule": "fan-out", "rule_version": 2,
     "severity": "medium", "score": 55, "subject": "8987654321098763",
     "evidence": {"new_payees": 9, "window": "PT1H", "transfer_ids": ["t_b1", "t_b2"]},
     "status": "acknowledged", "assignee": "supervisor1", "updated_at": "2025-01-03T10:45:00.000000Z"},
    {"seq": 3, "event_id": "r_0003", "ts": "2025-01-03T11:05:00.000000Z", "rule": "payee-of-frozen-devices",
     "rule_version": 1, "severity": "critical", "score": 95, "subject": "8123456789012344",
     "evidence": {"devices": ["d_sim01", "d_sim02", "d_sim03"], "amount_fen": 120_000},
     "status": "open", "assignee": None, "updated_at": "2025-01-03T11:05:00.000000Z"},
    {"seq": 4, "event_id": "r_0004", "ts": "2025-01-03T11:30:00.000000Z", "rule": "repeated-refusals",
     "rule_version": 1, "severity": "low", "score": 20, "subject": "client:backend",
     "evidence": {"refusals": 12, "window": "PT5M"}, "status": "open", "assignee": None,
     "updated_at": "2025-01-03T11:30:00.000000Z"},
]
METRICS = """# HELP ecny_signatures_total Signatures
# TYPE ecny_signatures_total counter
ecny_signatures_total{algorithm="ecdsa-p256",usage="raw"} 1200.0
ecny_signatures_total{algorithm="ecdsa-p256",usage="ecny"} 34.0
"""


def _with_hashes(approvals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    import hashlib

    from tui.models import canonical_json

    return [{**a, "payload_hash": hashlib.sha256(canonical_json(a["payload"]).encode()).hexdigest()}
            for a in approvals]


class CannedClient(GatewayClient):
    def __init__(self, role: str = "supervisor") -> None:
        super().__init__("http://gateway.test:8700")
        self.session = Session("supervisor1" if role == "supervisor" else role + "1", "token", role,
                               "2025-01-03T18:00:00Z")
        self.sent: list[tuple[str, str, bytes | None]] = []
        self.queries: list[tuple[str, dict[str, str]]] = []
        self.risk_feed = [dict(event) for event in RISK_EVENTS]  # a test may append new ones (a live feed)

    async def _send(self, method: str, path: str, *, params: Mapping[str, str] | None, headers: dict[str, str],
                    body: bytes | None, timeout: float) -> Response:
        self.sent.append((method, path, body))
        self.queries.append((path, dict(params or {})))
        document: Any
        status = 200
        if path == "/v1/status":
            document = {"status": "ready", "hsm": {"ready": True, "workers": 2, "workers_up": 2, "detail": ""},
                        "store": {"ready": True}}
        elif path == "/readyz":
            document = {"status": "ready", "hsm": {"ready": True}, "store": {"ready": True}}
        elif path == "/metrics":
            return Response(200, "text/plain", METRICS.encode())
        elif path == "/v1/wallets":
            document = {"wallets": [WALLET, OTHER]}
        elif path == f"/v1/wallets/{WALLET['wallet_id']}":
            document = WALLET
        elif path.endswith("/transactions"):
            document = {"transactions": TRANSACTIONS, "next_cursor": None}
        elif path == "/v1/approvals":
            document = {"approvals": _with_hashes(APPROVALS)}
        elif path == "/v1/reconciliation/discrepancies":
            document = {"discrepancies": DISCREPANCIES}
        elif path == "/v1/audit":
            document = {"entries": AUDIT, "next_after_seq": None}
        elif path == "/v1/audit/verify":
            document = {"ok": True, "entries": 17, "checkpoints": 1, "last_checkpoint_seq": 10, "head_seq": 17,
                        "first_bad_seq": None, "problem": "", "warnings": []}
        elif path == "/v1/risk/events":
            after = int((params or {}).get("after", "0"))
            document = {"events": [e for e in self.risk_feed if e["seq"] > after], "next_after": None}
        elif path.startswith("/v1/risk/events/") and path.endswith("/acknowledge") and method == "POST":
            event = next((e for e in self.risk_feed if path == f"/v1/risk/events/{e['event_id']}/acknowledge"), None)
            if self.session is not None and self.session.role == "teller":
                status, document = 403, {"type": "https://ecny-gateway.dev/problems/forbidden", "title": "Forbidden",
                                         "status": 403, "detail": "role 'teller' may not risk.triage"}
            elif event is None:
                status, document = 404, {"type": "https://ecny-gateway.dev/problems/not-found", "title": "Not found",
                                         "status": 404, "detail": "no such risk event"}
            else:
                event.update(status="acknowledged", assignee=self.session.username if self.session else None)
                document = event
        elif path.startswith("/v1/devices/"):
            status, document = 404, {"type": "https://ecny-gateway.dev/problems/not-found", "title": "Not found",
                                     "status": 404, "detail": "no device d_sim01"}
        else:
            status, document = 404, {"type": "https://ecny-gateway.dev/problems/not-found", "title": "Not found",
                                     "status": 404, "detail": "no such endpoint"}
        return Response(status, "application/json", json.dumps(document).encode())
