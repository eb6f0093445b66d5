"""A fake upstream node for proxy tests: a small Starlette app served by uvicorn on 127.0.0.1 in a
thread of the test process, whose answers the test controls and whose requests it can inspect."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tests.e2e.serving import free_port


@dataclass
class FakeNode:
    model: str = "fake-model"
    api_key: str | None = None
    healthy: bool = True
    overloaded: bool = False  # answer 503 to generation requests
    stream_chunks: int = 3
    break_after: int | None = None  # chunks sent before the stream is cut (connection dropped)
    hold_stream: bool = False  # after its chunks, the stream waits until the client leaves
    requests: list[dict[str, Any]] = field(default_factory=list)  # what reached the node
    disconnected: threading.Event = field(default_factory=threading.Event)
    running: int = 0
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app(self) -> Starlette:
        async def health(request: Request) -> Response:
            return Response("ok" if self.healthy else "down", status_code=200 if self.healthy else 503)

        async def models(request: Request) -> Response:
            if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
                return Response(b'{"error": {"message": "bad key"}}', status_code=401)
            return _json({"object": "list", "data": [{"id": self.model, "object": "model"}]})

        async def metrics(request: Request) -> Response:
            text = (
                f'servekit:num_requests_running{{model_name="{self.model}"}} {float(self.running)}\n'
                f'servekit:num_requests_running{{model_name="{self.model}",worker="0"}} {float(self.running)}\n'
                f'servekit:num_requests_waiting{{model_name="{self.model}"}} 0.0\n'
            )
            return Response(text, media_type="text/plain")

        async def generate(request: Request) -> Response:
            body = orjson.loads(await request.body())
            self.requests.append({"path": request.url.path, "headers": dict(request.headers), "body": body})
            if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
                return Response(b'{"error": {"message": "bad key"}}', status_code=401)
            if self.overloaded:
                return Response(
                    b'{"error": {"message": "overloaded"}}', status_code=503, headers={"Retry-After": "1"}
                )
            if body.get("stream"):
                return StreamingResponse(self._stream(), media_type="text/event-stream")
            return _json({"node": self.port, "model": body.get("model"), "echo": body})

        async def flush(request: Request) -> Response:
            return _json({"flushed": True, "node": self.port})

        async def abort(request: Request) -> Response:
            body = orjson.loads(await request.body())
            return _json({"aborted": body.get("rid") == f"rid-{self.port}"})

        routes = [
            Route("/health", health),
            Route("/v1/models", models),
            Route("/metrics", metrics),
            Route("/flush_cache", flush, methods=["POST"]),
            Route("/abort_request", abort, methods=["POST"]),
        ]
        for path in (
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/embeddings",
            "/generate",
            "/v1/chat/interactive",
        ):
            routes.append(Route(path, generate, methods=["POST"]))
        return Starlette(routes=routes)

    async def _stream(self) -> AsyncIterator[bytes]:
        self.running += 1
        try:
            for index in range(self.stream_chunks):
                if self.break_after is not None and index == self.break_after:
                    raise RuntimeError("the fake node drops the connection")
                yield b"data: " + orjson.dumps({"node": self.port, "index": index}) + b"\n\n"
            if self.hold_stream:
                await asyncio.Event().wait()  # until the client leaves (the stream is cancelled)
            yield b"data: [DONE]\n\n"
        finally:
            self.running -= 1
            self.disconnected.set()


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


@contextlib.contextmanager
def running_node(node: FakeNode) -> Iterator[FakeNode]:
    """Serve ``node`` on a free port until the block ends."""
    node.port = node.port or free_port()
    config = uvicorn.Config(node.app(), host="127.0.0.1", port=node.port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the fake node did not start")
        time.sleep(0.01)  # polling uvicorn's started flag, bounded
    try:
        yield node
    finally:
        server.should_exit = True
        thread.join(10)
