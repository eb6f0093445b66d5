"""``servekit serve``: its flags (each also read from env vars) and running the server."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING, Any

from servekit.llm.config import EngineConfig
from servekit.settings import SettingError, add_arguments
from servekit.specs.llm.config import ServeConfig
from servekit.specs.llm.placement import Placement, place_workers

if TYPE_CHECKING:
    from servekit.callbacks import Callback

logger = logging.getLogger(__name__)

POSITIONAL = "model"
TERMINATE_PATH = "/terminate"  # LMDeploy's, which `servekit proxy`'s /nodes/terminate calls


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting of ``EngineConfig`` and ``ServeConfig``; every default is None so that env
    vars can fill what is not given. Values are parsed later, by the settings' own parser."""
    for title, config_class in (("engine", EngineConfig), ("server", ServeConfig)):
        add_arguments(parser.add_argument_group(f"{title} settings"), config_class, positional=POSITIONAL)


def resolve_serve_config(args: argparse.Namespace) -> ServeConfig | None:
    """The configuration of ``servekit serve``, or None after saying what is wrong (exit code 2)."""
    try:
        config = ServeConfig.resolve(vars(args))
        placement_of(config)  # an absent device fails here, before any worker starts
        return config
    except SettingError as error:  # a bad flag or env value: say which, no traceback
        print(f"servekit serve: error: {error}", file=sys.stderr)
        return None


def placement_of(config: ServeConfig) -> Placement:
    from servekit.workers.devices import cuda_device_count

    engine = config.engine
    return place_workers(engine.device, config.workers, engine.tp, cuda_device_count())


def serve(config: ServeConfig, callbacks: list[Callback] | None = None, **run_kwargs: Any) -> None:
    """Build the ``LitServer`` of the LLM server and run it until stopped."""
    from servekit.server import LitServer
    from servekit.specs.llm.api import LLMServerAPI
    from servekit.specs.llm.spec import LLMServerSpec

    placement = placement_of(config)
    api = LLMServerAPI(
        config, spec=LLMServerSpec(config), engine_on_slot_device=placement.engine_on_slot_device
    )
    server = LitServer(
        api,
        accelerator=placement.accelerator,
        devices=placement.devices,
        workers_per_device=placement.workers_per_device,
        timeout=config.request_timeout if config.request_timeout is not None else False,
        api_key=config.api_key,
        max_payload_size=config.max_request_body_size,
        debug_errors=config.debug_errors,
        callbacks=callbacks,
        enable_shutdown_api=config.allow_terminate_by_client,
        shutdown_path=TERMINATE_PATH,
        shutdown_api_key=config.api_key,
        model_metadata={"model": config.engine.model or "SmolLM2-135M-Instruct (default)"},
    )
    model = config.engine.model or "the default model"
    logger.info("serving %s on http://%s:%d", model, config.host, config.port)
    server.run(
        host=config.host,
        port=config.port,
        generate_client_file=False,
        log_format=config.log_format,
        access_log=config.access_log,
        **run_kwargs,
    )
