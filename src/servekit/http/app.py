"""The ASGI app of one HTTP front: API routes, auth, errors, health and info."""

from __future__ import annotations

import asyncio
import inspect
import logging
import pickle
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import Depends, FastAPI
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from servekit.api import LitAPI
from servekit.callbacks import CallbackRunner, EventTypes
from servekit.errors import ServerError
from servekit.http.auth import APIKeyCheck, ShutdownKeyCheck
from servekit.http.dispatcher import Dispatcher
from servekit.http.forms import read_form
from servekit.http.lifespan import serving
from servekit.http.limits import MaxBodySizeMiddleware, MaxHeaderSizeMiddleware
from servekit.http.metrics import METRICS_PATH, HTTPMetrics, render_core_metrics
from servekit.http.openapi import CORE_ERROR, OPENAI_ERROR, OpenAPIDoc
from servekit.http.request_log import RequestObserver
from servekit.log_setup import LogSettings
from servekit.mcp import MCP_PATH, mcp_tools
from servekit.prometheus import CONTENT_TYPE
from servekit.specs.base import FrontHandle, LitSpec, route_doc, wait_for_disconnect
from servekit.transport import Encoding, Endpoints
from servekit.workers.hooks import first_argument_model
from servekit.workers.pool import WorkerPool

logger = logging.getLogger(__name__)

Middleware = type | tuple[type, dict[str, Any]]


@dataclass
class FrontConfig:
    """Everything an HTTP front needs; picklable, so extra fronts can run in their own processes."""

    apis: list[LitAPI]
    workers_by_api: list[list[int]]
    endpoints: Endpoints
    timeout: float | None
    healthcheck_path: str = "/health"
    info_path: str = "/info"
    info: dict[str, Any] = field(default_factory=dict)
    max_payload_size: int | None = None
    middlewares: list[Middleware] = field(default_factory=list)
    callbacks: CallbackRunner = field(default_factory=CallbackRunner)
    api_key: str | None = None
    disable_openapi_url: bool = False
    mounts: list[tuple[str, Any]] = field(default_factory=list)  # (path, ASGI app), from loggers
    enable_shutdown_api: bool = False
    shutdown_path: str = "/shutdown"
    shutdown_api_key: str | None = None
    access_log: bool = True


class _APIFront(FrontHandle):
    """Sends one API's requests to its workers, with the server's timeout and disconnect handling."""

    def __init__(self, api_index: int, dispatcher: Dispatcher, timeout: float | None, stream: bool) -> None:
        self.api_index = api_index
        self.dispatcher = dispatcher
        self.timeout = timeout
        self.streams = stream

    async def call(
        self,
        request_object: Any,
        http_request: Request | None = None,
        *,
        worker: int | None = None,
        affinity: str | None = None,
    ) -> bytes:
        rid = self.dispatcher.submit(
            self.api_index, *_payload(request_object), stream=False, worker=worker, affinity=affinity
        )
        if http_request is None:
            return await self.dispatcher.result(rid, self.timeout)
        return await _unless_disconnected(
            self.dispatcher.result(rid, self.timeout), http_request, self.dispatcher, rid
        )

    async def stream(
        self,
        request_object: Any,
        http_request: Request | None = None,
        *,
        worker: int | None = None,
        affinity: str | None = None,
        tags: Sequence[str] = (),
    ) -> AsyncIterator[bytes]:
        rid = self.dispatcher.submit(
            self.api_index,
            *_payload(request_object),
            stream=True,
            worker=worker,
            affinity=affinity,
            tags=tags,
        )
        deadline = None if self.timeout is None else asyncio.get_running_loop().time() + self.timeout
        async for chunk in self.dispatcher.stream(rid, deadline):
            yield chunk

    def workers(self) -> list[int]:
        return self.dispatcher.workers(self.api_index)

    def owner(self, tag: str) -> int | None:
        return self.dispatcher.owner(tag)

    def release_affinity(self, key: str) -> None:
        self.dispatcher.release_affinity(key)


def _payload(request_object: Any) -> tuple[int, bytes]:
    """Raw JSON bodies go as they are (the worker parses them); anything else is pickled."""
    if isinstance(request_object, bytes):
        return Encoding.JSON, request_object
    return Encoding.PICKLE, pickle.dumps(request_object, protocol=5)


