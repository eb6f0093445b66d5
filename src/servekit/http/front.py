"""Running the HTTP fronts: uvicorn in this process, or in several processes sharing one socket."""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import threading
from collections.abc import Callable
from multiprocessing.synchronize import Event as ProcessEvent
from typing import Any

import uvicorn
from fastapi import FastAPI

from servekit.http.app import FrontConfig, build_app
from servekit.http.dispatcher import Dispatcher
from servekit.http.graceful import GracefulServer
from servekit.log_setup import LogSettings

logger = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 30


def _uvicorn_server(
    app: FastAPI,
    log_settings: LogSettings,
    extra: dict[str, Any],
    on_exit: Callable[[], None] | None = None,
) -> uvicorn.Server:
    options: dict[str, Any] = {
        "log_level": log_settings.level,
        "access_log": False,  # the app writes its own, with the request id (RequestIdMiddleware)
        "loop": "uvloop",
        "http": "httptools",
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
        "backlog": 2048,
    }
    if log_settings.pretty or log_settings.format == "json":
        options["log_config"] = None  # uvicorn's records go to the (rich or json) root handler
    options.update(extra)
    return GracefulServer(uvicorn.Config(app, **options), on_exit)


def _front_process_main(
    config: FrontConfig,
    front_index: int,
    listener: socket.socket,
    log_settings: LogSettings,
    extra: dict[str, Any],
    shutdown_requested: ProcessEvent,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process turns Ctrl+C into SIGTERM for us
    log_settings.apply()
    dispatcher = Dispatcher(front_index, config.endpoints, config.workers_by_api)
    app = build_app(config, dispatcher, on_shutdown=shutdown_requested.set)
    _uvicorn_server(app, log_settings, extra).run(sockets=[listener])


def serve_fronts(
    config: FrontConfig,
    app: FastAPI | None,
    listener: socket.socket,
    num_fronts: int,
    log_settings: LogSettings,
    extra: dict[str, Any],
    servers: list[Any],
    stop_requested: threading.Event,
    on_stop: Callable[[], None],
) -> None:
    """Serve until SIGINT/SIGTERM, the shutdown API, or a fatal worker error sets ``stop_requested``;
    ``on_stop`` is told when a signal or the shutdown API begins the shutdown.

    One front serves ``app`` in this process; several fronts each build theirs from ``config``.
    """
    if num_fronts == 1:
        assert app is not None
        server = _uvicorn_server(app, log_settings, extra, on_stop)
        servers.append(server)
        if stop_requested.is_set():
            return
        server.run(sockets=[listener])
        return
    mp = multiprocessing.get_context("spawn")
    shutdown_requested = mp.Event()
    processes = [
        mp.Process(
            target=_front_process_main,
            args=(config, index, listener, log_settings, extra, shutdown_requested),
            name=f"servekit-front-{index}",
        )
        for index in range(num_fronts)
    ]
    for process in processes:
        process.start()

    def on_signal(signum: int, frame: Any) -> None:
        stop_requested.set()
        on_stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop_requested.wait(0.5):
            if shutdown_requested.is_set():
                logger.info("shutdown requested through the shutdown API")
                on_stop()
                break
            if not all(p.is_alive() for p in processes):
                logger.error("an HTTP front process exited; shutting down")
                break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(GRACEFUL_SHUTDOWN_S + 5)
            if process.is_alive():
                process.kill()
