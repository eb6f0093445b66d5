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


class WorkerSetupError(RuntimeError):
    """A worker's ``setup`` raised: the server cannot start."""