# Most requests finish within this time: only slower ones get a task that watches for a disconnect.
_WATCH_DISCONNECT_AFTER_S = 0.005


async def _unless_disconnected(result: Any, http_request: Request, dispatcher: Dispatcher, rid: int) -> bytes:
    """Await the result; if the client goes away first, cancel the request in the worker."""
    watcher: asyncio.Task[None] | None = None

    def on_disconnect(task: asyncio.Task[None]) -> None:
        if not task.cancelled():
            dispatcher.abandon(rid, 499, "Client disconnected")

    def start_watching() -> None:
        nonlocal watcher
        watcher = asyncio.ensure_future(wait_for_disconnect(http_request))
        watcher.add_done_callback(on_disconnect)

    timer = asyncio.get_running_loop().call_later(_WATCH_DISCONNECT_AFTER_S, start_watching)
    try:
        body: bytes = await result
        return body
    finally:
        timer.cancel()
        if watcher is not None:
            watcher.cancel()


def _error_response(exc: ServerError) -> Response:
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


# Bodies of these types are never JSON. Others are parsed as JSON; forms are parsed as forms.
_NON_JSON_PREFIXES = ("image/", "audio/", "video/", "application/octet-stream", "application/pdf")
_FORM = "application/x-www-form-urlencoded"


def _is_form(request: Request, body: bytes) -> bool:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type == "multipart/form-data":
        return True
    # curl -d sends JSON labelled as a form: a body that looks like JSON is treated as JSON.
    return media_type == _FORM and body.lstrip()[:1] not in (b"{", b"[")


def _check_content_type(request: Request) -> None:
    content_type = request.headers.get("content-type")
    if content_type is None:
        return
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type.startswith(_NON_JSON_PREFIXES):
        raise ServerError(
            415, f"Unsupported content type {media_type!r}: send the request body as application/json"
        )


