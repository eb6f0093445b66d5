"""``servekit serve`` beyond one server: registered with a proxy (``--proxy-url``), or as local
replicas behind one (``--replicas N``)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from servekit.specs.llm.command import serve
from servekit.specs.llm.config import ServeConfig

if TYPE_CHECKING:
    from servekit.integrations.ray import RayReplicaSet

logger = logging.getLogger(__name__)


def serve_scaled(config: ServeConfig, raw_flags: Mapping[str, Any]) -> None:
    """Serve ``config`` until stopped, as one server, one registered with a proxy, or replicas."""
    if config.replicas > 1 or config.ray_address:
        serve_replicas(config, raw_flags)
    elif config.proxy_url:
        from servekit.proxy.registration import DeregisterOnStop, advertised_url, registered_with

        node_url = config.advertise_url or advertised_url(config.host, config.port)
        with registered_with(
            config.proxy_url,
            node_url,
            config.api_key,
            config.proxy_api_key,
            config.proxy_heartbeat_interval,
        ) as registration:
            serve(config, callbacks=[DeregisterOnStop(registration)])
    else:
        serve(config)


def serve_replicas(config: ServeConfig, raw_flags: Mapping[str, Any]) -> None:
    """``config.replicas`` servers behind a proxy on the public address: child processes on 127.0.0.1
    ports, or Ray actors anywhere on a cluster (``config.ray_address``). The proxy's settings other than
    its address and key come from ``SERVEKIT_PROXY_*``."""
    from servekit.proxy.command import run_proxy
    from servekit.proxy.config import ProxyConfig
    from servekit.proxy.replicas import ReplicaSet, replica_flags

    flags = replica_flags(raw_flags)
    replicas: ReplicaSet | RayReplicaSet
    if config.ray_address:
        from servekit.integrations.ray import RayReplicaSet

        local = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
        replicas = RayReplicaSet(
            config.ray_address,
            config.replicas,
            flags,
            proxy_url=f"http://{local}:{config.port}",
            api_key=config.api_key,
            num_cpus=config.num_cpus_per_replica,
            num_gpus=config.num_gpus_per_replica,
        )
        nodes: list[str] = []  # the actors register themselves once they serve
    else:
        replicas = ReplicaSet(config.replicas, flags, config.api_key)
        nodes = replicas.urls
    proxy_config = ProxyConfig.resolve(
        {
            "host": config.host,
            "port": config.port,
            "api_key": config.api_key,
            "state_file": "none",  # the replicas are this process's own: nothing to reload
            "node": nodes,
        }
    )
    try:
        replicas.start()
    except RuntimeError as error:  # e.g. a Ray cluster too small for the replicas asked for
        print(f"servekit serve: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        run_proxy(proxy_config)
    finally:
        replicas.stop()
