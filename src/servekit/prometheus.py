"""Prometheus' text exposition format, written by hand (no registry, no global state): the LLM
server's and the proxy's ``/metrics``."""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets, so dashboards written for it show the same resolution.
TTFT_BOUNDS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
ITL_BOUNDS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
REQUEST_BOUNDS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)
HTTP_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


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

    @classmethod
    def merged(cls, parts: Sequence[Mapping[str, Any]]) -> Histogram:
        """One histogram from several with the same bounds, each as ``dataclasses.asdict`` gives it
        (how workers send theirs to the front)."""
        if not parts:
            raise ValueError("no histograms to merge")
        bounds = [float(b) for b in parts[0]["bounds"]]
        merged = cls(bounds)
        for part in parts:
            if [float(b) for b in part["bounds"]] != bounds:
                raise ValueError("histograms with different bounds cannot be merged")
            merged.counts = [a + int(b) for a, b in zip(merged.counts, part["counts"], strict=True)]
            merged.total += float(part["total"])
            merged.count += int(part["count"])
        return merged


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
