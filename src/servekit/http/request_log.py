"""What the front notes of every HTTP request, in one middleware (one wrapper on the hot path): its
id (``X-Request-ID`` taken from the request or made up, set for every log line of the request, and
returned), its count and latency for ``/metrics``, and an access-log line when enabled."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from servekit.http.metrics import HTTPMetrics, route_of
from servekit.request_id import HEADER, check_request_id, current_request_id, new_request_id

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

access_logger = logging.getLogger("servekit.access")

_HEADER_BYTES = HEADER.encode()


class RequestObserver:
    def __init__(self, app: ASGIApp, metrics: HTTPMetrics, access_log: bool = True) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == _HEADER_BYTES), None)
        rid = given.decode("latin-1") if given is not None else new_request_id()
        problem = check_request_id(rid) if given is not None else None
        if problem is not None:
            await _bad_request(send, problem)
            return
        token = current_request_id.set(rid)
        status = 500  # a handler that fails before answering
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != _HEADER_BYTES]
                message["headers"] = [*headers, (_HEADER_BYTES, rid.encode("latin-1"))]
            await send(message)

        metrics = self.metrics
        metrics.in_flight += 1
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            metrics.in_flight -= 1
            seconds = time.perf_counter() - started
            metrics.record(scope["method"], route_of(scope), status, seconds)
            if self.access_log:
                access_logger.info(
                    '%s "%s %s" %d %.1fms',
                    _client(scope),
                    scope["method"],
                    scope.get("path", ""),
                    status,
                    seconds * 1000,
                )
            current_request_id.reset(token)


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"


async def _bad_request(send: Send, detail: str) -> None:
    body = orjson.dumps({"detail": detail})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 400, "headers": headers})
    await send({"type": "http.response.body", "body": body})