def build_app(
    config: FrontConfig,
    dispatcher: Dispatcher,
    *,
    workers: WorkerPool | None = None,
    log_settings: LogSettings | None = None,
    on_shutdown: Callable[[], None] | None = None,
) -> FastAPI:
    """The app of one front. Its lifespan starts ``workers`` if they are not running yet (in-process
    use), with ``log_settings``; the shutdown API, if enabled, calls ``on_shutdown``."""
    lifespans: list[Callable[[], AbstractAsyncContextManager[None]]] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with serving(dispatcher, workers, log_settings or LogSettings()), AsyncExitStack() as stack:
            for extra in lifespans:
                await stack.enter_async_context(extra())
            yield

    app = FastAPI(
        title="servekit",
        lifespan=lifespan,
        openapi_url=None if config.disable_openapi_url else "/openapi.json",
    )

    @app.exception_handler(ServerError)
    async def on_server_error(request: Request, exc: ServerError) -> Response:
        # A spec may shape the errors of its own routes (the OpenAI specs answer {"error": {...}}).
        owner = getattr(request.scope.get("endpoint"), "__self__", None)
        spec_error_response = getattr(owner, "error_response", None) if isinstance(owner, LitSpec) else None
        if spec_error_response is not None:
            return spec_error_response(exc)
        return _error_response(exc)

    api_key_check = APIKeyCheck(config.api_key) if config.api_key else None
    callbacks = config.callbacks
    doc = OpenAPIDoc()
    app.openapi = doc.wrap(app.openapi)  # type: ignore[method-assign]
    fronts: list[_APIFront] = []

    for api_index, api in enumerate(config.apis):
        front = _APIFront(api_index, dispatcher, config.timeout, api.stream)
        fronts.append(front)
        dependencies = []
        if api_key_check is not None:
            dependencies.append(Depends(api_key_check))
        authorize = getattr(api, "authorize", None)
        if callable(authorize):
            dependencies.append(Depends(authorize))
        spec = api.spec
        if spec is not None:
            spec.bind_front(front)
            envelope = OPENAI_ERROR if getattr(spec, "error_response", None) else CORE_ERROR
            for spec_endpoint in spec.endpoints:
                app.add_api_route(
                    spec_endpoint.path,
                    spec_endpoint.endpoint,
                    methods=spec_endpoint.methods,
                    dependencies=[] if spec_endpoint.public else dependencies,
                    include_in_schema=not spec_endpoint.public,
                )
                if spec_endpoint.public:
                    continue  # a page (the playground), not an operation of the API
                described = route_doc(spec_endpoint.endpoint)
                doc.add(
                    spec_endpoint.path,
                    spec_endpoint.methods,
                    body=described.body,
                    media_types=described.media_types,
                    envelope=envelope,
                    errors=_error_statuses(config, has_body=described.body is not None),
                )
            continue
        endpoint = _plain_endpoint(front, api.stream, callbacks, api_key_check)
        if not callable(authorize):
            # The hot path: a plain Starlette route, matched first, skips FastAPI's dependency
            # machinery; the FastAPI route below it only documents the endpoint in /openapi.json.
            app.router.routes.append(Route(api.api_path, endpoint, methods=["POST"]))
        app.add_api_route(
            api.api_path,
            endpoint,
            methods=["POST"],
            dependencies=[Depends(authorize)] if callable(authorize) else [],
            name=f"{type(api).__name__}.predict",
            summary=f"{type(api).__name__} {'(streaming)' if api.stream else ''}".strip(),
        )
        doc.add(
            api.api_path,
            ["POST"],
            body=first_argument_model(api.decode_request) or FREE_FORM_BODY,
            media_types=("text/event-stream",) if api.stream else ("application/json",),
            envelope=CORE_ERROR,
            errors=[*_error_statuses(config, has_body=True), 422],
        )

    if not config.disable_openapi_url:
        specs = [api.spec for api in config.apis if api.spec is not None]
        # Before FastAPI's own route: the specs complete the document with what their workers know.
        app.router.routes.insert(0, Route("/openapi.json", _openapi_endpoint(app, specs), methods=["GET"]))

    tools = mcp_tools(config.apis)
    if tools:
        from servekit.http.mcp import MCPEndpoint

        mcp_endpoint = MCPEndpoint(tools, fronts, api_key_check)
        lifespans.append(mcp_endpoint.lifespan)
        for path in (MCP_PATH, MCP_PATH.rstrip("/")):
            app.router.routes.append(Route(path, mcp_endpoint))

    info_dependencies = [Depends(api_key_check)] if api_key_check is not None else []

    # /health stays open with an API key set: load balancers and orchestrators probe it without one.
    @app.get(config.healthcheck_path, response_class=PlainTextResponse)
    async def health() -> Response:
        healthy = dispatcher.ready()
        # Every probe asks every API's own check, ready workers or not (as LitServe does): a check
        # may keep state across probes (say, "healthy once warmed up for 5 s since first asked").
        for api in config.apis:
            verdict = api.health()
            if inspect.isawaitable(verdict):
                verdict = await verdict
            healthy = bool(verdict) and healthy
        if healthy:
            return PlainTextResponse("ok")
        return PlainTextResponse("not ready", status_code=503)

    @app.get(config.info_path, dependencies=info_dependencies)
    async def info() -> Response:
        body = dict(config.info)
        body["workers"] = dispatcher.worker_states()
        return JSONResponse(body)

    for path, mounted in config.mounts:
        app.mount(path, mounted)

    http_metrics = HTTPMetrics()
    user_paths = {path.rstrip("/") for path, _ in config.mounts} | {api.api_path for api in config.apis}
    # A LitServe app may mount its own /metrics (a logger's Prometheus app): that one wins.
    if METRICS_PATH not in user_paths:
        specs = [api.spec for api in config.apis if api.spec is not None]

        @app.get(METRICS_PATH, dependencies=info_dependencies, response_class=PlainTextResponse)
        async def metrics() -> Response:
            text = render_core_metrics(
                http_metrics,
                dispatcher.front_index,
                dispatcher.pending_by_worker(),
                dispatcher.worker_states(),
                dispatcher.restarts,
                dispatcher.batch_sizes,
            )
            extra = [await spec.metrics_text() for spec in specs]
            return Response("".join([text, *extra]), media_type=CONTENT_TYPE)

    pages = [page for api in config.apis if (page := _browser_root(api)) is not None]
    root_redirect = pages[0] if pages else (None if config.disable_openapi_url else "/docs")

    # LitServe's root: a running server says so (behind the API key, as /info is); a browser is sent
    # to the page made for it (which asks for the key itself).
    @app.get("/", response_class=PlainTextResponse)
    async def root(request: Request) -> Response:
        if root_redirect is not None and "text/html" in request.headers.get("accept", ""):
            return RedirectResponse(root_redirect, status_code=307)
        if api_key_check is not None:
            api_key_check(request)
        return PlainTextResponse("litserve running")

    if config.enable_shutdown_api and on_shutdown is not None:
        _add_shutdown_route(app, config, on_shutdown)

    if config.max_payload_size is not None:
        app.add_middleware(MaxBodySizeMiddleware, max_size=config.max_payload_size)
    for middleware in config.middlewares:
        if isinstance(middleware, tuple):
            middleware_class, kwargs = middleware
            app.add_middleware(middleware_class, **kwargs)  # type: ignore[arg-type]
        else:
            app.add_middleware(middleware)  # type: ignore[arg-type]
    app.add_middleware(RequestObserver, metrics=http_metrics, access_log=config.access_log)
    app.add_middleware(MaxHeaderSizeMiddleware)  # outermost: before anything reads the request
    return app


