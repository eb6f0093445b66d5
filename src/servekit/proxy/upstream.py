"""The proxy's one connection pool to its nodes: keep-alive HTTP/1.1 connections on asyncio
protocols, answers parsed by httptools (the parser uvicorn uses).

It does what a proxy needs and nothing more, because on the request path every Python call counts
(aiohttp's client cost the proxy more CPU per request than uvicorn's server side; RESULTS.md): the
request goes out in one write with the headers given as bytes, the answer's status and raw headers
come back once they are complete, its body whole or chunk by chunk as it arrives.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import httptools

IDLE_S = 30.0  # a pooled connection unused this long is closed rather than reused
MAX_IDLE_PER_NODE = 256
_HIGH_WATER = 256 * 1024  # stream bytes buffered for a slow client before the node is paused


class UpstreamError(Exception):
    """A node could not be reached, or broke off its answer."""


class ConnectFailed(UpstreamError):
    """Nothing of the request reached the node: it may go to another node."""


class ResponseBroken(UpstreamError):
    """The node closed the connection or sent what is not HTTP before its answer was complete."""


# What a request to a node may raise.
UPSTREAM_ERRORS = (UpstreamError, TimeoutError)


@dataclass(frozen=True)
class Origin:
    """Where a node's URL points: the address to connect to, and what goes in each request."""

    host: str
    port: int
    tls: bool
    host_header: bytes
    prefix: bytes  # the URL's path, put before every request's path

    @classmethod
    def of(cls, url: str) -> Origin:
        parts = urlsplit(url)
        tls = parts.scheme == "https"
        if parts.hostname is None:
            raise ValueError(f"no host in {url!r}")
        netloc = parts.netloc.rsplit("@", 1)[-1]
        return cls(
            parts.hostname,
            parts.port or (443 if tls else 80),
            tls,
            netloc.encode("idna"),
            parts.path.encode(),
        )


def header_block(headers: dict[str, str]) -> bytes:
    """``name: value`` lines for a request; a value with a line break would smuggle headers."""
    lines = []
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError(f"header {name!r} has a line break")
        lines.append(f"{name}: {value}\r\n".encode("latin-1"))
    return b"".join(lines)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; at most one exchange on it at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.used = False  # answered a request before: a close before any byte may be a stale keep-alive
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head: asyncio.Future[None] = self.loop.create_future()
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.waiter: asyncio.Future[None] | None = None
        self.complete = False
        self.keep_alive = False
        self.got_bytes = False
        self.until_close = False  # a body without length: it ends when the node closes
        self.error: UpstreamError | None = None
        self.paused = False

    # ------------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio classes

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._fail(ResponseBroken(f"the node's answer is not valid HTTP: {error}"))
            self.close()

    def eof_received(self) -> bool:
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.until_close and self.head.done() and not self.complete:
            self.on_message_complete()
        elif not self.complete:
            reason = f": {exc}" if exc else ""
            if not self.got_bytes:
                self._fail(ConnectFailed(f"the node closed the connection before answering{reason}"))
            else:
                self._fail(ResponseBroken(f"the node closed the connection mid-answer{reason}"))

    # ------------------------------------------------------------------ httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.status < 200:  # an interim answer (103 Early Hints): the real one follows
            self.headers = []
            return
        framed = any(n.lower() in (b"content-length", b"transfer-encoding") for n, _ in self.headers)
        self.until_close = not framed and self.status >= 200 and self.status not in (204, 304)
        if not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.status < 200:
            return
        self.complete = True
        self.keep_alive = not self.until_close and self.parser.should_keep_alive()
        self._wake()

    # ------------------------------------------------------------------ the exchange
    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        if not self.head.done():
            self.head.set_exception(error)
            self.head.exception()  # retrieved: nobody may be waiting yet
        self._wake()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def next_chunk(self, timeout: float | None) -> bytes | None:
        """The next piece of the body as it came, or None at its end."""
        while not self.chunks:
            if self.complete:
                return None
            if self.error is not None:
                raise self.error
            self.waiter = self.loop.create_future()
            await _wait(self.loop, self.waiter, timeout)
            self.waiter = None
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        if self.paused and self.buffered <= _HIGH_WATER // 2 and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return chunk


async def _wait(loop: asyncio.AbstractEventLoop, future: asyncio.Future[None], timeout: float | None) -> None:
    if timeout is None:
        await future
        return
    timer = loop.call_later(timeout, _expire, future)
    try:
        await future
    finally:
        timer.cancel()


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(TimeoutError("the node sent nothing in time"))


