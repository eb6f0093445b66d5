"""Loggers receive the (key, value) pairs an API sends with ``LitAPI.log``.

Loggers live in the main process, never copied into the workers (so a logger may hold locks,
sockets, a Prometheus registry): each worker sends its pairs over the transport's logger channel
(``LogSender``), and one thread of the main process hands them to every logger (``LoggerHub``).
"""

from __future__ import annotations

import logging
import pickle
import queue
import threading
from collections.abc import Sequence
from typing import Any

import zmq

logger = logging.getLogger(__name__)

_STOP = b""  # an empty message stops the hub


class Logger:
    """Override ``process``. It runs in a background thread of the main process, so a slow logger
    never delays ``predict``, and it sees the pairs of every worker."""

    def mount(self, path: str, app: Any) -> None:
        """Serve the ASGI ``app`` at ``path`` on the server (say, Prometheus metrics at ``/metrics``)."""
        if not path.startswith("/"):
            raise ValueError(f"a mount path must start with '/', got {path!r}")
        self.__dict__.setdefault("_mounts", []).append((path, app))

    @property
    def mounts(self) -> list[tuple[str, Any]]:
        """The (path, ASGI app) pairs ``mount`` registered."""
        return list(self.__dict__.get("_mounts", []))

    def process(self, key: str, value: Any) -> None:
        raise NotImplementedError


class LogSender:
    """``LitAPI.log`` in a worker: queues the pair; one thread pickles and sends it to the main process."""

    def __init__(self, context: zmq.Context[Any], address: str) -> None:
        self._context = context
        self._address = address
        self._queue: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="servekit-log-sender", daemon=True)
        self._thread.start()

    def __call__(self, key: str, value: Any) -> None:
        self._queue.put((key, value))

    def _run(self) -> None:
        push = self._context.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 1000)
        push.connect(self._address)
        while True:
            key, value = self._queue.get()
            try:
                push.send(pickle.dumps((key, value), protocol=5))
            except Exception:
                logger.exception("LitAPI.log(%r, ...): the value cannot be sent to the loggers", key)


class LoggerHub:
    """Receives the workers' pairs in the main process and feeds them to the loggers from one thread."""

    def __init__(self, loggers: Sequence[Logger], address: str) -> None:
        self._loggers = list(loggers)
        self._address = address
        self._context: zmq.Context[Any] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind the channel (before any worker starts) and start feeding the loggers."""
        self._context = zmq.Context()
        pull = self._context.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.bind(self._address)
        self._thread = threading.Thread(target=self._run, args=(pull,), name="servekit-loggers", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._context is None or self._thread is None:
            return
        push = self._context.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(self._address)
        push.send(_STOP)
        self._thread.join(timeout)
        push.close(0)
        self._context.term()
        self._context = None

    def _run(self, pull: zmq.Socket[Any]) -> None:
        try:
            while True:
                message = pull.recv()
                if message == _STOP:
                    return
                self._dispatch(message)
        finally:
            pull.close(0)

    def _dispatch(self, message: bytes) -> None:
        try:
            key, value = pickle.loads(message)
        except Exception:
            logger.exception("a logged value could not be read in the main process")
            return
        for sink in self._loggers:
            try:
                sink.process(key, value)
            except Exception:
                logger.exception("logger %s failed on %r", type(sink).__name__, key)
