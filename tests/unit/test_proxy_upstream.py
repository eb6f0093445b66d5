"""The proxy's upstream client against a scripted HTTP server on 127.0.0.1 (in this process): framing
(length, chunked, until close), keep-alive reuse, a stale pooled connection, errors and timeouts."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from servekit.proxy.upstream import ConnectFailed, Pool, ResponseBroken, header_block

pytestmark = pytest.mark.timeout(30)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _request_of(reader: asyncio.StreamReader) -> bytes:
    """One request's head and body (by its content-length), as it arrived."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    return head + (await reader.readexactly(length) if length else b"")


def _run(handler: Handler, client: Callable[[str], Awaitable[None]]) -> None:
    async def main() -> None:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            await asyncio.wait_for(client(f"http://127.0.0.1:{port}"), 20)
        finally:
            server.close()

    asyncio.run(main())


OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


def test_keep_alive_reuses_one_connection_and_sends_what_it_is_given() -> None:
    connections: list[list[bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen: list[bytes] = []
        connections.append(seen)
        while not reader.at_eof():
            try:
                seen.append(await _request_of(reader))
            except asyncio.IncompleteReadError:
                break
            writer.write(OK)
            await writer.drain()

    async def client(url: str) -> None:
        pool = Pool()
        lines = header_block({"x-request-id": "r1", "content-type": "application/json"})
        for _ in range(3):
            response = await pool.request("POST", url + "/base", b"/v1/x?a=1", lines, b'{"k":1}')
            assert response.status == 200 and response.header(b"content-type") == "application/json"
            assert await response.read() == b"{}"
            response.close()
        pool.close()

    _run(handler, client)
    assert len(connections) == 1 and len(connections[0]) == 3
    first = connections[0][0]
    assert first.startswith(b"POST /base/v1/x?a=1 HTTP/1.1\r\n")
    assert b"x-request-id: r1\r\n" in first and b"content-length: 7\r\n" in first
    assert first.endswith(b'\r\n\r\n{"k":1}')


def test_chunked_streams_arrive_chunk_by_chunk_and_a_body_until_close() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await _request_of(reader)
        if b"/stream" in request:
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            )
            for index in range(3):
                event = b"data: %d\n\n" % index
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
        else:  # HTTP/1.0 style: no length, the body ends with the connection
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end")
        await writer.drain()
        writer.close()  # one request per connection

    async def client(url: str) -> None:
        pool = Pool()
        response = await pool.request("POST", url, b"/stream", b"")
        assert response.status == 200 and response.header(b"link") == ""
        chunks = [chunk async for chunk in response.chunks()]
        response.close()
        assert b"".join(chunks) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
        response = await pool.request("GET", url, b"/plain", b"")
        assert await response.read() == b"until the end"
        response.close()
        pool.close()

    _run(handler, client)


def test_a_stale_pooled_connection_is_replaced_without_an_error() -> None:
    served = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await _request_of(reader)
        served += 1
        writer.write(OK)
        await writer.drain()
        # The next request on this connection is read, then dropped unanswered, as a server whose
        # keep-alive timer fired at that moment would.
        with_next = await reader.read(1)
        writer.close()
        assert with_next

    async def client(url: str) -> None:
        pool = Pool()
        for _ in range(3):
            response = await pool.request("POST", url, b"/x", b"")
            assert await response.read() == b"{}"
            response.close()
        pool.close()

    _run(handler, client)
    assert served == 3


def test_failures_connect_broken_and_timeout() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await _request_of(reader)
        if b"/silent" in request:
            await asyncio.sleep(10)  # the node says nothing: the client's read timeout ends it
        elif b"/cut" in request:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
            await writer.drain()
        writer.close()

    async def client(url: str) -> None:
        pool = Pool(connect_timeout=2, read_timeout=0.3)
        with pytest.raises(ConnectFailed):
            await pool.request("POST", "http://127.0.0.1:1", b"/x", b"")
        with pytest.raises(ConnectFailed):  # a new connection closed before any byte of an answer
            await pool.request("POST", url, b"/closed", b"")
        response = await pool.request("POST", url, b"/cut", b"")
        with pytest.raises(ResponseBroken):
            await response.read()
        response.close()
        with pytest.raises(TimeoutError):
            await pool.request("POST", url, b"/silent", b"")
        pool.close()

    _run(handler, client)


def test_closing_an_unread_answer_drops_its_connection() -> None:
    gone = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request_of(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        writer.write(b"5\r\nfirst\r\n")
        await writer.drain()
        await reader.read()  # until the client closes
        gone.set()

    async def client(url: str) -> None:
        pool = Pool()
        response = await pool.request("POST", url, b"/stream", b"")
        assert await response.chunks().__anext__() == b"first"
        response.close()  # not read to its end: the node must see the connection go
        await asyncio.wait_for(gone.wait(), 10)
        pool.close()

    _run(handler, client)


def test_header_lines_refuse_line_breaks() -> None:
    assert header_block({"a": "1"}) == b"a: 1\r\n"
    with pytest.raises(ValueError, match="line break"):
        header_block({"authorization": "Bearer x\r\nx-evil: 1"})