class Response:
    """A node's answer, once its status and headers came. ``close`` (always, in ``finally``) hands the
    connection back when the answer was read to its end, and drops it otherwise: the node sees a
    disconnect and stops working on the request."""

    __slots__ = ("_conn", "_key", "_pool", "_timeout", "raw_headers", "status")

    def __init__(self, pool: Pool, key: Origin, conn: _Connection, timeout: float | None) -> None:
        self._pool, self._key, self._conn, self._timeout = pool, key, conn, timeout
        self.status = conn.status
        self.raw_headers = conn.headers

    def header(self, name: bytes) -> str:
        """A header's value ('' when absent); ``name`` in lower case."""
        for key, value in self.raw_headers:
            if key.lower() == name:
                return value.decode("latin-1")
        return ""

    async def read(self) -> bytes:
        parts = []
        while (chunk := await self._conn.next_chunk(self._timeout)) is not None:
            parts.append(chunk)
        return b"".join(parts)

    async def chunks(self) -> AsyncIterator[bytes]:
        while (chunk := await self._conn.next_chunk(self._timeout)) is not None:
            yield chunk

    def close(self) -> None:
        conn = self._conn
        if conn.complete and conn.keep_alive and not conn.closed:
            self._pool.release(self._key, conn)
        else:
            conn.close()


class Pool:
    """Idle keep-alive connections by node, the most recently used first."""

    def __init__(self, connect_timeout: float = 5.0, read_timeout: float | None = None) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: dict[Origin, list[_Connection]] = {}
        self._origins: dict[str, Origin] = {}
        self._tls: ssl.SSLContext | None = None
        self._closed = False

    def origin(self, url: str) -> Origin:
        found = self._origins.get(url)
        if found is None:
            found = self._origins[url] = Origin.of(url)
        return found

    async def request(
        self,
        method: str,
        url: str,
        target: bytes,
        headers: bytes,
        body: bytes = b"",
        read_timeout: float | None = -1.0,
    ) -> Response:
        """Send ``method target`` (the path and query, under the node URL's own path) with ``headers``
        (``header_block`` lines) and ``body``; return once the answer's headers came. Raises
        ``UPSTREAM_ERRORS``; ``ConnectFailed`` when the node cannot have seen the request."""
        key = self.origin(url)
        timeout = self.read_timeout if read_timeout == -1.0 else read_timeout
        head = b"%s %s HTTP/1.1\r\nhost: %s\r\ncontent-length: %d\r\n" % (
            method.encode("ascii"),
            key.prefix + target,
            key.host_header,
            len(body),
        )
        message = b"".join((head, headers, b"\r\n", body))
        while True:
            conn = self._idle_connection(key)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(key)
            conn._reset()
            assert conn.transport is not None
            conn.transport.write(message)
            try:
                await _wait(conn.loop, conn.head, timeout)
            except ConnectFailed:
                conn.close()
                if reused:  # a keep-alive connection the node closed as we sent: a new one
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            conn.used = True
            return Response(self, key, conn, timeout)

    def _idle_connection(self, key: Origin) -> _Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_S:
                return conn
            conn.close()
        return None

    async def _connect(self, key: Origin) -> _Connection:
        if self._closed:
            raise ConnectFailed("the proxy is closing")
        loop = asyncio.get_running_loop()
        tls: Any = None
        if key.tls:
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = self._tls
        try:
            async with asyncio.timeout(self.connect_timeout):
                transport, conn = await loop.create_connection(
                    lambda: _Connection(loop), key.host, key.port, ssl=tls
                )
        except (OSError, TimeoutError) as error:
            raise ConnectFailed(f"cannot connect to {key.host}:{key.port}: {error or 'timed out'}") from None
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def release(self, key: Origin, conn: _Connection) -> None:
        idle = self._idle.setdefault(key, [])
        if self._closed or len(idle) >= MAX_IDLE_PER_NODE:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    async def fetch(
        self,
        method: str,
        url: str,
        target: bytes,
        headers: bytes = b"",
        body: bytes = b"",
        timeout: float | None = None,
    ) -> tuple[int, bytes]:
        """One whole exchange within ``timeout`` seconds: the status and the body."""
        async with asyncio.timeout(timeout):
            response = await self.request(method, url, target, headers, body, read_timeout=None)
            try:
                return response.status, await response.read()
            finally:
                response.close()

    def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
