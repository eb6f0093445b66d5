"""Routing strategies: which of the candidate nodes (healthy, serving the model) gets a request.

Every strategy takes an injected ``random.Random``, so its choices are reproducible in tests.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from servekit.proxy.prefix_cache import PrefixIndex
from servekit.proxy.registry import Node
from servekit.proxy.sessions import SessionRing


@dataclass(frozen=True)
class Route:
    """What routing may look at in a request."""

    model: str | None = None
    session: str | None = None  # X-Session-Id, session_id or user
    prompt: str = ""  # the prompt's text (messages joined), for cache-aware routing


class Strategy(Protocol):
    uses_prompt: bool  # reads ``Route.prompt`` (when False, the prompt's text is not extracted)

    def choose(self, nodes: Sequence[Node], route: Route) -> Node:
        """One of ``nodes`` (never empty)."""
        ...

    def forget(self, url: str) -> None:
        """A node was removed from the registry."""
        ...


class _Stateless:
    uses_prompt = False

    def forget(self, url: str) -> None:
        return None


def _argmin(nodes: Sequence[Node], key: Callable[[Node], float], rng: random.Random) -> Node:
    """The node with the lowest key; ties broken at random, so equal nodes share the work."""
    best = min(key(node) for node in nodes)
    return rng.choice([node for node in nodes if key(node) == best])


def _speeds(nodes: Sequence[Node]) -> list[float]:
    """Each node's speed; a node registered without one counts as the average of those given (1 when
    none is), as LMDeploy does."""
    given = [node.speed for node in nodes if node.speed is not None and node.speed > 0]
    default = sum(given) / len(given) if given else 1.0
    return [node.speed if node.speed is not None and node.speed > 0 else default for node in nodes]


class RandomStrategy(_Stateless):
    """A node at random, with probability proportional to its speed."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def choose(self, nodes: Sequence[Node], route: Route) -> Node:
        return self.rng.choices(list(nodes), weights=_speeds(nodes))[0]


class MinExpectedLatency(_Stateless):
    """The node whose queue would drain first: (in-flight + 1) / speed."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def choose(self, nodes: Sequence[Node], route: Route) -> Node:
        speed = dict(zip((n.url for n in nodes), _speeds(nodes), strict=True))
        return _argmin(nodes, lambda n: (n.in_flight + 1) / speed[n.url], self.rng)


class MinObservedLatency(_Stateless):
    """The node with the lowest mean latency over its recent requests; a node without any is tried first."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def choose(self, nodes: Sequence[Node], route: Route) -> Node:
        return _argmin(nodes, lambda n: sum(n.latencies) / len(n.latencies) if n.latencies else 0.0, self.rng)


class RoundRobin(_Stateless):
    """Each candidate in turn (in URL order, so the cycle does not depend on registration order)."""

    def __init__(self, rng: random.Random) -> None:
        self._counter = itertools.count()

    def choose(self, nodes: Sequence[Node], route: Route) -> Node:
        ordered = sorted(nodes, key=lambda n: n.url)
        return ordered[next(self._counter) % len(ordered)]


class PowerOfTwo(_Stateless):
    """Two distinct nodes at random, the less loaded of them."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def choose(self, nodes: Sequence[Node], route: Route) -> Node:
        if len(nodes) == 1:
            return nodes[0]
        first, second = self.rng.sample(list(nodes), 2)
        return second if second.load < first.load else first


class LeastLoad(_Stateless):
    """The node with the fewest running + waiting requests (the node's own counts from /metrics,
    this proxy's in-flight count when higher)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def choose(self, nodes: Sequence[Node], route: Route) -> Node:
        return _argmin(nodes, lambda n: n.load, self.rng)


class SessionAffinity:
    """A session's requests go to one node (consistent hashing with bounded load); requests without a
    session go to the least-loaded node."""

    uses_prompt = False

    def __init__(self, rng: random.Random, load_factor: float = 1.25) -> None:
        self.ring = SessionRing(load_factor=load_factor)
        self.fallback = LeastLoad(rng)

    def choose(self, nodes: Sequence[Node], route: Route) -> Node:
        if route.session is None:
            return self.fallback.choose(nodes, route)
        return self.ring.choose(route.session, nodes)

    def forget(self, url: str) -> None:
        self.ring.forget(url)


class CacheAware:
    """The node whose prefix tree holds the longest prefix of the prompt, when it holds at least
    ``match_threshold`` of it and the load is balanced; otherwise the least-loaded node. Every routed
    prompt is added to its node's tree.

    Load is imbalanced when the busiest candidate has more than ``balance_abs`` requests over the idlest
    and more than ``balance_rel`` times its load: then the least-loaded node serves the request even on
    a cache hit, so one hot prefix cannot pile every request onto one node.
    """

    uses_prompt = True

    def __init__(
        self,
        rng: random.Random,
        match_threshold: float = 0.5,
        balance_abs: int = 4,
        balance_rel: float = 1.5,
        index: PrefixIndex | None = None,
    ) -> None:
        self.rng = rng
        self.match_threshold = match_threshold
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self.index = index or PrefixIndex()

    def choose(self, nodes: Sequence[Node], route: Route) -> Node:
        node = self._pick(nodes, route)
        if route.prompt:
            self.index.insert(node.url, route.prompt)
        return node

    def _pick(self, nodes: Sequence[Node], route: Route) -> Node:
        loads = [node.load for node in nodes]
        lowest, highest = min(loads), max(loads)
        imbalanced = highest - lowest > self.balance_abs and highest > self.balance_rel * lowest
        if route.prompt and not imbalanced:
            matched = self.index.match(route.prompt, [node.url for node in nodes])
            best = max(matched.values(), default=0)
            if best and best >= self.match_threshold * len(route.prompt):
                hits = [node for node in nodes if matched.get(node.url) == best]
                return _argmin(hits, lambda n: n.load, self.rng)
        return _argmin(nodes, lambda n: n.load, self.rng)

    def forget(self, url: str) -> None:
        self.index.forget(url)


_STRATEGIES: dict[str, Callable[[random.Random], Strategy]] = {
    "random": RandomStrategy,
    "min_expected_latency": MinExpectedLatency,
    "min_observed_latency": MinObservedLatency,
    "round_robin": RoundRobin,
    "power_of_two": PowerOfTwo,
    "least_load": LeastLoad,
    "session": SessionAffinity,
    "cache_aware": CacheAware,
}


def make_strategy(name: str, rng: random.Random | None = None) -> Strategy:
    """The strategy named ``name`` (one of ``config.STRATEGIES``)."""
    return _STRATEGIES[name](rng or random.Random())
