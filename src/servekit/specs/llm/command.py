"""``servekit serve``: its flags (each also read from env vars) and running the server."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from servekit.llm.config import EngineConfig
from servekit.settings import SettingError, add_arguments
from servekit.specs.llm.config import ServeConfig

logger = logging.getLogger(__name__)

POSITIONAL = "model"


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting of ``EngineConfig`` and ``ServeConfig``; every default is None so that env
    vars can fill what is not given. Values are parsed later, by the settings' own parser."""
    for title, config_class in (("engine", EngineConfig), ("server", ServeConfig)):
        add_arguments(parser.add_argument_group(f"{title} settings"), config_class, positional=POSITIONAL)


def resolve_serve_config(args: argparse.Namespace) -> ServeConfig | None:
    """The configuration of ``servekit serve``, or None after saying what is wrong (exit code 2)."""
    try:
        return ServeConfig.resolve(vars(args))
    except SettingError as error:  # a bad flag or env value: say which, no traceback
        print(f"servekit serve: error: {error}", file=sys.stderr)
        return None


def serve(config: ServeConfig, **run_kwargs: Any) -> None:
    """Build the ``LitServer`` of the LLM server and run it until stopped."""
    from servekit.server import LitServer
    from servekit.specs.llm.api import LLMServerAPI
    from servekit.specs.llm.spec import LLMServerSpec

    api = LLMServerAPI(config, spec=LLMServerSpec(config))
    server = LitServer(
        api,
        accelerator="auto",
        workers_per_device=config.workers,
        timeout=config.request_timeout if config.request_timeout is not None else False,
        api_key=config.api_key,
        max_payload_size=config.max_request_body_size,
        debug_errors=config.debug_errors,
        model_metadata={"model": config.engine.model or "SmolLM2-135M-Instruct (default)"},
    )
    model = config.engine.model or "the default model"
    logger.info("serving %s on http://%s:%d", model, config.host, config.port)
    server.run(host=config.host, port=config.port, generate_client_file=False, **run_kwargs)
