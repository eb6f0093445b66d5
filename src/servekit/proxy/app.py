"""The proxy's routes: the proxied OpenAI and native endpoints, the node registry (LMDeploy's API),
``/v1/models`` (every node's models), ``/health`` and ``/metrics``."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route as HTTPRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from servekit.errors import ServerError
from servekit.http.auth import APIKeyCheck
from servekit.http.limits import MAX_HEADER_BYTES, MaxBodySizeMiddleware, MaxHeaderSizeMiddleware
from servekit.openai.errors import OpenAIError, invalid, json_object
from servekit.prometheus import CONTENT_TYPE
from servekit.proxy.config import ProxyConfig, ProxyConfigError, normalize_url
from servekit.proxy.forward import REQUEST_ID, Forward
from servekit.proxy.front import FastPath, ProxyApp
from servekit.proxy.openapi import node_model_infos, nodes_document, proxy_openapi
from servekit.proxy.registry import Node
from servekit.proxy.service import HTTP_ERRORS, NodeUnreachable, Proxy
from servekit.proxy.strategies import Route
from servekit.request_id import check_request_id, new_request_id
from servekit.sizes import parse_size
from servekit.specs.llm.protocol import AbortRequest

logger = logging.getLogger(__name__)

PROXIED = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/generate")
OPEN_PATHS = frozenset({"/health"})


_REQUEST_ID_HEADER = REQUEST_ID.encode()


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


class _Gate:
    """What every request must pass before a route sees it, answered in OpenAI's envelope: the
    proxy's own key (on every route but ``/health``), and a well-formed ``X-Request-ID`` when one
    is sent (as servekit's servers check it: it goes on to the nodes and into their logs)."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.check = APIKeyCheck(api_key) if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            error = self.refusal(scope)
            if error is not None:
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope) -> OpenAIError | None:
        if self.check is not None and scope["path"] not in OPEN_PATHS:
            try:
                self.check(Request(scope))
            except ServerError as error:
                return OpenAIError.from_server_error(error)
        given = next((v for k, v in scope["headers"] if k == _REQUEST_ID_HEADER), None)
        problem = None if given is None else check_request_id(given.decode("latin-1"))
        return None if problem is None else invalid(problem, "X-Request-ID")


