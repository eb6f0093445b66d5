"""Gzip for large responses, on by default as in LitServe; streams are never compressed.

Starlette's GZipMiddleware with LitServe's threshold. SSE and ndjson streams are excluded by
content type, so each chunk reaches the client as it is produced, readable without gunzip.
"""

from __future__ import annotations

from typing import Any

from starlette.middleware.gzip import (
    DEFAULT_EXCLUDED_CONTENT_TYPES,
    GZipMiddleware,
    GZipResponder,
    IdentityResponder,
)
from starlette.types import Message, Receive, Scope, Send

GZIP_MINIMUM_SIZE = 1000  # bytes; LitServe's threshold
STREAM_CONTENT_TYPES = ("text/event-stream", "application/x-ndjson")


class LazyGZipMiddleware(GZipMiddleware):
    """Starlette's GZipMiddleware, its per-request responder built only for a response it may change.

    Most answers of a model server are one small body: Starlette's responders send those unchanged,
    and so does this, without building one (it cost more than the rest of the front's middleware).
    Any other response goes through Starlette's responder, fed the messages it would have seen.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        responder: IdentityResponder | None = None
        direct = False

        def attach() -> IdentityResponder:
            accepts = any(k == b"accept-encoding" and b"gzip" in v for k, v in scope["headers"])
            kind = GZipResponder if accepts else IdentityResponder
            options: dict[str, Any] = {"exclude_content_types": self.exclude_content_types}
            if accepts:
                options.update(compresslevel=self.compresslevel, thread_minimum_size=self.thread_minimum_size)
            made = kind(self.app, self.minimum_size, **options)
            made.send = send
            return made

        async def lean_send(message: Message) -> None:
            nonlocal start, responder, direct
            if direct:
                await send(message)
                return
            if responder is not None:
                await responder.send_with_compression(message)
                return
            kind = message["type"]
            if kind == "http.response.start" and not _passes_through(message):
                start = message  # held until the body shows whether it may be compressed
                return
            if (
                kind == "http.response.body"
                and start is not None
                and not message.get("more_body", False)
                and len(message.get("body", b"")) < self.minimum_size
            ):
                held, start = start, None
                await send(held)
                await send(message)
                return
            responder = attach()
            if start is not None:
                held, start = start, None
                await responder.send_with_compression(held)
            await responder.send_with_compression(message)
            # A response the responder leaves as it is (a stream: excluded by type) goes on without
            # it: one call less per chunk.
            direct = _left_unchanged(responder)

        await self.app(scope, receive, lean_send)


def _left_unchanged(responder: IdentityResponder) -> bool:
    """The responder has sent the start and forwards every body message as it is."""
    return bool(
        responder.content_encoding_set or responder.partial_response or responder.content_type_is_excluded
    )


def _passes_through(start: Message) -> bool:
    """A start Starlette's responders send at once (encoded already, partial, or maybe excluded):
    the responder takes it, so nothing is held back."""
    if start["status"] == 206:
        return True
    for name, value in start.get("headers", ()):
        lowered = name.lower()
        if lowered == b"content-encoding":
            return True
        if lowered == b"content-type" and not value.lower().startswith(b"application/json"):
            return True  # the responder decides whether the type is excluded
    return False


def gzip_middleware() -> tuple[type, dict[str, Any]]:
    options = {
        "minimum_size": GZIP_MINIMUM_SIZE,
        "exclude_content_types": (*DEFAULT_EXCLUDED_CONTENT_TYPES, *STREAM_CONTENT_TYPES),
    }
    return LazyGZipMiddleware, options
