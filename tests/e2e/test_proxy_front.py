"""The proxy's own HTTP front (`servekit.proxy.front`): proxied requests served straight from the
parser, everything else through the ASGI app, on the same keep-alive connections, with the same checks
(key, size limits) and answers."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import h11
import httpx
import orjson
import pytest

from tests.e2e.fake_node import FakeNode, running_node
from tests.e2e.proxying import admitted, proxy_process, wait_for

pytestmark = pytest.mark.timeout(120)

KEY = {"Authorization": "Bearer proxy-key"}
COMPLETION = orjson.dumps({"model": "fake-model", "prompt": "x"})


def _request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: proxy"]
    lines += [f"{name}: {value}" for name, value in {**KEY, **(headers or {})}.items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _chunked(method: str, path: str, body: bytes) -> bytes:
    head = [f"{method} {path} HTTP/1.1", "Host: proxy", "Transfer-Encoding: chunked"]
    head += [f"{name}: {value}" for name, value in KEY.items()]
    half = len(body) // 2
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:half], body[half:]))
    return ("\r\n".join(head) + "\r\n\r\n").encode() + chunks + b"0\r\n\r\n"


def _responses(sock: socket.socket, count: int) -> Iterator[tuple[int, dict[bytes, bytes], bytes]]:
    """``count`` answers read off one connection, in order: status, headers, body."""
    pending = b""
    for _ in range(count):
        conn = h11.Connection(h11.CLIENT)  # a parser for one answer (h11 sends one request at a time)
        conn.send(h11.Request(method="GET", target="/", headers=[("Host", "proxy")]))
        conn.send(h11.EndOfMessage())
        if pending:  # (no data given means the end of the stream to h11)
            conn.receive_data(pending)
        status, headers, body = 0, {}, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                status, headers = event.status_code, dict(event.headers)
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
        pending = conn.trailing_data[0]
        yield status, headers, body


@pytest.fixture()
def proxied(tmp_path: Path) -> Iterator[tuple[str, int, FakeNode]]:
    with (
        running_node(FakeNode(stream_chunks=3)) as node,
        proxy_process(
            tmp_path, "--no-state-file", "--api-key", "proxy-key", "--max-request-body-size", "1KB",
            "--node", node.url,
        ) as proxy,
    ):  # fmt: skip
        wait_for(lambda: len(admitted(proxy.url, KEY)) == 1)
        yield proxy.url, int(proxy.url.rsplit(":", 1)[1]), node


def test_pipelined_requests_fast_and_asgi_on_one_connection(proxied: tuple[str, int, FakeNode]) -> None:
    """Pipelined on one keep-alive connection, answered in order: proxied requests (the direct path),
    a chunked body, the key refused, a body past the limit, a stream, and ASGI routes between them."""
    _, port, node = proxied
    stream = orjson.dumps({"model": "fake-model", "messages": [], "stream": True})
    requests = [
        _request("POST", "/v1/completions", COMPLETION, {"X-Request-Id": "r-1"}),
        _request("GET", "/v1/models"),
        _chunked("POST", "/v1/completions", COMPLETION),
        _request("POST", "/v1/chat/completions", stream),
        _request("POST", "/v1/completions", COMPLETION, {"Authorization": "Bearer wrong"}),
        _request("POST", "/v1/completions", b'{"model": "fake-model", "prompt": "%s"}' % (b"x" * 2000)),
        _request("POST", "/v1/completions", COMPLETION, {"X-Request-Id": "r-2"}),
    ]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"".join(requests))
        answers = list(_responses(sock, len(requests)))
    statuses = [status for status, _, _ in answers]
    assert statuses == [200, 200, 200, 200, 401, 413, 200]
    first, models, chunked, streamed, refused, too_big, last = answers
    assert orjson.loads(first[2])["echo"] == {"model": "fake-model", "prompt": "x"}
    assert first[1][b"x-request-id"] == b"r-1" and last[1][b"x-request-id"] == b"r-2"
    assert first[1][b"content-length"] == b"%d" % len(first[2])
    assert [m["id"] for m in orjson.loads(models[2])["data"]] == ["fake-model"]
    assert orjson.loads(chunked[2])["echo"] == {"model": "fake-model", "prompt": "x"}
    assert streamed[1][b"content-type"].startswith(b"text/event-stream")
    expected = b"".join(b'data: {"node":%d,"index":%d}\n\n' % (node.port, i) for i in range(3))
    assert streamed[2] == expected + b"data: [DONE]\n\n"
    assert orjson.loads(refused[2])["error"]["code"] is None and refused[1][b"www-authenticate"]
    assert "limit of 1000 bytes" in orjson.loads(too_big[2])["error"]["message"]
    # what reached the node: the two proxied completions, the chunked one and the stream
    assert len(node.requests) == 4
    assert node.requests[0]["headers"]["x-request-id"] == "r-1"
    assert "authorization" not in node.requests[0]["headers"]


def test_connection_close_and_http_1_0_end_the_connection(proxied: tuple[str, int, FakeNode]) -> None:
    _, port, _ = proxied
    for request in (
        _request("POST", "/v1/completions", COMPLETION, {"Connection": "close"}),
        _request("POST", "/v1/completions", COMPLETION).replace(b"HTTP/1.1", b"HTTP/1.0", 1),
    ):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(request)
            received = b""
            while chunk := sock.recv(65536):  # the proxy closes the connection after its answer
                received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"connection: close" in head.lower()
        assert head.lower().count(b"\r\ndate: ") == 1  # the proxy's, not also the node's
        assert orjson.loads(body)["echo"] == {"model": "fake-model", "prompt": "x"}


def test_headers_past_the_limit_and_a_missing_key(proxied: tuple[str, int, FakeNode]) -> None:
    url, _, node = proxied
    big = httpx.post(
        f"{url}/v1/completions", content=COMPLETION, headers={**KEY, "X-Big": "y" * 70_000}, timeout=10
    )
    assert big.status_code == 431
    assert big.json()["error"]["type"] == "invalid_request_error"
    missing = httpx.post(f"{url}/v1/completions", content=COMPLETION, timeout=10)
    assert missing.status_code == 401
    assert missing.json()["error"]["message"] == "Invalid or missing API key"
    assert node.requests == []


def test_uvicorn_still_has_the_hook_the_direct_front_overrides() -> None:
    """Without it every request would silently take the slower ASGI path (still correct)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    assert "_start_asgi_task" in vars(HttpToolsProtocol)