class _Routes:
    """The proxied routes straight to their endpoint: the hot path skips Starlette's router and
    exception middlewares. Everything else (other methods too) goes through ``app``."""

    def __init__(self, app: ASGIApp, direct: dict[str, Forward]) -> None:
        self.app = app
        self.direct = direct

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.direct.get(scope["path"])
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _errors(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except OpenAIError as error:
            return error.response()

    return wrapped


class NodesAPI:
    """LMDeploy's registry routes."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    async def status(self, request: Request) -> Response:
        now = self.proxy.now()
        return _json(
            {
                node.url: {
                    "models": node.models,
                    "speed": node.speed,
                    "unfinished": node.in_flight,
                    "latency": list(node.latencies),
                    "healthy": node.health.healthy,
                    "circuit": node.health.circuit.name.lower(),
                    "admits_requests": node.health.admits(now),
                    "load": node.reported_load,
                }
                for node in self.proxy.registry
            }
        )

    async def add(self, request: Request) -> Response:
        data = json_object(await request.body())
        url = _url_of(data.get("url"))
        status = data.get("status") or {}
        if not isinstance(status, dict):
            raise invalid("'status' must be an object", "status")
        models = status.get("models")
        if models is not None and (
            not isinstance(models, list) or not all(isinstance(m, str) for m in models)
        ):
            raise invalid("'status.models' must be a list of model names", "status.models")
        speed = status.get("speed")
        if speed is not None and (
            isinstance(speed, bool) or not isinstance(speed, int | float) or speed <= 0
        ):
            raise invalid("'status.speed' must be a positive number", "status.speed")
        api_key = data.get("api_key")
        if api_key is not None and (not isinstance(api_key, str) or "\r" in api_key or "\n" in api_key):
            raise invalid("'api_key' must be a string without line breaks", "api_key")
        try:
            node = await self.proxy.add_node(url, models, None if speed is None else float(speed), api_key)
        except NodeUnreachable as error:
            raise OpenAIError(400, str(error), "url", "node_unreachable") from None
        return _json(
            {"url": node.url, "models": node.models, "speed": node.speed, "proxy_id": self.proxy.instance_id}
        )

    async def _url_param(self, request: Request) -> str:
        given = request.query_params.get("node_url")
        if given is None:
            body = await request.body()
            given = json_object(body).get("url") if body.strip() else None
        return _url_of(given, "node_url")

    async def remove(self, request: Request) -> Response:
        url = await self._url_param(request)
        if self.proxy.remove_node(url) is None:
            raise OpenAIError(404, f"No node {url} is registered", "url", "node_not_found")
        return _json({"url": url, "removed": True})

    async def terminate(self, request: Request) -> Response:
        url = await self._url_param(request)
        node = self.proxy.registry.get(url)
        if node is None:
            raise OpenAIError(404, f"No node {url} is registered", "url", "node_not_found")
        return _json(await self._terminate(node))

    async def terminate_all(self, request: Request) -> Response:
        return _json({"nodes": [await self._terminate(node) for node in self.proxy.registry]})

    async def _terminate(self, node: Node) -> dict[str, Any]:
        """Deregister the node and ask it to stop, reporting its answer: ``POST /terminate`` with the
        node's key (``servekit serve --allow-terminate-by-client``), ``GET`` where that is refused with
        405 (LMDeploy's servers)."""
        self.proxy.remove_node(node.url)
        status: int | None
        try:
            status, _ = await self.proxy.fetch("POST", node, "/terminate", timeout=5)
            if status == 405:
                status, _ = await self.proxy.fetch("GET", node, "/terminate", timeout=5)
        except HTTP_ERRORS:
            status = None
        return {"url": node.url, "removed": True, "terminate_status": status}


def _url_of(value: Any, param: str = "url") -> str:
    if not isinstance(value, str):
        raise invalid(f"'{param}' must be the node's URL", param)
    try:
        return normalize_url(value, param)
    except ProxyConfigError as error:
        raise invalid(str(error), param) from None


class FrontAPI:
    """The routes answered by the proxy itself."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    async def models(self, request: Request) -> Response:
        return _json({"object": "list", "data": [self._model(m) for m in self.proxy.registry.models()]})

    async def model(self, request: Request) -> Response:
        model = request.path_params["model"]
        if model not in self.proxy.registry.models():
            raise OpenAIError(404, f"The model '{model}' does not exist", "model", "model_not_found")
        return _json(self._model(model))

    @staticmethod
    def _model(model: str) -> dict[str, Any]:
        return {"id": model, "object": "model", "created": int(time.time()), "owned_by": "servekit"}

    async def health(self, request: Request) -> Response:
        now = self.proxy.now()
        healthy = sum(1 for node in self.proxy.registry if node.health.admits(now))
        return _json(
            {
                "status": "ok" if healthy else "no healthy node",
                "healthy_nodes": healthy,
                "proxy_id": self.proxy.instance_id,
            },
            200 if healthy else 503,
        )

    async def metrics(self, request: Request) -> Response:
        return Response(self.proxy.metrics.render(self.proxy.registry), media_type=CONTENT_TYPE)

    async def broadcast(self, request: Request) -> Response:
        """``/flush_cache`` and ``/abort_request``: sent to every node, each node's answer reported."""
        body = await request.body()
        if request.url.path == "/abort_request":
            try:
                AbortRequest.model_validate_json(body, strict=True)
            except ValidationError as error:
                raise OpenAIError.from_validation_error(error) from None
        headers = {
            "content-type": "application/json",
            REQUEST_ID: request.headers.get(REQUEST_ID) or new_request_id(),
        }
        answers = await self.proxy.broadcast(request.method, request.url.path, body, headers)
        ok = all(200 <= a["status"] < 300 for a in answers)
        if request.url.path == "/abort_request":
            aborted = any(isinstance(a.get("body"), dict) and a["body"].get("aborted") for a in answers)
            return _json({"aborted": aborted, "nodes": answers})
        status = 200 if ok else next(a["status"] for a in answers if not 200 <= a["status"] < 300)
        return _json({"flushed": ok, "nodes": answers}, status)


def _interactive_chooser(proxy: Proxy) -> Callable[[Sequence[Node], Route], Node]:
    """A conversation the node keeps (``/v1/chat/interactive``) must return to that node."""

    def choose(nodes: Sequence[Node], route: Route) -> Node:
        if route.session is None:
            return proxy.strategy.choose(nodes, route)
        return proxy.interactive_ring.owner(route.session, nodes)

    return choose


async def _http_error(request: Request, exc: Exception) -> Response:
    """Unknown routes and methods answer in OpenAI's envelope, as every other error of the proxy."""
    assert isinstance(exc, HTTPException)
    return OpenAIError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {})).response()


