from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from starlette.types import Receive, Scope, Send

from servekit.errors import ServerError
from servekit.openai.errors import OpenAIError, json_object
from servekit.openai.sse import DONE
from servekit.proxy.registry import Node
from servekit.proxy.requests import SESSION_HEADER, route_of
from servekit.proxy.service import HTTP_ERRORS, Proxy, node_headers
from servekit.proxy.strategies import Route
from servekit.proxy.upstream import ConnectFailed, Response, header_block
from servekit.request_id import HEADER as REQUEST_ID
from servekit.request_id import new_request_id

logger = logging.getLogger(__name__)

# Never forwarded: hop-by-hop headers, the proxy's own credentials, what the proxy sets itself (the
# body is sent whole, so no ``expect: 100-continue``).
_DROP_REQUEST = frozenset(
    {
        b"connection",
        b"expect",
        b"keep-alive",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        b"authorization",
        b"x-api-key",
        REQUEST_ID.encode(),
    }
)
_DROP_RESPONSE = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"upgrade",
        b"trailer",
        b"content-length",
        b"date",  # the proxy's own date and server headers are sent
        b"server",
        REQUEST_ID.encode(),
    }
)
_REQUEST_ID = REQUEST_ID.encode()
_STREAM_TYPES = ("text/event-stream", "application/x-ndjson")
BACKOFF_S = 0.05
MAX_BACKOFF_S = 1.0

Chooser = Callable[[Sequence[Node], Route], Node]


class _Outcome(enum.Enum):
    DONE = "done"  # answered (any status but a retryable one)
    RETRY = "retry"  # nothing reached the client: try another node


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None when the client left first."""
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


Headers = list[tuple[bytes, bytes]]


class Reply(Protocol):
    """Where an exchange's answer goes: the client's side of the proxy (ASGI's ``send``, or the
    proxy's own HTTP protocol, ``servekit.proxy.front``)."""

    async def whole(self, status: int, headers: Headers, body: bytes) -> None:
        """A whole answer; ``headers`` carry its content-length."""
        ...

    async def start(self, status: int, headers: Headers) -> None:
        """The head of a streamed answer."""
        ...

    async def chunk(self, data: bytes) -> None: ...

    async def end(self) -> None: ...

    def watch(self, receive: Receive, left: Callable[[], None]) -> Callable[[], None]:
        """Call ``left`` if the client goes away; returns what stops watching."""
        ...


class AsgiReply:
    def __init__(self, send: Send) -> None:
        self.send = send

    async def whole(self, status: int, headers: Headers, body: bytes) -> None:
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    async def start(self, status: int, headers: Headers) -> None:
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def chunk(self, data: bytes) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": True})

    async def end(self) -> None:
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})

    def watch(self, receive: Receive, left: Callable[[], None]) -> Callable[[], None]:
        watcher = asyncio.get_running_loop().create_task(_watch(receive, left))

        def stop() -> None:
            watcher.cancel()

        return stop


