"""Prometheus metrics, in a registry owned by one application (no process-global collectors)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
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
            "ecny_hsm_workers_up", "Signer worker processes with a working HSM session", registry=self.registry
        )
        self.hsm_ready = Gauge("ecny_hsm_ready", "1 when the HSM can sign", registry=self.registry)
        self.audit_head = Gauge(
            "ecny_audit_head_seq", "Sequence number of the last audit entry", registry=self.registry
        )

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
