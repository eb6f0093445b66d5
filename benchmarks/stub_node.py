"""A stand-in node for `bench_proxy.py overhead --stub-node`: keep-alive HTTP/1.1 on asyncio with
httptools, one fixed completion for every POST, `/health`, `/v1/models` and a one-line `/metrics`.
It costs next to nothing per request, so what the proxy adds is what the figures show.

    .venv/bin/python benchmarks/stub_node.py PORT [DELAY_MS]

With DELAY_MS a completion is answered that late (the stub idle meanwhile, as a node is while its
model computes); the other routes at once.
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
    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s  # how late a completion is answered

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_message_complete(self) -> None:
        answer = ANSWERS.get(self.url.split(b"?", 1)[0])
        if answer is None and self.delay_s:
            asyncio.get_running_loop().call_later(self.delay_s, self.answer, COMPLETION, b"application/json")
        else:
            self.answer(*(answer or (COMPLETION, b"application/json")))

    def answer(self, body: bytes, kind: bytes) -> None:
        head = b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n" % (kind, len(body))
        if not self.transport.is_closing():
            self.transport.write(head + body)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()


async def serve(port: int, delay_s: float) -> None:
    server = await asyncio.get_running_loop().create_server(
        lambda: StubConnection(delay_s), "127.0.0.1", port
    )
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), float(sys.argv[2]) / 1e3 if len(sys.argv) > 2 else 0.0))
