"""Loggers receive the (key, value) pairs an API sends with ``LitAPI.log``."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)


class Logger:
    """Override ``process``. It runs in a background thread of the inference worker that logged the
    value, so a slow logger never delays ``predict``."""

    def process(self, key: str, value: Any) -> None:
        raise NotImplementedError


class LoggerSink:
    """Queues ``LitAPI.log`` calls and feeds them to the loggers from one daemon thread."""

    def __init__(self, loggers: Sequence[Logger]) -> None:
        self._loggers = list(loggers)
        self._queue: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="servekit-loggers", daemon=True)
        self._thread.start()

    def __call__(self, key: str, value: Any) -> None:
        self._queue.put((key, value))

    def _run(self) -> None:
        while True:
            key, value = self._queue.get()
            for sink in self._loggers:
                try:
                    sink.process(key, value)
                except Exception:
                    logger.exception("logger %s failed on %r", type(sink).__name__, key)
