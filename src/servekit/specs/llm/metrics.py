"""The LLM server's numbers: a worker's own counters, and ``/metrics`` in Prometheus' text format
(vLLM-style names) from every worker's stats.

Every worker reports its own stats; ``merge_worker_stats`` adds them up. Counters are summed;
gauges are given per worker (label ``worker``) and, without that label, for the whole server.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from servekit.llm.outputs import RequestOutput
from servekit.prometheus import REQUEST_BOUNDS, TTFT_BOUNDS, Histogram, PrometheusWriter


@dataclass
class Counters:
    """Server-side counters for /metrics (the engine's own come from ``get_stats``)."""

    requests: dict[str, int] = field(default_factory=dict)  # by route kind
    errors: dict[str, int] = field(default_factory=dict)  # by status code
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # by finish reason
    aborted: int = 0  # requests that ended before their stop condition (abort or client gone)
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BOUNDS))
    e2e: Histogram = field(default_factory=lambda: Histogram(REQUEST_BOUNDS))
    queue_time: Histogram = field(default_factory=lambda: Histogram(REQUEST_BOUNDS))

    def record(self, output: RequestOutput) -> None:
        self.prompt_tokens += len(output.prompt_token_ids)
        self.generation_tokens += sum(len(c.token_ids) for c in output.outputs)
        for completion in output.outputs:
            reason = completion.finish_reason or "abort"
            self.finished[reason] = self.finished.get(reason, 0) + 1
        if any(c.finish_reason in (None, "abort") for c in output.outputs):
            self.aborted += 1
        metrics = output.metrics
        if metrics is None:
            return
        if metrics.first_scheduled_time is not None:
            self.queue_time.observe(metrics.first_scheduled_time - metrics.arrival_time)
        if metrics.time_to_first_token is not None:
            self.ttft.observe(metrics.time_to_first_token)
        if metrics.finished_time is not None:
            self.e2e.observe(metrics.finished_time - metrics.arrival_time)

    def record_cancel(self) -> None:
        """A request whose client went away (its engine sequence is aborted as the stream closes)."""
        self.finished["cancelled"] = self.finished.get("cancelled", 0) + 1
        self.aborted += 1

    def count_request(self, kind: str) -> None:
        self.requests[kind] = self.requests.get(kind, 0) + 1

    def count_error(self, status: int) -> None:
        key = str(status)
        self.errors[key] = self.errors.get(key, 0) + 1


# Engine gauges: (stats key, metric name, help).
_ENGINE_GAUGES = (
    ("num_running", "servekit:num_requests_running", "Sequences being generated."),
    ("num_waiting", "servekit:num_requests_waiting", "Sequences waiting to start."),
    ("kv_cache_usage", "servekit:kv_cache_usage_perc", "Fraction of KV-cache blocks in use."),
    ("num_kv_blocks", "servekit:num_kv_blocks", "KV-cache blocks in total."),
    ("num_free_kv_blocks", "servekit:num_free_kv_blocks", "KV-cache blocks free."),
)