def _browser_root(api: LitAPI) -> str | None:
    """Where a browser opening ``/`` goes, if the API's spec has a page for it."""
    page = getattr(api.spec, "browser_page", None)
    return page if isinstance(page, str) else None


# The body of a plain route whose decode_request is not annotated with a pydantic model (which the
# worker would validate with, answering 422): any JSON value, handed to decode_request as parsed.
FREE_FORM_BODY: dict[str, Any] = {
    "description": "Any JSON value: decode_request receives it as parsed (not annotated with a model)"
}


def _error_statuses(config: FrontConfig, has_body: bool) -> list[int]:
    """The error statuses a spec route may answer under ``config``."""
    statuses = [400, 404, 431, 499, 503, 504]
    if config.api_key:
        statuses.append(401)
    if has_body and config.max_payload_size is not None:
        statuses.append(413)
    return sorted(statuses)


def _add_shutdown_route(app: FastAPI, config: FrontConfig, on_shutdown: Callable[[], None]) -> None:
    assert config.shutdown_api_key is not None
    key_check = ShutdownKeyCheck(config.shutdown_api_key)

    @app.post(config.shutdown_path, dependencies=[Depends(key_check)], response_class=PlainTextResponse)
    async def shutdown() -> Response:
        on_shutdown()
        return PlainTextResponse("Server is initiating graceful shutdown.")


def _plain_endpoint(
    front: _APIFront, stream: bool, callbacks: CallbackRunner, api_key_check: APIKeyCheck | None
) -> Callable[..., Any]:
    async def predict(request: Request) -> Response:
        if api_key_check is not None:
            api_key_check(request)
        if callbacks:
            callbacks.trigger_event(EventTypes.ON_REQUEST, request=request)
        _check_content_type(request)
        body = await request.body()
        payload: Any = body
        if _is_form(request, body):
            payload = await read_form(request)
        if not stream:
            result = await front.call(payload, request)
            if callbacks:
                callbacks.trigger_event(EventTypes.ON_RESPONSE, request=request)
            return Response(result, media_type="application/json")
        chunks = front.stream(payload, request)
        # Fail before the first byte with a real status code when the worker rejects the request.
        try:
            first = await chunks.__anext__()
        except StopAsyncIteration:
            first = b""

        async def body_iterator() -> AsyncIterator[bytes]:
            try:
                if first:
                    yield first
                async for chunk in chunks:
                    yield chunk
            except ServerError as exc:
                logger.warning("stream failed after its first byte: %s", exc.detail)
                yield orjson.dumps({"error": exc.detail}) + b"\n"
            finally:
                await chunks.aclose()  # type: ignore[attr-defined]
                if callbacks:
                    callbacks.trigger_event(EventTypes.ON_RESPONSE, request=request)

        return StreamingResponse(body_iterator(), media_type="application/x-ndjson")

    return predict


def _openapi_endpoint(app: FastAPI, specs: Sequence[LitSpec]) -> Callable[[Request], Any]:
    async def openapi(request: Request) -> Response:
        document = app.openapi()
        for spec in specs:
            document = await spec.openapi_document(document)
        return Response(orjson.dumps(document), media_type="application/json")

    return openapi
