"""The proxy's state and what changes it: the registry (persisted), the strategy, the shared HTTP pool,
the metrics, and the active health checks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from typing import Any

import orjson

from servekit.proxy.config import ProxyConfig
from servekit.proxy.health import NodeHealth
from servekit.proxy.metrics import ProxyMetrics
from servekit.proxy.registry import Node, Registry
from servekit.proxy.sessions import SessionRing
from servekit.proxy.state import load_state, save_state
from servekit.proxy.strategies import make_strategy
from servekit.proxy.upstream import UPSTREAM_ERRORS, Pool, header_block

logger = logging.getLogger(__name__)

LOAD_METRICS = (":num_requests_running", ":num_requests_waiting")
# What a request to a node may raise: a connection or protocol failure, or a timeout.
HTTP_ERRORS = UPSTREAM_ERRORS


class NodeUnreachable(Exception):
    """A node could not be asked for its models."""


def node_headers(node: Node) -> dict[str, str]:
    return {"Authorization": f"Bearer {node.api_key}"} if node.api_key else {}


def parse_load(text: str) -> int:
    """Running + waiting requests from a node's Prometheus text (servekit's or vLLM's names); samples
    with a ``worker`` label are per worker and already in the total."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or "worker=" in line:
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name.endswith(LOAD_METRICS):
            with contextlib.suppress(ValueError, IndexError):
                total += float(line.rsplit(" ", 1)[1])
    return int(total)


class Proxy:
    def __init__(self, config: ProxyConfig, rng: random.Random | None = None) -> None:
        self.config = config
        # Tells a registered node that this proxy restarted (and forgot it, without a state file).
        self.instance_id = uuid.uuid4().hex
        self.registry = Registry()
        self.strategy = make_strategy(config.routing_strategy, rng)
        self.interactive_ring = SessionRing()  # interactive sessions live on one node: always that one
        self.metrics = ProxyMetrics()
        self._pool: Pool | None = None
        self._checker: asyncio.Task[None] | None = None
        self._scrape_load = config.routing_strategy in (
            "least_load",
            "power_of_two",
            "cache_aware",
            "session",
        )

    # ------------------------------------------------------------------ lifecycle
    @property
    def pool(self) -> Pool:
        """The one connection pool to every node (created by ``start``)."""
        if self._pool is None:
            raise RuntimeError("the proxy is not started")
        return self._pool

    async def start(self) -> None:
        """Register the state file's nodes and the configured ones, then check them in the background.
        They serve once their health checks pass."""
        # A lean client of its own rather than httpx or aiohttp: on this project's 2-core machines the
        # client's CPU per request is most of the proxy's (benchmarks/RESULTS.md). Bodies stay as the
        # node sent them (no decompression).
        self._pool = Pool(connect_timeout=5.0, read_timeout=self.config.request_timeout)
        known = load_state(self.config.state_file) if self.config.state_file else []
        for node in known:
            self._register(node)
        for url in self.config.nodes:
            if url not in self.registry:
                self._register(Node(url))
        self._save()
        self._checker = asyncio.create_task(self._check_forever(), name="servekit-proxy-health")

    async def close(self) -> None:
        if self._checker is not None:
            self._checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checker
        if self._pool is not None:
            self._pool.close()

    # ------------------------------------------------------------------ registry
    def _register(self, node: Node) -> Node:
        if node.url not in self.registry:
            node.health = NodeHealth(
                self.config.circuit_breaker_failures, self.config.circuit_breaker_cooldown
            )
        return self.registry.add(node)

    async def add_node(
        self, url: str, models: list[str] | None, speed: float | None, api_key: str | None
    ) -> Node:
        """Register a node; its models are asked from its ``/v1/models`` when not given. A node that
        answered is healthy at once (it just proved it); one registered with its models given waits for
        its health checks."""
        probe = Node(url, api_key=api_key)
        found = models if models else await self.discover_models(probe)
        node = self._register(Node(url, models=found, speed=speed, api_key=api_key))
        if not models and not node.health.healthy:
            node.health.check_succeeded()
            node.health.check_succeeded()
        self._save()
        logger.info("node %s added (models: %s)", url, ", ".join(found) or "none")
        return node

    def remove_node(self, url: str) -> Node | None:
        node = self.registry.remove(url)
        if node is not None:
            self.strategy.forget(url)
            self.interactive_ring.forget(url)
            self._save()
            logger.info("node %s removed", url)
        return node

    def _save(self) -> None:
        if self.config.state_file:
            save_state(self.config.state_file, self.registry)

    async def fetch(
        self,
        method: str,
        node: Node,
        path: str,
        body: bytes | None = None,
        timeout: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """One request to a node, its key attached: the status and the whole body. Raises
        ``HTTP_ERRORS``."""
        return await self.pool.fetch(
            method,
            node.url,
            path.encode(),
            header_block({**(headers or {}), **node_headers(node)}),
            body or b"",
            timeout,
        )

    async def discover_models(self, node: Node) -> list[str]:
        try:
            status, body = await self.fetch(
                "GET", node, "/v1/models", timeout=self.config.health_check_timeout * 5
            )
            if status != 200:
                raise ValueError(f"HTTP {status}")
            return [str(item["id"]) for item in orjson.loads(body)["data"]]
        except (*HTTP_ERRORS, ValueError, KeyError, TypeError) as error:
            raise NodeUnreachable(
                f"cannot list the models of {node.url}: {error or type(error).__name__}"
            ) from None

    # ------------------------------------------------------------------ health checks
    async def check(self, node: Node) -> None:
        """One active check: ``/health`` (and the node's load from ``/metrics`` when routing uses it)."""
        try:
            status, _ = await self.fetch("GET", node, "/health", timeout=self.config.health_check_timeout)
            passed = status == 200
        except HTTP_ERRORS:
            passed = False
        if not passed:
            if node.health.check_failed():
                logger.warning("node %s is unhealthy", node.url)
            return
        if not node.models:
            with contextlib.suppress(NodeUnreachable):
                node.models = await self.discover_models(node)
                self._save()
        if node.health.check_succeeded():
            logger.info("node %s is healthy", node.url)
        if self._scrape_load:
            with contextlib.suppress(*HTTP_ERRORS):
                status, text = await self.fetch(
                    "GET", node, "/metrics", timeout=self.config.health_check_timeout
                )
                if status == 200:
                    node.reported_load = parse_load(text.decode(errors="replace"))

    async def _check_forever(self) -> None:
        while True:
            nodes = list(self.registry)
            for node, result in zip(
                nodes,
                await asyncio.gather(*(self.check(node) for node in nodes), return_exceptions=True),
                strict=True,
            ):
                if isinstance(result, Exception):  # a bug must not stop the checks of every node
                    logger.error("health check of %s failed", node.url, exc_info=result)
            await asyncio.sleep(self.config.health_check_interval)  # the check period, not a wait for state

    # ------------------------------------------------------------------ broadcasting
    async def broadcast(
        self, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> list[dict[str, Any]]:
        """Send one request to every node; each node's answer (status and JSON body, or the error)."""

        async def one(node: Node) -> dict[str, Any]:
            try:
                status, content = await self.fetch(method, node, path, body or None, headers=headers)
            except HTTP_ERRORS as error:
                return {"url": node.url, "status": 502, "error": f"{type(error).__name__}: {error}"}
            try:
                answer: Any = orjson.loads(content)
            except orjson.JSONDecodeError:
                answer = content.decode(errors="replace")
            return {"url": node.url, "status": status, "body": answer}

        return list(await asyncio.gather(*(one(node) for node in self.registry)))

    @staticmethod
    def now() -> float:
        return time.monotonic()
