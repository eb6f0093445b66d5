"""``servekit serve``: its flags (each also read from env vars) and running the server."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from servekit.specs.llm.config import SETTINGS, ServeConfig, ServeConfigError, env_name

logger = logging.getLogger(__name__)

API_KEY_ENV = "LIT_SERVER_API_KEY"  # the core's auth reads this one


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; every default is None so that env vars can fill what is not given."""
    for setting in SETTINGS:
        envs = ", ".join((env_name(setting.name), *setting.aliases))
        default = "" if setting.default is None else f"default: {setting.default}; "
        help_text = f"{setting.help} ({default}env: {envs})"
        if setting.positional:
            parser.add_argument(setting.name, nargs="?", default=None, help=help_text)
            continue
        flag = "--" + setting.name.replace("_", "-")
        if setting.kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(
                flag, type=setting.kind, default=None, help=help_text, metavar=setting.name.upper()
            )


def run_serve(args: argparse.Namespace) -> int:
    flags = {s.name: getattr(args, s.name, None) for s in SETTINGS}
    try:
        config = ServeConfig.resolve(flags)
    except ServeConfigError as error:  # a bad flag or env value: say which, no traceback
        print(f"servekit serve: error: {error}", file=sys.stderr)
        return 2
    serve(config)
    return 0


def serve(config: ServeConfig, **run_kwargs: Any) -> None:
    """Build the ``LitServer`` of the LLM server and run it until stopped."""
    from servekit.server import LitServer
    from servekit.specs.llm.api import LLMServerAPI
    from servekit.specs.llm.spec import LLMServerSpec

    if config.api_key:
        # The core checks every route but /health against LIT_SERVER_API_KEY.
        os.environ[API_KEY_ENV] = config.api_key
    api = LLMServerAPI(config, spec=LLMServerSpec(config))
    server = LitServer(
        api,
        accelerator="auto",
        workers_per_device=config.workers,
        timeout=config.request_timeout if config.request_timeout is not None else False,
        model_metadata={"model": config.model or "SmolLM2-135M-Instruct (default)"},
    )
    logger.info("serving %s on http://%s:%d", config.model or "the default model", config.host, config.port)
    server.run(host=config.host, port=config.port, generate_client_file=False, **run_kwargs)
