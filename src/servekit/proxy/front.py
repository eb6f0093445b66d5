"""The proxy's HTTP front: uvicorn's httptools protocol, except that a proxied request goes straight
from the parser to its ``Forward`` endpoint, not through the ASGI app.

On the proxy's hot path the ASGI scaffolding (scope, middlewares, ``receive``/``send`` messages, a
watcher task per request for the client's disconnect) cost about as much CPU as the forwarding itself,
and uvicorn writes a response's head and body as two syscalls. Here a whole answer goes out in one
write, and a client that leaves is noticed in ``connection_lost``. Only requests every check of the
ASGI stack would let through take this path; anything else (other routes and methods, a body past
the limit or without a Content-Length, a refused key, ...) goes through the ASGI app, which answers
it as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from servekit.proxy.forward import Forward, Headers

logger = logging.getLogger(__name__)


class FastPath:
    """Which requests skip the ASGI app: a POST to a proxied route, its body framed by a Content-Length
    within ``max_body``, its headers within ``max_headers`` bytes, that ``refusal`` (the gate: the key,
    the request id) has nothing against."""

    def __init__(
        self,
        routes: dict[str, Forward],
        refusal: Callable[[Scope], object | None],
        max_body: int,
        max_headers: int,
    ) -> None:
        self.routes = routes
        self.refusal = refusal
        self.max_body = max_body
        self.max_headers = max_headers

    def endpoint(self, scope: Scope) -> Forward | None:
        if scope["method"] != "POST":
            return None
        forward = self.routes.get(scope["path"])
        if forward is None:
            return None
        size, length = 0, None
        for name, value in scope["headers"]:
            size += len(name) + len(value) + 4
            if name == b"content-length":
                if length is not None:
                    return None
                length = value
            elif name == b"transfer-encoding":
                return None
        if length is None or not length.isdigit() or int(length) > self.max_body or size > self.max_headers:
            return None
        return forward if self.refusal(scope) is None else None


class ProxyApp:
    """The proxy's ASGI app, and the requests its own protocol may serve without it."""

    def __init__(self, app: ASGIApp, fast: FastPath) -> None:
        self.app = app
        self.fast = fast

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class DirectReply:
    """A ``Reply`` written on the client's connection, in uvicorn's stead (its cycle's state kept as
    uvicorn keeps it, so keep-alive, pipelining and shutdown work as for any request)."""

    def __init__(self, cycle: RequestResponseCycle) -> None:
        self.cycle = cycle
        self.left: Callable[[], None] | None = None

    def _head(self, status: int, headers: Headers, framing: bytes) -> list[bytes]:
        cycle = self.cycle
        cycle.response_started = True
        cycle.waiting_for_100_continue = False
        parts = [STATUS_LINE[status]]
        for name, value in cycle.default_headers:
            parts += (name, b": ", value, b"\r\n")
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if not cycle.keep_alive:
            parts.append(b"connection: close\r\n")
        parts += (framing, b"\r\n")
        return parts

    def _done(self) -> None:
        cycle = self.cycle
        cycle.response_complete = True
        cycle.message_event.set()
        if not cycle.keep_alive:
            cycle.transport.close()
        cycle.on_response()

    async def whole(self, status: int, headers: Headers, body: bytes) -> None:
        if self.cycle.disconnected:
            return
        parts = self._head(status, headers, b"")
        parts.append(body)
        self.cycle.transport.write(b"".join(parts))
        self._done()

    async def start(self, status: int, headers: Headers) -> None:
        if not self.cycle.disconnected:
            self.cycle.transport.write(
                b"".join(self._head(status, headers, b"transfer-encoding: chunked\r\n"))
            )

    async def chunk(self, data: bytes) -> None:
        cycle = self.cycle
        if cycle.flow.write_paused and not cycle.disconnected:
            await cycle.flow.drain()  # a slow client: the node's stream waits for it
        if data and not cycle.disconnected:
            cycle.transport.write(b"%x\r\n%s\r\n" % (len(data), data))

    async def end(self) -> None:
        if not self.cycle.disconnected:
            self.cycle.transport.write(b"0\r\n\r\n")
            self._done()

    def watch(self, receive: Receive, left: Callable[[], None]) -> Callable[[], None]:
        self.left = left
        return self._stop_watching

    def _stop_watching(self) -> None:
        self.left = None

    def client_left(self) -> None:
        left, self.left = self.left, None
        if left is not None:
            left()


class ProxyProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the proxied routes served directly (``FastPath``)."""

    fast: FastPath  # set on the class ``protocol_for`` makes

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reply: DirectReply | None = None

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        # ``app`` is another one when uvicorn answers for itself (over its concurrency limit)
        scope = cast(Scope, cycle.scope)
        forward = self.fast.endpoint(scope) if app is self.app else None
        if forward is None:
            super()._start_asgi_task(cycle, app)
            return
        reply = self._reply = DirectReply(cycle)
        task = self.loop.create_task(_serve(forward, cycle, reply))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        reply, self._reply = self._reply, None
        if reply is not None:
            reply.client_left()


async def _serve(forward: Forward, cycle: RequestResponseCycle, reply: DirectReply) -> None:
    """What uvicorn's ``run_asgi`` does around an app, for one ``Forward``."""
    try:
        await forward.serve(cast(Scope, cycle.scope), cast(Receive, cycle.receive), reply)
    except Exception as error:
        logger.error("proxying %s failed", cycle.scope["path"], exc_info=error)
        if not cycle.response_started and not cycle.disconnected:
            body = b"Internal Server Error"
            headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"21")]
            cycle.keep_alive = False
            await reply.whole(500, headers, body)
        else:
            cycle.transport.close()
    else:
        if not cycle.response_complete and not cycle.disconnected:
            cycle.transport.close()
    finally:
        cycle.on_response = _nothing


def _nothing() -> None:
    return None


def protocol_for(app: ProxyApp) -> type[asyncio.Protocol]:
    """The protocol class to give uvicorn (``http=``) for serving ``app``."""
    if not hasattr(HttpToolsProtocol, "_start_asgi_task"):  # the hook this relies on (uvicorn 0.54)
        logger.warning("this uvicorn has no _start_asgi_task: every request goes through ASGI")
    return type("BoundProxyProtocol", (ProxyProtocol,), {"fast": app.fast})
