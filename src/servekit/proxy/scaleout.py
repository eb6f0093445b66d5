"""``servekit serve`` beyond one server: registered with a proxy (``--proxy-url``), or as local
replicas behind one (``--replicas N``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from servekit.specs.llm.command import serve
from servekit.specs.llm.config import ServeConfig

logger = logging.getLogger(__name__)


def serve_scaled(config: ServeConfig, raw_flags: Mapping[str, Any]) -> None:
    """Serve ``config`` until stopped, as one server, one registered with a proxy, or replicas."""
    if config.replicas > 1:
        serve_replicas(config, raw_flags)
    elif config.proxy_url:
        from servekit.proxy.registration import advertised_url, registered_with

        node_url = config.advertise_url or advertised_url(config.host, config.port)
        with registered_with(config.proxy_url, node_url, config.api_key, config.proxy_api_key):
            serve(config)
    else:
        serve(config)


def serve_replicas(config: ServeConfig, raw_flags: Mapping[str, Any]) -> None:
    """``config.replicas`` servers on 127.0.0.1 ports, a proxy on the public address in front of them.
    The proxy's settings other than its address and key come from ``SERVEKIT_PROXY_*``."""
    from servekit.proxy.command import run_proxy
    from servekit.proxy.config import ProxyConfig
    from servekit.proxy.replicas import ReplicaSet, replica_flags

    replicas = ReplicaSet(config.replicas, replica_flags(raw_flags), config.api_key)
    proxy_config = ProxyConfig.resolve(
        {
            "host": config.host,
            "port": config.port,
            "api_key": config.api_key,
            "state_file": "none",  # the replicas are this process's own: nothing to reload
            "node": replicas.urls,
        }
    )
    replicas.start()
    try:
        run_proxy(proxy_config)
    finally:
        replicas.stop()
