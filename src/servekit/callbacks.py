"""Callbacks for the request lifecycle, with LitServe's hook names."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from enum import Enum
from typing import Any

logger = logging.getLogger(__name__)


class EventTypes(Enum):
    BEFORE_SETUP = "on_before_setup"
    AFTER_SETUP = "on_after_setup"
    BEFORE_DECODE_REQUEST = "on_before_decode_request"
    AFTER_DECODE_REQUEST = "on_after_decode_request"
    BEFORE_PREDICT = "on_before_predict"
    AFTER_PREDICT = "on_after_predict"
    BEFORE_ENCODE_RESPONSE = "on_before_encode_response"
    AFTER_ENCODE_RESPONSE = "on_after_encode_response"
    ON_SERVER_START = "on_server_start"
    ON_SERVER_STOP = "on_server_stop"
    ON_SERVER_END = "on_server_end"
    ON_REQUEST = "on_request"
    ON_RESPONSE = "on_response"


class Callback:
    """Override the hooks you need. Worker hooks run in the inference workers; ``on_request`` and
    ``on_response`` in the HTTP front; ``on_server_start``, ``on_server_stop`` and ``on_server_end``
    in the main process. ``on_server_stop`` (servekit's own) fires once, when shutting down begins
    (a signal or the shutdown API): from then on no new connection is accepted, and the requests in
    flight still complete. It must not block: it may be called from a signal handler."""

    def on_before_setup(self, *args: Any, **kwargs: Any) -> None: ...
    def on_after_setup(self, *args: Any, **kwargs: Any) -> None: ...
    def on_before_decode_request(self, *args: Any, **kwargs: Any) -> None: ...
    def on_after_decode_request(self, *args: Any, **kwargs: Any) -> None: ...
    def on_before_predict(self, *args: Any, **kwargs: Any) -> None: ...
    def on_after_predict(self, *args: Any, **kwargs: Any) -> None: ...
    def on_before_encode_response(self, *args: Any, **kwargs: Any) -> None: ...
    def on_after_encode_response(self, *args: Any, **kwargs: Any) -> None: ...
    def on_server_start(self, *args: Any, **kwargs: Any) -> None: ...
    def on_server_stop(self, *args: Any, **kwargs: Any) -> None: ...
    def on_server_end(self, *args: Any, **kwargs: Any) -> None: ...
    def on_request(self, *args: Any, **kwargs: Any) -> None: ...
    def on_response(self, *args: Any, **kwargs: Any) -> None: ...


class CallbackRunner:
    """Calls one hook on every callback; a failing callback is logged, never fatal."""

    def __init__(self, callbacks: Callback | Iterable[Callback] | None = None) -> None:
        if callbacks is None:
            self.callbacks: list[Callback] = []
        elif isinstance(callbacks, Callback):
            self.callbacks = [callbacks]
        else:
            self.callbacks = list(callbacks)
        for callback in self.callbacks:
            if not isinstance(callback, Callback):
                raise TypeError(
                    f"callbacks must be servekit.Callback instances, got {type(callback).__name__}"
                )

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def trigger_event(self, event: EventTypes | str, *args: Any, **kwargs: Any) -> None:
        name = event.value if isinstance(event, EventTypes) else event
        for callback in self.callbacks:
            try:
                getattr(callback, name)(*args, **kwargs)
            except Exception:
                logger.exception("callback %s.%s failed", type(callback).__name__, name)
