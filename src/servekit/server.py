"""LitServer: wires APIs, specs, workers and the HTTP front; ``run()`` serves until stopped."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from servekit.api import LitAPI
from servekit.api_checks import check_loop
from servekit.callbacks import Callback, CallbackRunner, EventTypes
from servekit.errors import DEBUG_ERRORS_ENV
from servekit.http.app import FrontConfig, Middleware, build_app
from servekit.http.compression import gzip_middleware
from servekit.http.dispatcher import Dispatcher
from servekit.log_setup import LogSettings
from servekit.loggers import Logger
from servekit.mcp import MCP_PATH, mcp_tools
from servekit.server_checks import (
    check_api_server_worker_type,
    check_model_metadata,
    check_mounts_for_fronts,
    check_num_api_servers,
    check_track_requests,
)
from servekit.settings import env_flag
from servekit.sizes import parse_size
from servekit.specs.base import LitSpec
from servekit.workers.devices import device_slots, resolve_accelerator, workers_per_api
from servekit.workers.pool import WorkerPool
from servekit.workers.supervisor import WorkerPlan

if TYPE_CHECKING:
    from fastapi import FastAPI

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
        enable_shutdown_api: bool = False,
        shutdown_path: str = "/shutdown",
        shutdown_api_key: str | None = None,
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
            api.pre_setup()
        if enable_shutdown_api and not shutdown_path.startswith("/"):
            raise ValueError(f"shutdown_path must start with '/', got {shutdown_path!r}")
        self._check_paths(apis, healthcheck_path, info_path, shutdown_path if enable_shutdown_api else None)
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
        # As in LitServe, the default middleware (gzip for large responses) is listed with the user's.
        self.middlewares = [*(middlewares or []), gzip_middleware()]
        self.disable_openapi_url = disable_openapi_url
        self.restart_workers = restart_workers
        self.track_requests = track_requests
        # Without the argument, the key is LitServe's env var, read here: it is passed on as an argument.
        self.api_key = (api_key if api_key is not None else os.environ.get("LIT_SERVER_API_KEY")) or None
        self.loggers = _as_loggers(loggers)
        self.enable_shutdown_api = enable_shutdown_api
        self.shutdown_path = shutdown_path
        # servekit's own argument; LitServe reads LIT_SHUTDOWN_API_KEY only.
        self._shutdown_api_key = (shutdown_api_key or _shutdown_api_key()) if enable_shutdown_api else None
        self._pool: WorkerPool | None = None
        self._workers_by_api: list[list[int]] = []
        self._app: FastAPI | None = None
        self._stop_requested = threading.Event()
        self._stop_announced = threading.Lock()  # held once the stop is announced: a once-guard
        self._uvicorn_servers: list[Any] = []
        self._access_log = env_flag("SERVEKIT_ACCESS_LOG", True)

    @property
    def app(self) -> FastAPI:
        """The ASGI app. Served by ``run()``; usable in-process too (Starlette's ``TestClient``, httpx's
        ``ASGITransport`` with a lifespan manager): its lifespan then starts the inference workers
        (real processes), waits until they are ready, and stops them at its end."""
        if self._app is None:
            in_process_logs = LogSettings(os.environ.get("SERVEKIT_LOG_LEVEL", "info").lower())
            workers = self._workers()
            dispatcher = Dispatcher(0, workers.endpoints, self._workers_by_api)
            self._app = build_app(
                self._front_config(),
                dispatcher,
                workers=workers,
                log_settings=in_process_logs,
                on_shutdown=self._request_stop,
            )
        return self._app

    def _workers(self) -> WorkerPool:
        """The inference workers, planned on first use: the devices are checked then, not when the
        server is built."""
        if self._pool is None:
            plans, self._workers_by_api = self._plan_workers()
            self._pool = WorkerPool(plans, self.callbacks, self.restart_workers, self.loggers)
        return self._pool

    def _stop_workers(self) -> None:
        if self._pool is not None:
            self._pool.stop()

    @staticmethod
    def _check_paths(
        apis: list[LitAPI], healthcheck_path: str, info_path: str, shutdown_path: str | None
    ) -> None:
        for path in (healthcheck_path, info_path):
            if not path.startswith("/"):
                raise ValueError(f"paths must start with '/', got {path!r}")
        taken = {healthcheck_path: "the health check", info_path: "the info route"}
        if shutdown_path is not None:
            taken[shutdown_path] = "the shutdown API"
        if any(getattr(api, "mcp", None) is not None for api in apis):
            taken.update(dict.fromkeys((MCP_PATH, MCP_PATH.rstrip("/")), "the MCP endpoint"))
        for api in apis:
            paths = [e.path for e in api.spec.endpoints] if api.spec is not None else [api.api_path]
            for path in paths:
                if path in taken:
                    raise ValueError(
                        f"api_path {path} is already in use by {taken[path]}: {type(api).__name__} needs another path"
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
        pretty_logs: bool = False,
        log_format: str | None = None,
        **uvicorn_kwargs: Any,
    ) -> None:
        """Serve until SIGINT/SIGTERM or the shutdown API. ``pretty_logs`` renders every process's
        logs with rich (``pip install rich``); ``log_format`` is text or json (default
        ``SERVEKIT_LOG_FORMAT`` or text); ``access_log=False`` (uvicorn's option, or
        ``SERVEKIT_ACCESS_LOG=0``) turns the access log off."""
        log_settings = LogSettings(
            os.environ.get("SERVEKIT_LOG_LEVEL", log_level).lower(),
            pretty_logs,
            (log_format or os.environ.get("SERVEKIT_LOG_FORMAT", "text")).lower(),
        )
        if "access_log" in uvicorn_kwargs:
            self._access_log = bool(uvicorn_kwargs.pop("access_log"))
        log_settings.apply()
        port = int(port)
        if not 0 < port < 65536:
            raise ValueError(f"port must be in 1..65535, got {port}")
        num_fronts = check_num_api_servers(num_api_servers)
        check_api_server_worker_type(api_server_worker_type)
        check_mounts_for_fronts(self._logger_mounts(), num_fronts)
        workers = self._workers()
        if generate_client_file:
            from servekit.client_gen import write_client_file

            write_client_file(self.lit_apis[0], port)

        if self._shutdown_api_key is not None:
            logger.info(
                "shut the server down with: curl -X POST http://localhost:%d%s "
                "-H 'Authorization: Bearer <its key>'",
                port,
                self.shutdown_path,
            )
        front_config = self._front_config()
        app = self.app if num_fronts == 1 else None
        listener = _bind(host, port)
        fatal: list[BaseException] = []

        def on_fatal(error: BaseException) -> None:
            fatal.append(error)
            self._request_stop()

        self._stop_requested.clear()
        self._stop_announced = threading.Lock()
        self.callbacks.trigger_event(EventTypes.ON_SERVER_START, litserver=self)
        try:
            workers.start(num_fronts, log_settings, on_fatal)
            num_workers = len(workers.plans)
            logger.info(
                "servekit listening on http://%s:%d (%d inference worker%s on %s)",
                host,
                port,
                num_workers,
                "s" if num_workers != 1 else "",
                self.accelerator,
            )
            from servekit.http.front import serve_fronts

            # uvicorn re-raises the signal after its graceful shutdown
            with contextlib.suppress(KeyboardInterrupt):
                serve_fronts(
                    front_config,
                    app,
                    listener,
                    num_fronts,
                    log_settings,
                    uvicorn_kwargs,
                    self._uvicorn_servers,
                    self._stop_requested,
                    self._announce_stop,
                )
        finally:
            workers.stop()
            listener.close()
            self._uvicorn_servers.clear()
            self.callbacks.trigger_event(EventTypes.ON_SERVER_END, litserver=self)
        if fatal:
            raise fatal[0]

    def _request_stop(self) -> None:
        self._stop_requested.set()
        for server in self._uvicorn_servers:
            server.should_exit = True
        self._announce_stop()

    def _announce_stop(self) -> None:
        """``on_server_stop``, once per run, whichever way the shutdown began."""
        if self._stop_announced.acquire(blocking=False):  # never released: exactly once per run
            self.callbacks.trigger_event(EventTypes.ON_SERVER_STOP, litserver=self)

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

    def _front_config(self) -> FrontConfig:
        workers = self._workers()
        return FrontConfig(
            apis=self.lit_apis,
            workers_by_api=self._workers_by_api,
            endpoints=workers.endpoints,
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
            enable_shutdown_api=self.enable_shutdown_api,
            shutdown_path=self.shutdown_path,
            shutdown_api_key=self._shutdown_api_key,
            access_log=self._access_log,
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


def _shutdown_api_key() -> str:
    """LitServe's ``LIT_SHUTDOWN_API_KEY``; without it, a key made up now and logged once."""
    key = os.environ.get("LIT_SHUTDOWN_API_KEY")
    if key:
        return key
    key = secrets.token_urlsafe(32)
    logger.warning("the shutdown API is enabled but LIT_SHUTDOWN_API_KEY is not set; its key is: %s", key)
    return key


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
