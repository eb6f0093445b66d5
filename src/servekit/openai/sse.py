"""Server-sent events framing of the OpenAI streams, and the ids of responses."""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson

from servekit.llm.parsers.tool_calls import new_call_id

__all__ = ["DONE", "new_call_id", "new_id", "now", "sse_event", "sse_json"]

DONE = b"data: [DONE]\n\n"


def sse_event(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


def sse_json(value: Any) -> bytes:
    return sse_event(orjson.dumps(value))


def new_id(prefix: str) -> str:
    """A response id, e.g. ``chatcmpl-<32 hex digits>`` (tool calls: ``new_call_id``, the parsers')."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