async def _server_error(request: Request, exc: Exception) -> Response:
    """A body past the size limit (raised while a route reads it), in OpenAI's envelope."""
    assert isinstance(exc, ServerError)
    return OpenAIError.from_server_error(exc).response()


def _version() -> str:
    from servekit import __version__

    return str(__version__)


def build_app(config: ProxyConfig, proxy: Proxy | None = None) -> ProxyApp:
    proxy = proxy or Proxy(config)
    nodes = NodesAPI(proxy)
    front = FrontAPI(proxy)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await proxy.start()
        try:
            yield
        finally:
            await proxy.close()

    forward = Forward(proxy)
    document = proxy_openapi(_version(), bool(config.api_key))

    async def openapi(request: Request) -> Response:
        infos = await node_model_infos(proxy, config.health_check_timeout * 5)
        return Response(orjson.dumps(nodes_document(document, infos)), media_type="application/json")

    direct: dict[str, Forward] = {path: forward for path in PROXIED}
    direct["/v1/chat/interactive"] = Forward(proxy, _interactive_chooser(proxy))
    routes = [HTTPRoute(path, endpoint, methods=["POST"]) for path, endpoint in direct.items()]
    routes += [
        HTTPRoute("/v1/models", _errors(front.models), methods=["GET"]),
        HTTPRoute("/v1/models/{model:path}", _errors(front.model), methods=["GET"]),
        HTTPRoute("/health", front.health, methods=["GET"]),
        HTTPRoute("/metrics", front.metrics, methods=["GET"]),
        HTTPRoute("/flush_cache", front.broadcast, methods=["POST", "GET"]),
        HTTPRoute("/abort_request", _errors(front.broadcast), methods=["POST"]),
        HTTPRoute("/nodes/status", nodes.status, methods=["GET"]),
        HTTPRoute("/nodes/add", _errors(nodes.add), methods=["POST"]),
        HTTPRoute("/nodes/remove", _errors(nodes.remove), methods=["POST"]),
        HTTPRoute("/nodes/terminate", _errors(nodes.terminate), methods=["POST"]),
        HTTPRoute("/nodes/terminate_all", nodes.terminate_all, methods=["GET"]),
        HTTPRoute("/openapi.json", openapi, methods=["GET"]),
    ]
    handlers = {HTTPException: _http_error, ServerError: _server_error}
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    app.state.proxy = proxy
    max_body = parse_size(config.max_request_body_size)
    gate = _Gate(MaxBodySizeMiddleware(_Routes(app, direct), max_body), config.api_key)
    fast = FastPath(direct, gate.refusal, max_body, MAX_HEADER_BYTES)
    return ProxyApp(MaxHeaderSizeMiddleware(gate, MAX_HEADER_BYTES), fast)
