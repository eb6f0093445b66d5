"""``servekit proxy``: its flags (each also a ``SERVEKIT_PROXY_*`` env var) and running it."""

from __future__ import annotations

import argparse
import logging
import sys

from servekit.proxy.config import ProxyConfig
from servekit.settings import SettingError, add_arguments

logger = logging.getLogger(__name__)


def add_proxy_arguments(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, ProxyConfig, repeated=("node",))
    parser.add_argument(
        "--no-state-file",
        dest="state_file",
        action="store_const",
        const="none",
        help="keep no state file (overrides SERVEKIT_PROXY_STATE_FILE)",
    )


def run_proxy_command(args: argparse.Namespace) -> int:
    try:
        config = ProxyConfig.resolve(vars(args))
    except SettingError as error:
        print(f"servekit proxy: error: {error}", file=sys.stderr)
        return 2
    run_proxy(config)
    return 0


def run_proxy(config: ProxyConfig) -> None:
    """Serve the proxy until SIGINT/SIGTERM."""
    import uvicorn

    from servekit.http.graceful import GracefulServer
    from servekit.proxy.app import build_app
    from servekit.proxy.front import protocol_for

    level = config.log_level.lower()
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.info(
        "servekit proxy on http://%s:%d (routing: %s, %d node%s given)",
        config.host,
        config.port,
        config.routing_strategy,
        len(config.nodes),
        "" if len(config.nodes) == 1 else "s",
    )
    app = build_app(config)
    options = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        loop="uvloop",
        http=protocol_for(app),  # httptools, the proxied routes served without ASGI
        log_level=level,
        access_log=level == "debug",
        proxy_headers=False,  # the proxy uses no client address: no X-Forwarded-* work per request
        timeout_graceful_shutdown=30,
        backlog=2048,
    )
    GracefulServer(options).run()
