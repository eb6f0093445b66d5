"""The serving core's ``/metrics``: what one HTTP front saw (requests by route and status, their
latency, those in flight) and what it knows of its workers (requests pending at each, restarts).

Each front process counts its own requests; the front answering a scrape reports its numbers
(label ``front``), as every uvicorn worker of a multi-process app does.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

from servekit.prometheus import HTTP_BOUNDS, Histogram, PrometheusWriter

Scope = MutableMapping[str, Any]

METRICS_PATH = "/metrics"
UNMATCHED = "unmatched"  # a label for paths no route serves, so stray URLs add no new series


@dataclass
class HTTPMetrics:
    requests: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (method, route, status)
    latency: dict[str, Histogram] = field(default_factory=dict)  # by route
    in_flight: int = 0

    def record(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, str(status))
        self.requests[key] = self.requests.get(key, 0) + 1
        hist = self.latency.get(route)
        if hist is None:
            hist = self.latency[route] = Histogram(HTTP_BOUNDS)
        hist.observe(seconds)


def route_of(scope: Scope) -> str:
    """The path template of the route that served ``scope`` (after routing), never the raw path."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    endpoint = scope.get("endpoint")
    app = scope.get("app")
    for candidate in getattr(getattr(app, "router", None), "routes", ()):
        if getattr(candidate, "endpoint", None) is endpoint and endpoint is not None:
            return str(candidate.path)
        if getattr(candidate, "app", None) is endpoint and endpoint is not None:
            return str(candidate.path)  # a mounted app
    return UNMATCHED


def render_core_metrics(
    metrics: HTTPMetrics,
    front: int,
    pending_by_worker: dict[int, int],
    worker_states: dict[int, str],
    restarts: int,
    batch_sizes: Histogram,
) -> str:
    out = PrometheusWriter({"front": str(front)})
    out.metric(
        "servekit_http_requests_total",
        "counter",
        "HTTP requests answered, by method, route and status.",
        [({"method": m, "route": r, "status": s}, v) for (m, r, s), v in sorted(metrics.requests.items())],
    )
    out.histogram(
        "servekit_http_request_duration_seconds",
        "Time from request to the last byte of the response, by route.",
        [({"route": route}, hist) for route, hist in sorted(metrics.latency.items())],
    )
    out.one("servekit_http_requests_in_flight", "gauge", "HTTP requests being answered.", metrics.in_flight)
    out.metric(
        "servekit_queue_depth",
        "gauge",
        "Requests sent to an inference worker and not answered yet, by worker.",
        [({"worker": str(w)}, n) for w, n in sorted(pending_by_worker.items())],
    )
    out.histogram(
        "servekit_request_batch_size",
        "Size of the batch each request ran in (1 without batching).",
        [({}, batch_sizes)],
    )
    states = ("starting", "ready", "dead")
    out.metric(
        "servekit_workers",
        "gauge",
        "Inference workers, by state.",
        [({"state": s}, sum(1 for v in worker_states.values() if v == s)) for s in states],
    )
    out.one(
        "servekit_worker_restarts_total",
        "counter",
        "Inference worker processes that died and were replaced.",
        restarts,
    )
    return out.text()
