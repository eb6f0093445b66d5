"""Server-sent events framing of the OpenAI streams, and the ids of responses."""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"


def sse_event(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


def sse_json(value: Any) -> bytes:
    return sse_event(orjson.dumps(value))


def new_id(prefix: str) -> str:
    """A response or tool-call id, e.g. ``chatcmpl-<32 hex digits>``."""
    separator = "_" if prefix == "call" else "-"
    return f"{prefix}{separator}{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
