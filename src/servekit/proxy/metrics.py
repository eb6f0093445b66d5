"""The proxy's numbers per node (requests, errors, retries, latencies) and ``/metrics``."""

from __future__ import annotations

from dataclasses import dataclass, field

from servekit.prometheus import Histogram, PrometheusWriter
from servekit.proxy.registry import Registry

LATENCY_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass
class NodeCounters:
    requests: int = 0  # requests sent to the node (each attempt)
    errors: int = 0  # attempts that failed: connect/read errors, 5xx answers, streams cut short
    retries: int = 0  # requests moved from this node to another after a failed attempt
    latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BOUNDS))


@dataclass
class ProxyMetrics:
    nodes: dict[str, NodeCounters] = field(default_factory=dict)
    ttft: Histogram = field(default_factory=lambda: Histogram(LATENCY_BOUNDS))
    no_node: int = 0  # requests answered 503: no healthy node

    def node(self, url: str) -> NodeCounters:
        found = self.nodes.get(url)  # not setdefault: it would build counters on every request
        if found is None:
            found = self.nodes[url] = NodeCounters()
        return found

    def render(self, registry: Registry) -> str:
        out = PrometheusWriter()
        nodes = list(registry)
        counters = [(node.url, self.node(node.url)) for node in nodes]
        out.metric(
            "servekit_proxy:node_in_flight",
            "gauge",
            "Requests the proxy has open on the node.",
            [({"node": n.url}, n.in_flight) for n in nodes],
        )
        out.metric(
            "servekit_proxy:node_healthy",
            "gauge",
            "1 when the node passes its health checks.",
            [({"node": n.url}, int(n.health.healthy)) for n in nodes],
        )
        out.metric(
            "servekit_proxy:node_circuit_state",
            "gauge",
            "The node's circuit breaker: 0 closed, 1 half-open, 2 open.",
            [({"node": n.url}, n.health.circuit.value) for n in nodes],
        )
        out.metric(
            "servekit_proxy:node_load",
            "gauge",
            "Running + waiting requests the node reported on its /metrics.",
            [({"node": n.url}, n.reported_load) for n in nodes],
        )
        for name, help_text in (
            ("requests", "Requests sent to the node (each attempt)."),
            ("errors", "Attempts on the node that failed."),
            ("retries", "Requests moved to another node after a failed attempt on this one."),
        ):
            out.metric(
                f"servekit_proxy:node_{name}_total",
                "counter",
                help_text,
                [({"node": url}, getattr(c, name)) for url, c in counters],
            )
        out.histogram(
            "servekit_proxy:node_request_latency_seconds",
            "Seconds from sending a request to the node to its last byte.",
            [({"node": url}, c.latency) for url, c in counters],
        )
        out.histogram(
            "servekit_proxy:time_to_first_byte_seconds",
            "Seconds from a request's arrival at the proxy to the first byte of its answer.",
            [({}, self.ttft)],
        )
        out.one(
            "servekit_proxy:no_healthy_node_total",
            "counter",
            "Requests answered 503 because no healthy node serves their model.",
            self.no_node,
        )
        return out.text()
