"""Gzip for large responses, on by default as in LitServe; streams are never compressed.

Starlette's GZipMiddleware with LitServe's threshold. SSE and ndjson streams are excluded by
content type, so each chunk reaches the client as it is produced, readable without gunzip.
"""

from __future__ import annotations

from typing import Any

from starlette.middleware.gzip import DEFAULT_EXCLUDED_CONTENT_TYPES, GZipMiddleware

GZIP_MINIMUM_SIZE = 1000  # bytes; LitServe's threshold
STREAM_CONTENT_TYPES = ("text/event-stream", "application/x-ndjson")


def gzip_middleware() -> tuple[type, dict[str, Any]]:
    options = {
        "minimum_size": GZIP_MINIMUM_SIZE,
        "exclude_content_types": (*DEFAULT_EXCLUDED_CONTENT_TYPES, *STREAM_CONTENT_TYPES),
    }
    return GZipMiddleware, options
