"""ServeConfig: the settings of ``servekit serve``: the server's own, plus the engine's ``EngineConfig``.

Both are declared as fields with ``servekit.settings.setting``; flags and env names derive from them.
Precedence: command-line flag, then ``SERVEKIT_<NAME>``, then the vLLM-worker names, then the default.
``resolve`` runs once, in the front process; the workers get the resolved (picklable) config.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from servekit.llm.config import EngineConfig
from servekit.settings import SettingError, read_settings, setting, setting_values, with_origin

logger = logging.getLogger(__name__)


class ServeConfigError(SettingError):
    pass


@dataclass
class ServeConfig:
    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(8000, "port to listen on", env=("PORT",))
    api_key: str | None = setting(
        None,
        "require this key (Authorization: Bearer or X-API-Key) on every route but /health",
        env=("LIT_SERVER_API_KEY",),
        secret=True,
    )
    workers: int = setting(1, "inference worker processes (each loads the model)", env=("WORKERS",))
    max_request_body_size: str = setting(
        "64MiB", "largest request body accepted (413 beyond): bytes, or with a unit: 512KB, 64MiB"
    )
    request_timeout: float | None = setting(
        None,
        "seconds a request may take, queue and stream included (default: no limit)",
        env=("REQUEST_TIMEOUT",),
    )
    tool_call_parser: str | None = setting(
        None,
        "tool-call syntax to parse: hermes (also Qwen) or llama3_json (default: by model)",
        env=("TOOL_CALL_PARSER",),
    )
    reasoning_parser: str | None = setting(
        None,
        "return <think>...</think> text as reasoning_content: think, deepseek_r1, qwen3",
        env=("REASONING_PARSER",),
    )
    debug_errors: bool = setting(
        False, "show the exception (type: message) in 500 bodies instead of 'Internal server error'"
    )
    disable_log_requests: bool = setting(False, "do not log each request", env=("DISABLE_LOG_REQUESTS",))
    log_format: str = setting("text", "log lines as text or json (one object a line)")
    access_log: bool = setting(True, "write one access-log line per HTTP request")
    log_prompts: bool = setting(False, "log each request's prompt text (never logged otherwise)")
    replicas: int = setting(
        1, "engine replicas on this machine, each a server on its own 127.0.0.1 port, behind one proxy"
    )
    ray_address: str | None = setting(
        None, "place the replicas as actors on this Ray cluster (auto, ray://host:10001, or local)"
    )
    num_cpus_per_replica: float = setting(1.0, "CPUs Ray reserves for each replica (with --ray-address)")
    num_gpus_per_replica: float = setting(0.0, "GPUs Ray reserves for each replica (with --ray-address)")
    proxy_url: str | None = setting(
        None, "register with this servekit proxy once serving, deregister on shutdown"
    )
    proxy_api_key: str | None = setting(None, "the proxy's API key, for --proxy-url", secret=True)
    advertise_url: str | None = setting(
        None, "the URL the proxy reaches this server at (default: http://HOST:PORT)"
    )
    proxy_heartbeat_interval: float = setting(
        5.0,
        "seconds between checks that the proxy (--proxy-url) is the one this server registered with; "
        "after a restart that forgot it, it registers again",
    )
    allow_terminate_by_client: bool = setting(
        False,
        "serve POST /terminate (as LMDeploy's servers do, for `servekit proxy`'s /nodes/terminate): "
        "a graceful shutdown, behind --api-key, which it needs",
    )
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    sources: dict[str, str] = dataclasses.field(default_factory=dict)  # setting -> where its value came from

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ServeConfigError(f"port must be in 1..65535, got {self.port}", "port")
        if self.workers < 1:
            raise ServeConfigError(f"workers must be at least 1, got {self.workers}", "workers")
        if self.replicas < 1:
            raise ServeConfigError(f"replicas must be at least 1, got {self.replicas}", "replicas")
        for name in ("proxy_url", "advertise_url"):
            url = getattr(self, name)
            parts = urlsplit(url) if url else None
            if parts is not None and (parts.scheme not in ("http", "https") or not parts.netloc):
                raise ServeConfigError(f"{name} must be an http:// or https:// URL, got {url!r}", name)
        if self.num_cpus_per_replica < 0 or self.num_gpus_per_replica < 0:
            raise ServeConfigError("num_cpus/num_gpus_per_replica cannot be negative", "num_cpus_per_replica")
        if self.ray_address and self.proxy_url:
            raise ServeConfigError(
                "proxy_url cannot be combined with ray_address: the replicas' own proxy serves them",
                "proxy_url",
            )
        if self.replicas > 1 and self.proxy_url:
            raise ServeConfigError(
                "proxy_url cannot be combined with replicas > 1: the replicas' own proxy serves them; "
                "register that proxy's port elsewhere instead",
                "proxy_url",
            )
        if self.proxy_heartbeat_interval <= 0:
            raise ServeConfigError(
                f"proxy_heartbeat_interval must be positive, got {self.proxy_heartbeat_interval}",
                "proxy_heartbeat_interval",
            )
        if self.allow_terminate_by_client and not self.api_key:
            raise ServeConfigError(
                "allow_terminate_by_client needs api_key: without one, anyone who reaches the port "
                "could stop the server",
                "allow_terminate_by_client",
            )
        if self.log_format not in ("text", "json"):
            raise ServeConfigError(f"log_format must be text or json, got {self.log_format!r}", "log_format")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ServeConfigError(
                f"request_timeout must be positive, got {self.request_timeout}", "request_timeout"
            )

    @classmethod
    def resolve(
        cls, flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
    ) -> ServeConfig:
        """Flags (None = not given) win over ``SERVEKIT_<NAME>``, which wins over the vLLM names.

        Raises ``SettingError`` (``EngineConfigError`` or ``ServeConfigError``) naming where a bad value
        came from.
        """
        environ = os.environ if env is None else env
        given = flags or {}
        engine_values, engine_sources = read_settings(EngineConfig, given, environ)
        server_values, server_sources = read_settings(cls, given, environ)
        sources = {**engine_sources, **server_sources}
        try:
            return cls(**server_values, engine=EngineConfig(**engine_values), sources=sources)
        except SettingError as error:
            raise with_origin(error, sources) from None

    def redacted(self) -> dict[str, Any]:
        """The effective configuration, for ``/server_info``: secrets replaced by ``***``."""
        data = {**setting_values(self.engine), **setting_values(self)}
        # The engine spells "no quantization" None; flags and /server_info spell it "none".
        data["quantization"] = data["quantization"] or "none"
        data["sources"] = dict(self.sources)
        return data
