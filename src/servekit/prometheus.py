"""Prometheus' text exposition format, written by hand (no registry, no global state): the LLM
server's and the proxy's ``/metrics``."""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@dataclass
class Histogram:
    """Cumulative buckets, as Prometheus counts them."""

    bounds: Sequence[float]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.bounds, value)
        if index < len(self.counts):
            self.counts[index] += 1
        self.total += value
        self.count += 1


class PrometheusWriter:
    """Metrics in text format; every sample carries ``base_labels``."""

    def __init__(self, base_labels: Mapping[str, str] | None = None) -> None:
        self.lines: list[str] = []
        self.base = {k: escape(v) for k, v in (base_labels or {}).items()}

    def _labels(self, labels: Mapping[str, str]) -> str:
        merged = {**self.base, **{k: escape(v) for k, v in labels.items()}}
        return "{" + ",".join(f'{k}="{v}"' for k, v in merged.items()) + "}" if merged else ""

    def _head(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def metric(
        self, name: str, kind: str, help_text: str, samples: Sequence[tuple[Mapping[str, str], float]]
    ) -> None:
        self._head(name, kind, help_text)
        for labels, value in samples:
            self.lines.append(f"{name}{self._labels(labels)} {float(value)!r}")

    def one(self, name: str, kind: str, help_text: str, value: float) -> None:
        self.metric(name, kind, help_text, [({}, value)])

    def histogram(
        self, name: str, help_text: str, samples: Sequence[tuple[Mapping[str, str], Histogram]]
    ) -> None:
        self._head(name, "histogram", help_text)
        for labels, hist in samples:
            cumulative = 0
            for bound, count in zip(hist.bounds, hist.counts, strict=True):
                cumulative += count
                self.lines.append(
                    f"{name}_bucket{self._labels({**labels, 'le': repr(float(bound))})} {cumulative}"
                )
            self.lines.append(f"{name}_bucket{self._labels({**labels, 'le': '+Inf'})} {hist.count}")
            self.lines.append(f"{name}_sum{self._labels(labels)} {hist.total!r}")
            self.lines.append(f"{name}_count{self._labels(labels)} {hist.count}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"
