"""The nodes the proxy routes to: what each serves, its load and latencies, and its health."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from dataclasses import dataclass, field

from servekit.proxy.health import NodeHealth

LATENCY_WINDOW = 32  # recent request latencies kept per node (min_observed_latency)


@dataclass
class Node:
    url: str
    models: list[str] = field(default_factory=list)
    speed: float | None = None  # relative throughput given at registration (LMDeploy's "speed")
    api_key: str | None = None  # the node's own key, sent as a Bearer token
    health: NodeHealth = field(default_factory=NodeHealth)
    in_flight: int = 0  # requests this proxy has open on the node
    reported_load: int = 0  # running + waiting, from the node's /metrics
    latencies: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=LATENCY_WINDOW)
    )

    def serves(self, model: str | None) -> bool:
        return model is None or model in self.models

    @property
    def load(self) -> int:
        """The node's own count of running + waiting requests, or this proxy's in-flight count when that
        is higher (the node's numbers are as old as the last scrape)."""
        return max(self.in_flight, self.reported_load)

    def persisted(self) -> dict[str, object]:
        """What the state file keeps of a node: its identity, never counters or health."""
        data: dict[str, object] = {"url": self.url, "models": list(self.models), "speed": self.speed}
        if self.api_key is not None:
            data["api_key"] = self.api_key
        return data


class Registry:
    """Nodes by URL, in registration order."""

    def __init__(self) -> None:
        self._nodes: dict[str, Node] = {}

    def __iter__(self) -> Iterator[Node]:
        return iter(list(self._nodes.values()))

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, url: str) -> bool:
        return url in self._nodes

    def get(self, url: str) -> Node | None:
        return self._nodes.get(url)

    def add(self, node: Node) -> Node:
        """Register ``node``; a node already registered keeps its counters and health, and takes the
        new models, speed and key."""
        known = self._nodes.get(node.url)
        if known is None:
            self._nodes[node.url] = node
            return node
        known.models, known.speed, known.api_key = node.models, node.speed, node.api_key
        return known

    def remove(self, url: str) -> Node | None:
        return self._nodes.pop(url, None)

    def serves(self, model: str) -> bool:
        return any(model in node.models for node in self._nodes.values())

    def models(self) -> list[str]:
        """Every model some node serves, in first-seen order."""
        return list(dict.fromkeys(model for node in self._nodes.values() for model in node.models))

    def candidates(
        self, model: str | None, now: float, exclude: set[str] | frozenset[str] = frozenset()
    ) -> list[Node]:
        """The nodes that serve ``model`` and admit a request now."""
        return [
            node
            for node in self._nodes.values()
            if node.url not in exclude and node.serves(model) and node.health.admits(now)
        ]
