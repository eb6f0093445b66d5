"""Consistent hashing with bounded load, for session affinity.

Each node owns ``VIRTUAL_POINTS`` points on a hash ring; a session goes to the owner of the first point
clockwise from its hash. Removing a node moves only the sessions it owned; adding one takes over about
1/N of them. Bounded load (Mirrokni et al.): a node already holding more than ``load_factor`` times the
average load (counting this request) is skipped for the next point's owner, so a hot session set cannot
overload one node, and the session returns to its own node once the load evens out.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Sequence

from servekit.proxy.registry import Node

VIRTUAL_POINTS = 64


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class SessionRing:
    def __init__(self, load_factor: float = 1.25) -> None:
        if load_factor < 1:
            raise ValueError(f"load_factor must be at least 1, got {load_factor}")
        self.load_factor = load_factor
        self._key: frozenset[str] = frozenset()
        self._points: list[int] = []
        self._owners: list[str] = []

    def _build(self, urls: frozenset[str]) -> None:
        ring = sorted((_hash(f"{url}#{i}"), url) for url in urls for i in range(VIRTUAL_POINTS))
        self._points = [point for point, _ in ring]
        self._owners = [url for _, url in ring]
        self._key = urls

    def owner(self, session: str, nodes: Sequence[Node]) -> Node:
        """The node the session hashes to, load ignored."""
        return self.choose(session, nodes, bounded=False)

    def choose(self, session: str, nodes: Sequence[Node], bounded: bool = True) -> Node:
        by_url = {node.url: node for node in nodes}
        urls = frozenset(by_url)
        if urls != self._key:
            self._build(urls)
        capacity = math.ceil(self.load_factor * (sum(n.load for n in nodes) + 1) / len(nodes))
        start = bisect.bisect(self._points, _hash(session))
        seen: set[str] = set()
        for step in range(len(self._points)):
            url = self._owners[(start + step) % len(self._points)]
            if url in seen:
                continue
            seen.add(url)
            if not bounded or by_url[url].load + 1 <= capacity:
                return by_url[url]
        # Unreachable: some node is at or under the average load, which is under the capacity.
        return min(nodes, key=lambda n: n.load)

    def forget(self, url: str) -> None:
        self._key = frozenset()
