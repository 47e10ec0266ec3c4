"""Prometheus metrics, one registry per gateway (no module-level collectors)."""

from __future__ import annotations

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@attrs.define(eq=False)
class Metrics:
    registry: CollectorRegistry = attrs.field(factory=CollectorRegistry)
    requests: Counter = attrs.field(init=False)
    latency: Histogram = attrs.field(init=False)
    jobs: Counter = attrs.field(init=False)
    tokens: Counter = attrs.field(init=False)
    nodes_online: Gauge = attrs.field(init=False)
    jobs_in_flight: Gauge = attrs.field(init=False)
    queue_depth: Gauge = attrs.field(init=False)
    btc_usd: Gauge = attrs.field(init=False)
    btc_usd_age: Gauge = attrs.field(init=False)
    btc_usd_sources: Gauge = attrs.field(init=False)
    wallet_shortfall: Gauge = attrs.field(init=False)
    settlements: Counter = attrs.field(init=False)
    settlement_retries: Counter = attrs.field(init=False)
    settlements_pending: Gauge = attrs.field(init=False)
    payout_failures: Counter = attrs.field(init=False)
    protocol_violations: Counter = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "routecat_http_requests", "HTTP requests", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "routecat_http_request_duration_seconds",
            "Time to response headers",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.jobs = Counter("routecat_jobs", "Finished jobs", ["model", "outcome"], registry=r)
        self.tokens = Counter(
            "routecat_tokens", "Billed tokens", ["model", "direction"], registry=r
        )
        self.nodes_online = Gauge("routecat_nodes_online", "Connected nodes", registry=r)
        self.jobs_in_flight = Gauge("routecat_jobs_in_flight", "Jobs running now", registry=r)
        self.queue_depth = Gauge("routecat_queue_depth", "Requests waiting for a node", registry=r)
        self.btc_usd = Gauge("routecat_btc_usd", "BTC/USD rate in force", registry=r)
        self.btc_usd_age = Gauge(
            "routecat_btc_usd_age_seconds", "Age of the BTC/USD rate", registry=r
        )
        self.btc_usd_sources = Gauge(
            "routecat_btc_usd_sources", "Sources that answered at the last refresh", registry=r
        )
        self.wallet_shortfall = Gauge(
            "routecat_wallet_shortfall_msat",
            "Due payouts the Lightning wallet cannot cover",
            registry=r,
        )
        self.settlements = Counter("routecat_settlements", "Settled jobs", registry=r)
        self.settlement_retries = Counter(
            "routecat_settlement_retries", "Settlements that failed and were retried", registry=r
        )
        self.settlements_pending = Gauge(
            "routecat_settlements_pending",
            "Bills kept in memory because their settlement has not committed yet",
            registry=r,
        )
        self.payout_failures = Counter(
            "routecat_payout_failures",
            "Payouts not sent or not completed (funds held), by stage",
            ["stage"],
            registry=r,
        )
        self.protocol_violations = Counter(
            "routecat_node_protocol_violations",
            "Frames from nodes that broke the protocol, by what was done about it",
            ["action"],
            registry=r,
        )

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
