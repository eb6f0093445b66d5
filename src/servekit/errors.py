"""Error types shared by the front and the workers."""

from __future__ import annotations

from typing import Any


class ServerError(Exception):
    """An error that reaches the client with a status code and a JSON-able detail."""

    def __init__(self, status_code: int, detail: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.headers = headers


INTERNAL_ERROR = "Internal server error"
DEBUG_ERRORS_ENV = "SERVEKIT_DEBUG_ERRORS"


def internal_error_detail(exc: BaseException, show: bool) -> str:
    """The client's detail for an unexpected exception (a 500): the exception itself only when
    debugging (``LitServer(debug_errors=True)`` or ``SERVEKIT_DEBUG_ERRORS=1``); it is logged either way."""
    return f"{type(exc).__name__}: {exc}" if show else INTERNAL_ERROR


class WorkerSetupError(RuntimeError):
    """A worker's ``setup`` raised: the server cannot start."""
