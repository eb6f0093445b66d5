"""The entry point of one inference-worker process."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import zmq

from servekit.api import LitAPI
from servekit.callbacks import CallbackRunner, EventTypes
from servekit.log_setup import LogSettings
from servekit.loggers import LogSender
from servekit.transport import Endpoints

logger = logging.getLogger(__name__)

STATUS_READY = "ready"
STATUS_SETUP_FAILED = "setup_failed"
STATUS_UNHEALTHY = "unhealthy"


@dataclass
class WorkerAssignment:
    """Everything a worker process needs, sent to it when it is spawned."""

    index: int
    generation: int
    api: LitAPI
    device: str
    endpoints: Endpoints
    num_fronts: int
    callbacks: CallbackRunner
    status: Connection
    log_settings: LogSettings
    has_loggers: bool  # whether LitAPI.log sends to the main process's loggers


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies, so a killed server leaves no orphans."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except OSError:
        pass


def _status_reporter(status: Connection) -> Callable[[str], None]:
    """``LitAPI.report_unhealthy`` of this worker: callable from any of its threads."""
    lock = threading.Lock()

    def report(reason: str) -> None:
        with lock, contextlib.suppress(OSError):
            status.send((STATUS_UNHEALTHY, reason))

    return report


def worker_main(assignment: WorkerAssignment) -> None:
    _die_with_parent()
    # Ctrl+C reaches the whole process group; the main process drives a graceful shutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    assignment.log_settings.apply(
        "%(asctime)s %(levelname)s [worker %(process)d] [%(request_id)s] %(message)s"
    )
    os.environ["SERVEKIT_WORKER_ID"] = str(assignment.index)
    os.environ["LITSERVE_WORKER_ID"] = str(assignment.index)
    api = assignment.api
    callbacks = assignment.callbacks
    context: zmq.Context[Any] = zmq.Context()
    # Imported here: the loops import the user's hooks' dependencies lazily.
    from servekit.workers.inbox import Inbox
    from servekit.workers.loops import RequestProcessor

    fronts = [assignment.endpoints.front_inbox(i) for i in range(assignment.num_fronts)]
    inbox = Inbox(context, assignment.endpoints.worker_inbox(assignment.index), fronts)
    if assignment.has_loggers:
        api._log_sink = LogSender(context, assignment.endpoints.logger_inbox())
    api._report_unhealthy = _status_reporter(assignment.status)
    try:
        api.device = assignment.device
        callbacks.trigger_event(EventTypes.BEFORE_SETUP, lit_api=api)
        api.setup(assignment.device)
        callbacks.trigger_event(EventTypes.AFTER_SETUP, lit_api=api)
    except BaseException:
        assignment.status.send((STATUS_SETUP_FAILED, traceback.format_exc()))
        inbox.close()
        context.term()
        sys.exit(1)
    inbox.announce_ready(assignment.index, assignment.generation)
    assignment.status.send((STATUS_READY, ""))
    from servekit.workers.async_loop import AsyncRequestProcessor, wants_async_loop

    if wants_async_loop(api):
        import uvloop

        uvloop.run(AsyncRequestProcessor(api, inbox, callbacks).serve())
    else:
        RequestProcessor(api, inbox, callbacks).run_forever()
