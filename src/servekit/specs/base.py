"""LitSpec: an API shape (routes in the front, request/response conversion in the workers)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from servekit.errors import ServerError

if TYPE_CHECKING:
    from starlette.requests import Request

    from servekit.api import LitAPI


T = TypeVar("T")


async def wait_for_disconnect(http_request: Request) -> None:
    """Return once the client has gone away (the request body must have been read already)."""
    receive = http_request.receive
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnected(awaitable: Awaitable[T], http_request: Request) -> T:
    """Await ``awaitable``; if the client goes away first, cancel it and raise a 499 ``ServerError``."""
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(wait_for_disconnect(http_request))
    try:
        await asyncio.wait((work, watcher), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        raise
    finally:
        watcher.cancel()
    if not work.done():
        work.cancel()  # closing a front stream cancels the request in the worker
        with contextlib.suppress(asyncio.CancelledError, ServerError):
            await work
        raise ServerError(499, "Client disconnected")
    return work.result()


@dataclass
class SpecEndpoint:
    path: str
    endpoint: Callable[..., Any]
    methods: list[str]
    public: bool = False  # served without the API key (a page that asks for the key itself)


@dataclass(frozen=True)
class RouteDoc:
    """What ``/openapi.json`` says of a spec route whose handler reads the request itself: the
    pydantic model it validates the body with, and the media types of its successful answers."""

    body: type[BaseModel] | None = None
    media_types: tuple[str, ...] = ("application/json",)


_ROUTE_DOC = "__servekit_route_doc__"
EndpointT = TypeVar("EndpointT", bound=Callable[..., Any])


def documented(
    body: type[BaseModel] | None = None, media_types: tuple[str, ...] = ("application/json",)
) -> Callable[[EndpointT], EndpointT]:
    """Decorate a spec handler with what its route accepts and answers (see ``RouteDoc``)."""

    def mark(endpoint: EndpointT) -> EndpointT:
        setattr(endpoint, _ROUTE_DOC, RouteDoc(body, media_types))
        return endpoint

    return mark


def route_doc(endpoint: Callable[..., Any]) -> RouteDoc:
    found = getattr(endpoint, _ROUTE_DOC, None)
    return found if isinstance(found, RouteDoc) else RouteDoc()


@dataclass
class WorkerAnswer:
    """One worker's answer to a request sent to every worker (``FrontHandle.gather``)."""

    worker: int
    body: bytes | None  # the JSON of its (first) item; None when it failed
    error: ServerError | None = None


class FrontHandle:
    """What a spec's endpoints use to reach the workers of their API (bound in each front).

    ``worker`` sends to one worker; ``affinity`` pins every request with the same key to one worker
    (while it lives); ``tags`` name a streamed request so that ``owner`` finds its worker.
    """

    streams: bool = False  # whether the API's workers answer every request as a stream

    async def call(
        self,
        request_object: Any,
        http_request: Request | None = None,
        *,
        worker: int | None = None,
        affinity: str | None = None,
    ) -> bytes:
        """Send one request object to a worker; return the JSON of its encoded response."""
        raise NotImplementedError

    def stream(
        self,
        request_object: Any,
        http_request: Request | None = None,
        *,
        worker: int | None = None,
        affinity: str | None = None,
        tags: Sequence[str] = (),
    ) -> AsyncIterator[bytes]:
        """Send one request object to a worker; yield the JSON of each encoded item it streams."""
        raise NotImplementedError

    def workers(self) -> list[int]:
        """The workers that can take a request now."""
        raise NotImplementedError

    def owner(self, tag: str) -> int | None:
        """The worker running the streamed request tagged ``tag``, if this front sent it."""
        raise NotImplementedError

    def release_affinity(self, key: str) -> None:
        """Forget the worker ``key`` is pinned to (its session ended)."""
        raise NotImplementedError

    async def first_item(
        self,
        request_object: Any,
        http_request: Request | None = None,
        *,
        worker: int | None = None,
        tags: Sequence[str] = (),
    ) -> bytes:
        """The whole response, or a stream's first item."""
        if not self.streams:
            return await self.call(request_object, http_request, worker=worker)
        chunks = self.stream(request_object, http_request, worker=worker, tags=tags)
        try:
            return await anext(chunks)
        except StopAsyncIteration:
            raise ServerError(500, "the worker returned nothing") from None
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    async def gather(self, request_object: Any) -> list[WorkerAnswer]:
        """Send the request to every worker at once; each one's answer, in worker order."""

        async def ask(worker: int) -> WorkerAnswer:
            try:
                return WorkerAnswer(worker, await self.first_item(request_object, worker=worker))
            except ServerError as error:
                return WorkerAnswer(worker, None, error)

        return list(await asyncio.gather(*(ask(worker) for worker in self.workers())))


class LitSpec:
    """Subclass to give an API another shape, as ``OpenAISpec`` does.

    Front side: ``add_endpoint`` registers routes whose handlers use ``self.front``.
    Worker side: ``populate_context``, ``decode_request`` and ``encode_response`` run in the workers.
    """

    api_path: str | None = None
    stream: bool = False

    def __init__(self) -> None:
        self._endpoints: list[SpecEndpoint] = []
        self._front: FrontHandle | None = None

    def add_endpoint(
        self, path: str, endpoint: Callable[..., Any], methods: list[str], public: bool = False
    ) -> None:
        self._endpoints.append(SpecEndpoint(path, endpoint, methods, public))

    @property
    def endpoints(self) -> list[SpecEndpoint]:
        return list(self._endpoints)

    @property
    def front(self) -> FrontHandle:
        if self._front is None:
            raise RuntimeError("this spec is not bound to a running server")
        return self._front

    def bind_front(self, front: FrontHandle) -> None:
        self._front = front

    async def openapi_document(self, document: dict[str, Any]) -> dict[str, Any]:
        """``/openapi.json`` as this spec's running API reads it (runs in the front, on each request
        of the document): e.g. the loaded model's bounds written into the request bodies."""
        return document

    async def metrics_text(self) -> str:
        """Prometheus text the spec adds to the server's ``/metrics`` (runs in the front)."""
        return ""

    def pre_setup(self, lit_api: LitAPI) -> None:
        """Check the user's API against the spec, before any worker starts."""

    def populate_context(self, context: dict[str, Any], request: Any) -> None:
        """Pre-fill the per-request context (runs in the worker, before ``decode_request``)."""

    def decode_request(self, request: Any, context_kwargs: dict[str, Any] | None = None) -> Any:
        return request

    def encode_response(self, output: Any, context_kwargs: dict[str, Any] | None = None) -> Any:
        return output

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_front"] = None  # the front's handle stays in the front process
        return state
