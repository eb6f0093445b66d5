"""ProxyConfig: the settings of ``servekit proxy``, each a flag and a ``SERVEKIT_PROXY_<NAME>`` env var."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlsplit

from servekit.settings import SettingError, one_of, read_settings, setting, with_origin

STRATEGIES = (
    "random",
    "min_expected_latency",
    "min_observed_latency",
    "round_robin",
    "power_of_two",
    "least_load",
    "session",
    "cache_aware",
)


class ProxyConfigError(SettingError):
    pass


@dataclass
class ProxyConfig:
    ENV_PREFIX: ClassVar[str] = "SERVEKIT_PROXY_"

    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(8000, "port to listen on")
    routing_strategy: str = setting("min_expected_latency", f"how a node is chosen: {one_of(STRATEGIES)}")
    api_key: str | None = setting(
        None,
        "require this key (Authorization: Bearer or X-API-Key) on every route but /health; "
        "the nodes' own keys are given per node (/nodes/add api_key)",
        secret=True,
    )
    node: str | tuple[str, ...] | None = setting(
        None,
        "a node's URL, registered at start (repeat the flag; env: comma-separated)",
        env=("SERVEKIT_PROXY_NODES",),
    )
    state_file: str | None = setting(
        None, "keep the registered nodes in this JSON file, reloaded at start (default: none)"
    )
    max_request_body_size: str = setting(
        "64MiB", "largest request body accepted (413 beyond): bytes, or with a unit: 512KB, 64MiB"
    )
    health_check_interval: float = setting(2.0, "seconds between health checks of each node")
    health_check_timeout: float = setting(1.0, "seconds a node's /health may take")
    max_attempts: int = setting(3, "nodes tried for one request (connect failure or 503 before any byte)")
    circuit_breaker_failures: int = setting(3, "consecutive failed requests that open a node's circuit")
    circuit_breaker_cooldown: float = setting(
        10.0, "seconds an open circuit stays open before one trial request"
    )
    request_timeout: float | None = setting(
        None, "seconds a node may stay silent while answering (default: no limit)"
    )
    log_level: str = setting("info", "debug, info, warning or error")
    nodes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.routing_strategy not in STRATEGIES:
            raise ProxyConfigError(
                f"routing_strategy must be {one_of(STRATEGIES)}, got {self.routing_strategy!r}",
                "routing_strategy",
            )
        if not 0 < self.port < 65536:
            raise ProxyConfigError(f"port must be in 1..65535, got {self.port}", "port")
        for name in ("health_check_interval", "health_check_timeout", "circuit_breaker_cooldown"):
            if getattr(self, name) <= 0:
                raise ProxyConfigError(f"{name} must be positive, got {getattr(self, name)}", name)
        for name in ("max_attempts", "circuit_breaker_failures"):
            if getattr(self, name) < 1:
                raise ProxyConfigError(f"{name} must be at least 1, got {getattr(self, name)}", name)
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ProxyConfigError(
                f"request_timeout must be positive, got {self.request_timeout}", "request_timeout"
            )
        given = (self.node or "").split(",") if isinstance(self.node, str | None) else self.node
        urls = [url.strip() for url in given if url.strip()]
        self.nodes = tuple(normalize_url(url, "node") for url in urls)
        if self.state_file == "":
            self.state_file = None

    @classmethod
    def resolve(
        cls, flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
    ) -> ProxyConfig:
        values, sources = read_settings(cls, flags or {}, os.environ if env is None else env)
        try:
            return cls(**values)
        except SettingError as error:
            raise with_origin(error, sources) from None


def normalize_url(url: str, name: str = "url") -> str:
    """``http://host:port`` (a path prefix kept) without a trailing slash; anything but an http(s) URL
    without query or fragment is an error."""
    text = url.strip().rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ProxyConfigError(f"{name} must be an http:// or https:// URL, got {url!r}", name)
    return text
