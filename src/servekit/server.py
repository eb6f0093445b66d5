"""LitServer: wires APIs, specs, workers and the HTTP front; ``run()`` serves until stopped."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import socket
import tempfile
import threading
import warnings
from collections.abc import Mapping, Sequence
from multiprocessing import resource_tracker
from typing import Any, Literal

from servekit.api import LitAPI
from servekit.api_checks import check_loop
from servekit.callbacks import Callback, CallbackRunner, EventTypes
from servekit.errors import DEBUG_ERRORS_ENV
from servekit.http.app import FrontConfig, Middleware
from servekit.loggers import Logger, LoggerHub
from servekit.mcp import mcp_tools
from servekit.server_checks import (
    check_api_server_worker_type,
    check_model_metadata,
    check_mounts_for_fronts,
    check_num_api_servers,
    check_track_requests,
)
from servekit.sizes import parse_size
from servekit.specs.base import LitSpec
from servekit.transport import Endpoints
from servekit.workers.devices import device_slots, resolve_accelerator, workers_per_api
from servekit.workers.supervisor import Supervisor, WorkerPlan

logger = logging.getLogger(__name__)


class LitServer:
    """Serve one or more ``LitAPI``s over HTTP, with inference worker processes per device."""

    def __init__(
        self,
        lit_api: LitAPI | Sequence[LitAPI],
        accelerator: Literal["auto", "cpu", "cuda", "gpu", "mps"] = "auto",
        devices: int | Literal["auto"] | list[int] = "auto",
        workers_per_device: int | Sequence[int] | Mapping[str, int] = 1,
        timeout: float | bool = 30,
        healthcheck_path: str = "/health",
        info_path: str = "/info",
        model_metadata: dict[str, Any] | None = None,
        spec: LitSpec | None = None,
        max_payload_size: int | float | str | None = None,
        track_requests: bool = False,
        callbacks: Callback | list[Callback] | None = None,
        middlewares: list[Middleware] | None = None,
        loggers: Any = None,
        fast_queue: bool = False,
        disable_openapi_url: bool = False,
        restart_workers: bool = True,
        api_key: str | None = None,
        debug_errors: bool | None = None,
        # Older LitServe code passes these here rather than to LitAPI.
        max_batch_size: int | None = None,
        batch_timeout: float | None = None,
        stream: bool | None = None,
        api_path: str | None = None,
        loop: Any = None,
        **unused: Any,
    ) -> None:
        apis = [lit_api] if isinstance(lit_api, LitAPI) else list(lit_api)
        if not apis:
            raise ValueError("LitServer needs at least one LitAPI")
        for api in apis:
            if not isinstance(api, LitAPI):
                raise TypeError(f"expected LitAPI instances, got {type(api).__name__}")
        check_loop(loop)
        check_model_metadata(model_metadata)
        check_track_requests(track_requests)
        if unused:
            warnings.warn(f"LitServer ignores unknown arguments: {', '.join(sorted(unused))}", stacklevel=2)
        legacy = {
            "max_batch_size": max_batch_size,
            "batch_timeout": batch_timeout,
            "stream": stream,
            "api_path": api_path,
            "spec": spec,
        }
        for name, value in legacy.items():
            if value is None:
                continue
            if len(apis) > 1:
                raise ValueError(f"pass {name} to each LitAPI when serving several APIs")
            setattr(apis[0], name, value)
        if timeout is True:
            raise ValueError("timeout must be a number of seconds, or False/-1 to disable it")
        self.timeout: float | None = None if timeout is False or timeout == -1 else float(timeout)
        # Unexpected exceptions answer 500 "Internal server error"; debugging shows them in the body.
        if debug_errors is None:
            debug_errors = os.environ.get(DEBUG_ERRORS_ENV, "").lower() in ("1", "true", "yes")
        self.debug_errors = bool(debug_errors)
        for api in apis:
            api.request_timeout = self.timeout
            api._debug_errors = self.debug_errors
            if api.spec is not None:
                api.spec.pre_setup(api)
            api.validate()
        self._check_paths(apis, healthcheck_path, info_path)
        mcp_tools(apis)  # an API that cannot be an MCP tool fails here, not in the front
        self.lit_apis = apis
        self.accelerator = resolve_accelerator(accelerator)
        self.devices = devices
        self.workers_per_device = workers_per_device
        # Devices are checked when the server runs: servers can be built and inspected anywhere.
        self._workers_per_api = workers_per_api(workers_per_device, [api.api_path for api in apis])
        self.healthcheck_path = healthcheck_path
        self.info_path = info_path
        self.model_metadata = model_metadata
        self.max_payload_size = None if max_payload_size is None else parse_size(max_payload_size)
        self.callbacks = CallbackRunner(callbacks)
        self.middlewares = list(middlewares or [])
        self.disable_openapi_url = disable_openapi_url
        self.restart_workers = restart_workers
        self.track_requests = track_requests
        # Without the argument, the key is LitServe's env var, read here: it is passed on as an argument.
        self.api_key = (api_key if api_key is not None else os.environ.get("LIT_SERVER_API_KEY")) or None
        self.loggers = _as_loggers(loggers)
        self._stop_requested = threading.Event()
        self._uvicorn_servers: list[Any] = []

    @staticmethod
    def _check_paths(apis: list[LitAPI], healthcheck_path: str, info_path: str) -> None:
        for path in (healthcheck_path, info_path):
            if not path.startswith("/"):
                raise ValueError(f"paths must start with '/', got {path!r}")
        taken = {healthcheck_path: "the health check", info_path: "the info route"}
        for api in apis:
            paths = [e.path for e in api.spec.endpoints] if api.spec is not None else [api.api_path]
            for path in paths:
                if path in taken:
                    raise ValueError(
                        f"api_path {path!r} of {type(api).__name__} is already used by {taken[path]}"
                    )
                taken[path] = type(api).__name__

    # ------------------------------------------------------------------ run
    def run(
        self,
        host: str = "0.0.0.0",
        port: int | str = 8000,
        num_api_servers: int | None = None,
        log_level: str = "info",
        generate_client_file: bool = True,
        api_server_worker_type: str | None = None,
        **uvicorn_kwargs: Any,
    ) -> None:
        log_level = os.environ.get("SERVEKIT_LOG_LEVEL", log_level).lower()
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        port = int(port)
        if not 0 < port < 65536:
            raise ValueError(f"port must be in 1..65535, got {port}")
        num_fronts = check_num_api_servers(num_api_servers)
        check_api_server_worker_type(api_server_worker_type)
        check_mounts_for_fronts(self._logger_mounts(), num_fronts)
        plans, workers_by_api = self._plan_workers()
        if generate_client_file:
            from servekit.client_gen import write_client_file

            write_client_file(self.lit_apis[0], port)

        directory = tempfile.mkdtemp(prefix="servekit-")
        endpoints = Endpoints(directory)
        front_config = self._front_config(endpoints, workers_by_api)
        listener = _bind(host, port)
        fatal: list[BaseException] = []
        hub = LoggerHub(self.loggers, endpoints.logger_inbox()) if self.loggers else None

        def on_fatal(error: BaseException) -> None:
            fatal.append(error)
            self._request_stop()

        supervisor = Supervisor(
            plans,
            endpoints,
            num_fronts,
            self.callbacks,
            log_level,
            on_fatal,
            self.restart_workers,
            hub is not None,
        )
        self.callbacks.trigger_event(EventTypes.ON_SERVER_START, litserver=self)
        try:
            if hub is not None:
                hub.start()
            supervisor.start()
            logger.info(
                "servekit listening on http://%s:%d (%d inference worker%s on %s)",
                host,
                port,
                len(plans),
                "s" if len(plans) != 1 else "",
                self.accelerator,
            )
            from servekit.http.front import serve_fronts

            # uvicorn re-raises the signal after its graceful shutdown
            with contextlib.suppress(KeyboardInterrupt):
                serve_fronts(
                    front_config,
                    listener,
                    num_fronts,
                    log_level,
                    uvicorn_kwargs,
                    self._uvicorn_servers,
                    self._stop_requested,
                )
        finally:
            supervisor.stop()
            if hub is not None:
                hub.stop()
            listener.close()
            shutil.rmtree(directory, ignore_errors=True)
            _wait_for_children()
            self.callbacks.trigger_event(EventTypes.ON_SERVER_END, litserver=self)
        if fatal:
            raise fatal[0]

    def _request_stop(self) -> None:
        self._stop_requested.set()
        for server in self._uvicorn_servers:
            server.should_exit = True

    def _plan_workers(self) -> tuple[list[WorkerPlan], list[list[int]]]:
        plans: list[WorkerPlan] = []
        workers_by_api: list[list[int]] = []
        for api, workers_per_device in zip(self.lit_apis, self._workers_per_api, strict=True):
            indices = []
            for slot in device_slots(self.accelerator, self.devices, workers_per_device):
                indices.append(len(plans))
                plans.append(WorkerPlan(len(plans), api, slot))
            workers_by_api.append(indices)
        return plans, workers_by_api

    def _logger_mounts(self) -> list[tuple[str, Any]]:
        """The ASGI apps the loggers asked to serve (``Logger.mount``)."""
        return [mount for sink in self.loggers for mount in sink.mounts]

    def _front_config(self, endpoints: Endpoints, workers_by_api: list[list[int]]) -> FrontConfig:
        return FrontConfig(
            apis=self.lit_apis,
            workers_by_api=workers_by_api,
            endpoints=endpoints,
            timeout=self.timeout,
            healthcheck_path=self.healthcheck_path,
            info_path=self.info_path,
            info=self._info(),
            max_payload_size=self.max_payload_size,
            middlewares=self.middlewares,
            callbacks=self.callbacks,
            api_key=self.api_key,
            disable_openapi_url=self.disable_openapi_url,
            mounts=self._logger_mounts(),
        )

    def _info(self) -> dict[str, Any]:
        return {
            "model": self.model_metadata,
            "server": {
                "accelerator": self.accelerator,
                "devices": self.devices,
                "workers_per_device": self.workers_per_device,
                "timeout": self.timeout,
                "max_payload_size": self.max_payload_size,
                "apis": [
                    {
                        "name": type(api).__name__,
                        "api_path": api.api_path,
                        "spec": type(api.spec).__name__ if api.spec is not None else None,
                        "max_batch_size": api.max_batch_size,
                        "batch_timeout": api.batch_timeout,
                        "stream": api.stream,
                    }
                    for api in self.lit_apis
                ],
            },
        }


def _as_loggers(loggers: Any) -> list[Logger]:
    if loggers is None:
        return []
    items = list(loggers) if isinstance(loggers, list | tuple) else [loggers]
    for item in items:
        if not isinstance(item, Logger):
            raise TypeError(f"loggers must be servekit.Logger instances, got {type(item).__name__}")
    return items


def _wait_for_children(timeout: float = 10.0) -> None:
    """Return only once every process this server started has exited: the workers and fronts
    (stopped already), and multiprocessing's resource tracker, which otherwise outlives the server
    by a moment (it exits when it notices its pipe closed)."""
    for child in multiprocessing.active_children():
        child.join(timeout)
        if child.is_alive():
            child.kill()
            child.join(timeout)
    stop_tracker = getattr(resource_tracker._resource_tracker, "_stop", None)  # private, Python 3.8+
    if stop_tracker is not None:
        stop_tracker()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror}") from error
    listener.listen(2048)
    listener.set_inheritable(True)
    return listener
