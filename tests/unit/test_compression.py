"""The front's lazy gzip middleware sends exactly what Starlette's GZipMiddleware sends, message by
message, for every kind of response; it only skips building a responder for small whole bodies."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest
from starlette.middleware.gzip import GZipMiddleware

from servekit.http.compression import LazyGZipMiddleware, gzip_middleware

Message = dict[str, Any]

BIG = b'{"text": "' + b"abc " * 600 + b'"}'
RESPONSES: dict[str, list[Message]] = {
    "small json": [
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]},
        {"type": "http.response.body", "body": b'{"a": 1}'},
    ],
    "big json": [
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BIG))],
        },
        {"type": "http.response.body", "body": BIG},
    ],
    "json in parts": [
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]},
        {"type": "http.response.body", "body": b"[1,", "more_body": True},
        {"type": "http.response.body", "body": b"2]", "more_body": False},
    ],
    "no content type": [
        {"type": "http.response.start", "status": 200, "headers": []},
        {"type": "http.response.body", "body": BIG},
    ],
    "sse stream": [
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]},
        {"type": "http.response.body", "body": b"data: 1\n\n" * 200, "more_body": True},
        {"type": "http.response.body", "body": b"", "more_body": False},
    ],
    "big text": [
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]},
        {"type": "http.response.body", "body": BIG},
    ],
    "already encoded": [
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-encoding", b"br")],
        },
        {"type": "http.response.body", "body": BIG},
    ],
    "partial": [
        {"type": "http.response.start", "status": 206, "headers": [(b"content-type", b"application/json")]},
        {"type": "http.response.body", "body": BIG},
    ],
}


def _sent(middleware: type, response: list[Message], accept: bytes | None) -> list[Message]:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        for message in copy.deepcopy(response):
            await send(message)

    out: list[Message] = []

    async def send(message: Message) -> None:
        out.append(copy.deepcopy(message))

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    headers = [(b"host", b"x")] + ([(b"accept-encoding", accept)] if accept is not None else [])
    scope = {"type": "http", "method": "GET", "path": "/", "headers": headers}
    _, options = gzip_middleware()
    asyncio.run(middleware(app, **options)(scope, receive, send))
    return out


@pytest.mark.parametrize("accept", [b"gzip, deflate", None])
@pytest.mark.parametrize("name", sorted(RESPONSES))
def test_sends_what_starlette_sends(name: str, accept: bytes | None) -> None:
    expected = _sent(GZipMiddleware, RESPONSES[name], accept)
    assert _sent(LazyGZipMiddleware, RESPONSES[name], accept) == expected


def test_large_bodies_are_still_compressed() -> None:
    sent = _sent(LazyGZipMiddleware, RESPONSES["big json"], b"gzip")
    assert (b"content-encoding", b"gzip") in sent[0]["headers"]
    assert len(sent[1]["body"]) < len(BIG)
