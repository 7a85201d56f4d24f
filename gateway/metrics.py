"""Prometheus metrics, in a registry owned by one application (no process-global collectors).

Under ``[server] processes > 1`` the supervisor gives its children a ``PROMETHEUS_MULTIPROC_DIR``;
prometheus-client then keeps every value in a memory-mapped file per process, and ``render``
sums them, so ``/metrics`` shows the whole gateway whichever process answers.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    def __init__(self) -> None:
        self.multiprocess_dir = os.environ.get(METRICS_DIR_ENV)
        self.registry = CollectorRegistry(auto_describe=True)
        self._request_children: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        self.requests = Counter(
            "ecny_http_requests_total",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "ecny_http_request_seconds",
            "HTTP request latency by endpoint",
            ["endpoint"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.signatures = Counter(
            "ecny_signatures_total",
            "Signatures made by the HSM, by algorithm and usage",
            ["algorithm", "usage"],
            registry=self.registry,
        )
        self.refusals = Counter(
            "ecny_refusals_total", "Requests refused, by problem code", ["code"], registry=self.registry
        )
        self.hsm_workers_up = Gauge(
            "ecny_hsm_workers_up", "Signer worker processes with a working HSM session", registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.hsm_ready = Gauge(
            "ecny_hsm_ready", "1 when the HSM can sign", registry=self.registry, multiprocess_mode="livemin"
        )
        self.audit_head = Gauge(
            "ecny_audit_head_seq",
            "Sequence number of the last audit entry (an outside record of the chain head: it never goes down)",
            registry=self.registry,
            multiprocess_mode="max",
        )
        self.risk_webhook_attempts = Counter(
            "ecny_risk_webhook_attempts_total",
            "Attempts to deliver risk events to webhooks, by endpoint and outcome (delivered, retry, dead, "
            "superseded: the claim had run out and another process owns the delivery)",
            ["endpoint", "outcome"],
            registry=self.registry,
        )
        self.risk_events = Counter(
            "ecny_risk_events_total", "Risk events stored by the monitor, by rule and severity (docs/risk.md)",
            ["rule", "severity"], registry=self.registry,
        )
        self.risk_signals_pending = Gauge(
            "ecny_risk_signals_pending",
            "Risk signals committed and not evaluated yet, read from the store by each process's monitor every "
            "[risk] poll_seconds: a backlog that keeps growing means no evaluator keeps up (docs/risk.md)",
            registry=self.registry, multiprocess_mode="mostrecent",
        )
        self.evm_nonce_drift = Gauge(
            "ecny_evm_nonce_drift",
            "The upstream node's pending transaction count of an address minus the gateway's next nonce, "
            "read before eth_sendTransaction (above 0: the local nonce is behind the chain)",
            ["chain_id", "address"],
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )

        self.alliance_sync_lag = Gauge(
            "ecny_alliance_sync_lag_seconds",
            "Seconds since each alliance peer's fingerprints were last pulled and accepted (+Inf: never); a "
            "double financing across two banks can slip through for about this long (docs/trade-finance.md)",
            ["member"], registry=self.registry, multiprocess_mode="min",
        )
        self.alliance_batches = Counter(
            "ecny_alliance_batches_total", "Alliance peer syncs by outcome (accepted, refused, failed)",
            ["member", "outcome"], registry=self.registry,
        )

    def request_done(self, endpoint: str, status: int, seconds: float) -> None:
        """Count one answered request and its latency (the labelled children are looked up once)."""
        key = (endpoint, status)
        children = self._request_children.get(key)
        if children is None:
            children = (self.requests.labels(endpoint, str(status)), self.latency.labels(endpoint))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        if self.multiprocess_dir is None:
            return bytes(generate_latest(self.registry))
        combined = CollectorRegistry()
        MultiProcessCollector(combined, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return bytes(generate_latest(combined))