async def _watch(receive: Receive, left: Callable[[], None]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    left()


async def send_error(reply: Reply, error: OpenAIError, request_id: str) -> None:
    response = error.response()
    response.headers[REQUEST_ID] = request_id
    await reply.whole(response.status_code, response.raw_headers, bytes(response.body))


class Forward:
    """The endpoint of one proxied route. ``choose`` overrides the strategy (interactive sessions
    always go to the node that holds them)."""

    def __init__(self, proxy: Proxy, choose: Chooser | None = None) -> None:
        self.proxy = proxy
        self.choose: Chooser = choose or proxy.strategy.choose
        self.wants_prompt = proxy.strategy.uses_prompt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.serve(scope, receive, AsgiReply(send))

    async def serve(self, scope: Scope, receive: Receive, reply: Reply) -> None:
        arrived = time.perf_counter()
        request_id = session = content_type = None
        forwarded = []
        for name, value in scope["headers"]:  # one pass: the ids, and the lines that go on
            if name == _REQUEST_ID:
                request_id = value.decode("latin-1")
            elif name not in _DROP_REQUEST:
                forwarded.append(b"%s: %s\r\n" % (name, value))
                if name == SESSION_HEADER:
                    session = value.decode("latin-1")
                elif name == b"content-type":
                    content_type = value
        request_id = request_id or new_request_id()
        if content_type is None:
            forwarded.append(b"content-type: application/json\r\n")
        forwarded.append(b"x-request-id: %s\r\n" % request_id.encode("latin-1"))
        try:
            body = await _read_body(receive)
            if body is None:
                return
            route = route_of(json_object(body), session, self.wants_prompt)
        except ServerError as error:  # the body's size limit
            await send_error(reply, OpenAIError.from_server_error(error), request_id)
            return
        except OpenAIError as error:
            await send_error(reply, error, request_id)
            return
        target = scope.get("raw_path") or scope["path"].encode()
        if scope["query_string"]:
            target += b"?" + scope["query_string"]
        exchange = _Exchange(
            self, scope["method"], target, b"".join(forwarded), body, route, request_id, reply, arrived
        )
        # A client that leaves cancels the exchange: its upstream connection closes, which the node
        # takes as a disconnect and aborts the request (its sequence and KV blocks freed).
        task = asyncio.current_task()
        assert task is not None

        def left() -> None:
            if not exchange.finished:
                exchange.client_left = True
                task.cancel()

        stop_watching = reply.watch(receive, left)
        try:
            await exchange.run()
        except asyncio.CancelledError:
            if not exchange.client_left:
                raise
            task.uncancel()
        finally:
            exchange.finished = True
            stop_watching()


class _Exchange:
    def __init__(
        self,
        forward: Forward,
        method: str,
        target: bytes,
        headers: bytes,
        body: bytes,
        route: Route,
        request_id: str,
        reply: Reply,
        arrived: float,
    ) -> None:
        self.proxy = forward.proxy
        self.choose = forward.choose
        self.method = method
        self.target = target
        self.headers = headers  # the client's header lines that go on, and the request id
        self.body = body
        self.route = route
        self.request_id = request_id
        self.reply = reply
        self.arrived = arrived
        self.last_503: tuple[int, Headers, bytes] | None = None
        self.responded = False
        self.client_left = False
        self.finished = False

    async def run(self) -> None:
        try:
            await self._run()
        except (OSError, RuntimeError) as error:  # the client's socket went away under a send
            logger.debug("request %s: client gone: %s", self.request_id, error)

    async def _run(self) -> None:
        proxy, model = self.proxy, self.route.model
        if model is not None and not proxy.registry.serves(model):
            known = ", ".join(proxy.registry.models()) or "none"
            error = OpenAIError(
                404, f"The model '{model}' does not exist (served: {known})", "model", "model_not_found"
            )
            await send_error(self.reply, error, self.request_id)
            return
        tried: set[str] = set()
        previous: Node | None = None
        for attempt in range(proxy.config.max_attempts):
            nodes = proxy.registry.candidates(model, proxy.now(), exclude=tried)
            if not nodes:
                break
            if previous is not None:
                proxy.metrics.node(previous.url).retries += 1
                await asyncio.sleep(min(BACKOFF_S * 2 ** (attempt - 1), MAX_BACKOFF_S))  # backoff
                nodes = proxy.registry.candidates(model, proxy.now(), exclude=tried)
                if not nodes:
                    break
            node = self.choose(nodes, self.route)
            tried.add(node.url)
            last = attempt == proxy.config.max_attempts - 1
            if await self._attempt(node, last) is _Outcome.DONE:
                return
            previous = node
        if self.last_503 is not None:
            status, headers, content = self.last_503
            headers.append((b"content-length", b"%d" % len(content)))
            await self.reply.whole(status, headers, content)
            return
        proxy.metrics.no_node += 1
        what = f"model '{model}'" if model else "this request"
        error = OpenAIError(
            503, f"No healthy node serves {what} right now; retry later", code="no_healthy_node"
        )
        await send_error(self.reply, error, self.request_id)

    async def _attempt(self, node: Node, last: bool) -> _Outcome:
        proxy = self.proxy
        counters = proxy.metrics.node(node.url)
        counters.requests += 1
        node.in_flight += 1
        node.health.request_started(proxy.now())
        started = time.perf_counter()
        failed: bool | None = None  # None: the client left before we knew
        response: Response | None = None
        try:
            try:
                lines = self.headers + header_block(node_headers(node)) if node.api_key else self.headers
                response = await proxy.pool.request(self.method, node.url, self.target, lines, self.body)
            except ConnectFailed as error:
                failed = True
                logger.warning("request %s: cannot connect to %s: %s", self.request_id, node.url, error)
                return _Outcome.RETRY
            except HTTP_ERRORS as error:
                failed = True
                logger.warning("request %s: %s failed: %r", self.request_id, node.url, error)
                await send_error(self.reply, _node_failed(error), self.request_id)
                return _Outcome.DONE
            failed = response.status >= 500
            headers = self._response_headers(response)
            if response.status == 503 and not last:
                with contextlib.suppress(*HTTP_ERRORS):
                    self.last_503 = (503, headers, await response.read())
                return _Outcome.RETRY
            if response.header(b"content-type").startswith(_STREAM_TYPES):
                failed = await self._stream(node, response, headers) or failed
            else:
                failed = await self._whole(node, response, headers) or failed
            return _Outcome.DONE
        finally:
            if response is not None:
                # Closing a response not read to its end drops its connection: the node sees a
                # disconnect and aborts the request.
                response.close()
            node.in_flight -= 1
            elapsed = time.perf_counter() - started
            if failed is None:
                node.health.request_ended()
            elif failed:
                counters.errors += 1
                node.health.request_failed(proxy.now())
            else:
                node.health.request_succeeded()
                node.latencies.append(elapsed)
                counters.latency.observe(elapsed)

    def _response_headers(self, response: Response) -> Headers:
        headers = [(k, v) for k, v in response.raw_headers if k.lower() not in _DROP_RESPONSE]
        headers.append((_REQUEST_ID, self.request_id.encode()))
        return headers

    async def _whole(self, node: Node, response: Response, headers: Headers) -> bool:
        """Read the whole answer, then send it: a node failing halfway gets a real 503. True if it failed."""
        try:
            content = await response.read()
        except HTTP_ERRORS as error:
            await send_error(self.reply, _node_failed(error), self.request_id)
            return True
        self._first_byte()
        headers.append((b"content-length", b"%d" % len(content)))
        await self.reply.whole(response.status, headers, content)
        return False

    async def _stream(self, node: Node, response: Response, headers: Headers) -> bool:
        """Pass the stream on chunk by chunk; a node failing after the first byte ends an SSE stream with
        an error event and ``[DONE]``. True if it failed."""
        reply = self.reply
        await reply.start(response.status, headers)
        first = True
        try:
            async for chunk in response.chunks():
                if first:
                    self._first_byte()
                    first = False
                await reply.chunk(chunk)
        except HTTP_ERRORS as error:
            logger.warning("request %s: %s failed mid-stream: %r", self.request_id, node.url, error)
            if response.header(b"content-type").startswith("text/event-stream"):
                await reply.chunk(_node_failed(error).sse_event() + DONE)
            await reply.end()
            return True
        await reply.end()
        return False

    def _first_byte(self) -> None:
        if not self.responded:
            self.responded = True
            self.proxy.metrics.ttft.observe(time.perf_counter() - self.arrived)


def _node_failed(error: Exception) -> OpenAIError:
    return OpenAIError(
        503, f"The node serving this request failed: {type(error).__name__}", code="node_failed"
    )
