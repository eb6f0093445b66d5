"""A stand-in node for `bench_proxy.py overhead --stub-node`: keep-alive HTTP/1.1 on asyncio with
httptools, one fixed completion for every POST, `/health`, `/v1/models` and a one-line `/metrics`.
It costs next to nothing per request, so what the proxy adds is what the figures show.

    .venv/bin/python benchmarks/stub_node.py PORT
"""

from __future__ import annotations

import asyncio
import sys

import httptools
import orjson
import uvloop

MODEL = "stub"
COMPLETION = orjson.dumps(
    {
        "id": "cmpl-stub",
        "object": "text_completion",
        "created": 0,
        "model": MODEL,
        "choices": [{"index": 0, "text": " a", "logprobs": None, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
)
ANSWERS = {
    b"/v1/models": (
        orjson.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]}),
        b"application/json",
    ),
    b"/health": (b'{"status":"ok"}', b"application/json"),
    b"/metrics": (b"servekit:num_requests_running 0\n", b"text/plain"),
}


class StubConnection(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_message_complete(self) -> None:
        body, kind = ANSWERS.get(self.url.split(b"?", 1)[0], (COMPLETION, b"application/json"))
        head = b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n" % (kind, len(body))
        self.transport.write(head + body)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()


async def serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(StubConnection, "127.0.0.1", port)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1])))