def _sum_dicts(dicts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Key-wise sums; nested dicts (counts by label) are summed key-wise too, histograms (dicts with
    ``bounds``) bucket-wise."""
    total: dict[str, Any] = {}
    for item in dicts:
        for key, value in item.items():
            if isinstance(value, dict) and "bounds" in value:
                parts = [total[key], value] if key in total else [value]
                total[key] = dataclasses.asdict(Histogram.merged(parts))
            elif isinstance(value, dict):
                total[key] = _sum_dicts([total.get(key, {}), value])
            else:
                total[key] = total.get(key, 0) + value
    return total


def merge_worker_stats(per_worker: Sequence[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """One server's stats from each worker's: sums, with ratios recomputed from the sums."""
    engines = [stats["engine"] for _, stats in per_worker]
    engine = _sum_dicts(engines)
    blocks = engine.get("num_kv_blocks", 0)
    engine["kv_cache_usage"] = (
        sum(e["kv_cache_usage"] * e["num_kv_blocks"] for e in engines) / blocks if blocks else 0.0
    )
    queries = engine.get("prefix_cache_queries", 0)
    engine["prefix_cache_hit_rate"] = engine.get("prefix_cache_hits", 0) / queries if queries else 0.0
    return {
        "engine": engine,
        "counters": _sum_dicts([stats["counters"] for _, stats in per_worker]),
        "kv_cache_tokens": sum(stats["kv_cache_tokens"] for _, stats in per_worker),
        "uptime_s": max((stats["uptime_s"] for _, stats in per_worker), default=0.0),
        "workers": [{"worker": worker, **stats} for worker, stats in per_worker],
    }


class _Writer(PrometheusWriter):
    def __init__(self, model: str) -> None:
        super().__init__({"model_name": model})

    def gauge(self, name: str, help_text: str, total: float, per_worker: list[tuple[int, float]]) -> None:
        samples = [({}, total), *(({"worker": str(w)}, v) for w, v in per_worker)]
        self.metric(name, "gauge", help_text, samples)


def render_metrics(stats: dict[str, Any], model: str) -> str:
    engine = stats["engine"]
    counters = stats["counters"]
    out = _Writer(model)
    workers = stats["workers"]
    for key, name, help_text in _ENGINE_GAUGES:
        out.gauge(name, help_text, engine[key], [(w["worker"], w["engine"][key]) for w in workers])
    out.gauge(
        "servekit:kv_cache_tokens",
        "KV-cache capacity in tokens.",
        stats["kv_cache_tokens"],
        [(w["worker"], w["kv_cache_tokens"]) for w in workers],
    )
    out.one(
        "servekit:prefix_cache_queries_total",
        "counter",
        "Prompt tokens looked up.",
        engine["prefix_cache_queries"],
    )
    out.one(
        "servekit:prefix_cache_hits_total",
        "counter",
        "Prompt tokens found cached.",
        engine["prefix_cache_hits"],
    )
    out.one("servekit:num_preemptions_total", "counter", "Preempted sequences.", engine["num_preemptions"])
    out.one("servekit:engine_steps_total", "counter", "Engine steps run.", engine["num_steps"])
    out.one(
        "servekit:engine_step_seconds_total",
        "counter",
        "Time spent in engine steps (scheduling, forward, sampling, detokenization).",
        engine["step_time_s"],
    )
    out.one(
        "servekit:engine_forward_seconds_total",
        "counter",
        "Time spent in model forward passes.",
        engine["forward_time_s"],
    )
    out.one(
        "servekit:prompt_tokens_total",
        "counter",
        "Prompt tokens of finished requests.",
        counters["prompt_tokens"],
    )
    out.one(
        "servekit:generation_tokens_total",
        "counter",
        "Tokens generated by finished requests.",
        counters["generation_tokens"],
    )
    out.metric(
        "servekit:requests_total",
        "counter",
        "Requests received, by kind.",
        [({"kind": k}, v) for k, v in sorted(counters["requests"].items())],
    )
    out.metric(
        "servekit:request_errors_total",
        "counter",
        "Requests that failed, by status code.",
        [({"status": k}, v) for k, v in sorted(counters["errors"].items())],
    )
    out.metric(
        "servekit:request_success_total",
        "counter",
        "Finished sequences, by finish reason.",
        [({"finished_reason": k}, v) for k, v in sorted(counters["finished"].items())],
    )
    out.one(
        "servekit:num_aborted_requests_total",
        "counter",
        "Requests ended before their stop condition (aborted by id or the client went away).",
        counters["aborted"],
    )
    histograms = (
        ("servekit:time_to_first_token_seconds", "Time to first token.", counters["ttft"]),
        (
            "servekit:inter_token_latency_seconds",
            "Time between consecutive tokens.",
            engine["inter_token_latency"],
        ),
        ("servekit:e2e_request_latency_seconds", "Request latency, arrival to finish.", counters["e2e"]),
        (
            "servekit:request_queue_time_seconds",
            "Time waiting before first scheduled.",
            counters["queue_time"],
        ),
    )
    for name, help_text, hist in histograms:
        out.histogram(name, help_text, [({}, Histogram.merged([hist]))])
    out.gauge(
        "servekit:uptime_seconds",
        "Seconds since the engine started (the longest-running worker's, without a worker label).",
        stats["uptime_s"],
        [(w["worker"], w["uptime_s"]) for w in workers],
    )
    return out.text()
