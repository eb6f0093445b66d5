"""The inference workers of one server and the socket directory they talk through.

Started by ``LitServer.run()`` for all its HTTP fronts, or by the lifespan of ``LitServer.app`` for
in-process use; either way the same supervisor spawns the same real worker processes. A pool can be
started again after it was stopped (a test client entered twice).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable
from multiprocessing import resource_tracker

from servekit.callbacks import CallbackRunner
from servekit.log_setup import LogSettings
from servekit.loggers import Logger, LoggerHub
from servekit.transport import Endpoints
from servekit.workers.supervisor import Supervisor, WorkerPlan

logger = logging.getLogger(__name__)


class WorkerPool:
    def __init__(
        self,
        plans: list[WorkerPlan],
        callbacks: CallbackRunner,
        restart_workers: bool,
        loggers: list[Logger],
    ) -> None:
        self.plans = plans
        self._callbacks = callbacks
        self._restart_workers = restart_workers
        self._loggers = loggers
        # Only a name: the directory exists while the pool runs.
        self.endpoints = Endpoints(os.path.join(tempfile.gettempdir(), f"servekit-{uuid.uuid4().hex[:12]}"))
        self._supervisor: Supervisor | None = None
        self._logger_hub: LoggerHub | None = None
        self._started_tracker = False
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._supervisor is not None

    def start(
        self, num_fronts: int, log_settings: LogSettings, on_fatal: Callable[[BaseException], None]
    ) -> None:
        """Spawn the workers; ``on_fatal`` is called (from a thread) if a worker's first ``setup`` fails."""
        with self._lock:
            if self._supervisor is not None:
                raise RuntimeError("the inference workers are already running")
            os.mkdir(self.endpoints.directory, 0o700)
            self._started_tracker = getattr(resource_tracker._resource_tracker, "_pid", None) is None
            if self._loggers:
                # The loggers' channel is bound before any worker starts sending to it.
                self._logger_hub = LoggerHub(self._loggers, self.endpoints.logger_inbox())
                self._logger_hub.start()
            supervisor = Supervisor(
                self.plans,
                self.endpoints,
                num_fronts,
                self._callbacks,
                log_settings,
                on_fatal,
                self._restart_workers,
                has_loggers=self._logger_hub is not None,
            )
            self._supervisor = supervisor
            try:
                supervisor.start()
            except BaseException:
                self._stop_locked()
                raise

    def stop(self) -> None:
        """Stop every worker and wait for it; remove the socket directory. Idempotent."""
        with self._lock:
            self._stop_locked()

    def _stop_locked(self) -> None:
        supervisor, self._supervisor = self._supervisor, None
        hub, self._logger_hub = self._logger_hub, None
        if supervisor is None and hub is None:
            return
        try:
            if supervisor is not None:
                supervisor.stop()
            if hub is not None:
                hub.stop()
        finally:
            shutil.rmtree(self.endpoints.directory, ignore_errors=True)
            if self._started_tracker:
                _stop_resource_tracker()


def _stop_resource_tracker() -> None:
    """multiprocessing's resource tracker, started with the first worker, otherwise outlives the
    server by a moment (it exits when it notices its pipe closed): stop it and wait for it."""
    stop_tracker = getattr(resource_tracker._resource_tracker, "_stop", None)  # private, Python 3.8+
    if stop_tracker is not None:
        stop_tracker()
