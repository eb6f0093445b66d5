"""Request-size limits: the body's, enforced before and while it is read, and the headers'."""

from __future__ import annotations

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from servekit.errors import ServerError


class MaxBodySizeMiddleware:
    """413 for a body past ``max_size`` bytes, by Content-Length or by counting a chunked body.

    The error is raised from ``receive`` when the route reads the body, so it goes through the
    app's exception handler and each route answers in its own error shape (OpenAI routes too).
    """

    def __init__(self, app: ASGIApp, max_size: int) -> None:
        self.app = app
        self.max_size = max_size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared_too_big = any(
            name == b"content-length" and value.isdigit() and int(value) > self.max_size
            for name, value in scope["headers"]
        )
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            if declared_too_big:
                raise self._too_large()
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_size:
                    raise self._too_large()
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self) -> ServerError:
        return ServerError(413, f"Request body is larger than the limit of {self.max_size} bytes")


MAX_HEADER_BYTES = 64 * 1024


class MaxHeaderSizeMiddleware:
    """431 for request headers past ``max_size`` bytes in all (uvicorn's httptools parser has no
    limit of its own). Answered before routing, so the body carries both error envelopes: the
    core's ``detail`` and OpenAI's ``error``."""

    def __init__(self, app: ASGIApp, max_size: int = MAX_HEADER_BYTES) -> None:
        self.app = app
        self.max_size = max_size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = sum(len(name) + len(value) + 4 for name, value in scope["headers"])
            if size > self.max_size:
                message = f"Request headers are larger than the limit of {self.max_size} bytes"
                error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
                body = orjson.dumps({"detail": message, "error": error})
                headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
                await send({"type": "http.response.start", "status": 431, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
