"""The id of the request being served, for every log line written while serving it.

The HTTP front sets it per request (from ``X-Request-ID`` or a new one); ``RequestIdFilter`` puts it
on every log record as ``request_id`` ("-" outside a request).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterable, Iterator

HEADER = "x-request-id"
MAX_LENGTH = 200

current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "servekit_request_id", default=None
)


def new_request_id() -> str:
    return os.urandom(16).hex()  # as random as uuid4().hex, without building a UUID per request


def check_request_id(value: str) -> str | None:
    """Why ``value`` cannot be a request id (it goes into logs and headers), or None if it can."""
    if not value or len(value) > MAX_LENGTH:
        return f"X-Request-ID must have 1 to {MAX_LENGTH} characters"
    if not (value.isascii() and value.isprintable()) or " " in value:  # ASCII 33..126
        return "X-Request-ID must be printable ASCII without spaces"
    return None


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id.get() or "-"
        return True


@contextlib.contextmanager
def serving_requests(ids: Iterable[str]) -> Iterator[None]:
    """Log lines written inside name these requests (a batch's ids, comma-separated)."""
    joined = ",".join(i for i in ids if i)
    token = current_request_id.set(joined or None)
    try:
        yield
    finally:
        current_request_id.reset(token)
