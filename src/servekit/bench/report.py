"""The benchmark's figures from its results, with ``vllm bench serve``'s names: throughput, and
mean / median / std / percentiles of TTFT, TPOT, ITL and end-to-end latency (in ms)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from servekit.bench.runner import RequestResult

METRICS = ("ttft", "tpot", "itl", "e2el")
_TITLES = {
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency",
    "e2el": "End-to-end Latency",
}


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _series(results: Sequence[RequestResult]) -> dict[str, list[float]]:
    ok = [r for r in results if r.ok]
    return {
        "ttft": [r.ttft for r in ok],
        "tpot": [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1],
        "itl": [itl for r in ok for itl in r.itls],
        "e2el": [r.latency for r in ok],
    }


def summarize(
    results: Sequence[RequestResult],
    duration: float,
    percentiles: Sequence[float],
    settings: dict[str, Any],
) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    report: dict[str, Any] = {
        **settings,
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": output_tokens / duration if duration else 0.0,
        "total_token_throughput": (input_tokens + output_tokens) / duration if duration else 0.0,
    }
    for name, values in _series(results).items():
        ms = [v * 1000 for v in values]
        report[f"mean_{name}_ms"] = statistics.fmean(ms) if ms else 0.0
        report[f"median_{name}_ms"] = statistics.median(ms) if ms else 0.0
        report[f"std_{name}_ms"] = statistics.pstdev(ms) if len(ms) > 1 else 0.0
        for q in percentiles:
            report[f"p{q:g}_{name}_ms"] = percentile(ms, q)
    report["input_lens"] = [r.prompt_tokens for r in results]
    report["output_lens"] = [r.output_tokens for r in results]
    report["ttfts"] = [r.ttft for r in results]
    report["e2els"] = [r.latency for r in results]
    report["itls"] = [r.itls for r in results]
    report["start_times"] = [r.start for r in results]
    report["chunk_times"] = [r.chunk_times for r in results]
    report["errors"] = [r.error for r in results]
    return report


def format_report(report: dict[str, Any], percentiles: Sequence[float]) -> str:
    lines = ["{s:{c}^60}".format(s=" Serving Benchmark Result ", c="=")]

    def row(label: str, value: Any) -> None:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        lines.append(f"{label:<45}{text:>15}")

    row("Successful requests:", report["completed"])
    row("Failed requests:", report["failed"])
    row("Maximum request concurrency:", report.get("max_concurrency") or "none")
    row("Request rate (req/s):", report.get("request_rate"))
    row("Benchmark duration (s):", report["duration"])
    row("Total input tokens:", report["total_input_tokens"])
    row("Total generated tokens:", report["total_output_tokens"])
    row("Request throughput (req/s):", report["request_throughput"])
    row("Output token throughput (tok/s):", report["output_throughput"])
    row("Total token throughput (tok/s):", report["total_token_throughput"])
    for name in METRICS:
        lines.append("{s:{c}^60}".format(s=f" {_TITLES[name]} ", c="-"))
        upper = name.upper()
        row(f"Mean {upper} (ms):", report[f"mean_{name}_ms"])
        row(f"Median {upper} (ms):", report[f"median_{name}_ms"])
        for q in percentiles:
            row(f"P{q:g} {upper} (ms):", report[f"p{q:g}_{name}_ms"])
    lines.append("=" * 60)
    errors = [e for e in report["errors"] if e]
    if errors:
        lines.append(f"first error: {errors[0]}")
    return "\n".join(lines)
