"""LLMServerSpec: the HTTP routes of ``servekit serve`` (front side).

Handlers validate the JSON body with pydantic (400 in OpenAI's envelope, naming ``param``), wrap it
in an ``Op`` and send it to a worker through the core's transport. Checks that need the model
(context length, chat template, token ids) run in the worker, in the engine's input step, before
its first item, so a stream that cannot start still gets a real status code: handlers await the
first item before answering. Every error reaches the client through ``servekit.openai.errors``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from servekit.errors import ServerError
from servekit.openai.chat import ChatCompletionRequest
from servekit.openai.completions import CompletionRequest
from servekit.openai.embeddings import EmbeddingRequest
from servekit.openai.errors import OpenAIError, detail_message, invalid, parse_body
from servekit.openai.sse import DONE, new_id, sse_event
from servekit.specs.base import LitSpec, documented, until_disconnected
from servekit.specs.llm.config import ServeConfig
from servekit.specs.llm.metrics import merge_worker_stats, render_metrics
from servekit.specs.llm.ops import Op, OpKind
from servekit.specs.llm.playground import PLAYGROUND_PATH, playground_file, playground_page
from servekit.specs.llm.protocol import (
    AbortRequest,
    DetokenizeRequest,
    EncodeRequest,
    GenerateRequest,
    InteractiveRequest,
    TokenizeRequest,
)
from servekit.specs.llm.schemas import bound_document
from servekit.specs.llm.sessions import SessionStore

logger = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
STREAMED = ("application/json", "text/event-stream")  # as the body's "stream" asks
NDJSON = ("application/json", "application/x-ndjson")


def _ndjson(item: bytes) -> bytes:
    return item + b"\n"


class LLMServerSpec(LitSpec):
    stream = True  # every request runs as a stream in the worker; non-streaming routes take one item
    browser_page = PLAYGROUND_PATH  # where a browser opening / is sent

    def __init__(self, config: ServeConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else ServeConfig()
        self._model_info: dict[str, Any] | None = None
        self._openapi: tuple[dict[str, Any], dict[str, Any]] | None = None  # (generated, bounded)
        self._sessions = SessionStore()
        routes: list[tuple[str, Any, list[str]]] = [
            ("/v1/chat/completions", self.chat_completions, ["POST"]),
            ("/v1/completions", self.completions, ["POST"]),
            ("/v1/models", self.list_models, ["GET"]),
            ("/v1/models/{model_id:path}", self.get_model, ["GET"]),
            ("/v1/embeddings", self.embeddings, ["POST"]),
            ("/generate", self.generate, ["POST"]),
            ("/v1/chat/interactive", self.chat_interactive, ["POST"]),
            ("/abort_request", self.abort_request, ["POST"]),
            ("/flush_cache", self.flush_cache, ["POST", "GET"]),
            ("/tokenize", self.tokenize, ["POST"]),
            ("/detokenize", self.detokenize, ["POST"]),
            ("/v1/encode", self.encode, ["POST"]),
            ("/model_info", self.model_info, ["GET"]),
            ("/get_model_info", self.model_info, ["GET"]),
            ("/server_info", self.server_info, ["GET"]),
            ("/get_server_info", self.server_info, ["GET"]),
        ]
        for path, handler, methods in routes:
            self.add_endpoint(path, handler, methods)
        self.add_endpoint(PLAYGROUND_PATH, playground_page, ["GET"], public=True)
        self.add_endpoint(f"{PLAYGROUND_PATH}/{{name}}", playground_file, ["GET"], public=True)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_sessions"] = SessionStore()
        state["_model_info"] = None
        state["_openapi"] = None
        return state

    # ------------------------------------------------------------------------------- errors
    def error_response(self, exc: ServerError) -> Response:
        return OpenAIError.from_server_error(exc).response()

    async def openapi_document(self, document: dict[str, Any]) -> dict[str, Any]:
        if self._openapi is None or self._openapi[0] is not document:
            self._openapi = (document, bound_document(document, await self._info()))
        return self._openapi[1]

    # ------------------------------------------------------------------------------ helpers
    async def _parse(self, request: Request, model: type[BaseModel]) -> Any:
        return parse_body(await request.body() or b"{}", model)

    async def _info(self) -> dict[str, Any]:
        if self._model_info is None:
            self._model_info = await self._call(Op("model_info"))
        return self._model_info

    async def _check_model(self, name: str | None) -> None:
        if not name:
            return
        info = await self._info()
        if name != info["model_name"]:
            raise OpenAIError(404, f"The model `{name}` does not exist.", "model", "model_not_found")

    async def _call(self, op: Op, http_request: Request | None = None, *, worker: int | None = None) -> Any:
        """One-item operation: the decoded item the worker yields."""
        return orjson.loads(await self._first_item(op, http_request, worker=worker))

    async def _first_item(
        self, op: Op, http_request: Request | None, *, worker: int | None = None, tags: Sequence[str] = ()
    ) -> bytes:
        item = self.front.first_item(op, http_request, worker=worker, tags=tags)
        if http_request is None:
            return await item
        return await until_disconnected(item, http_request)

    async def _gather(self, op: Op) -> list[tuple[int, Any]]:
        """Ask every worker; (worker, decoded item) for each, in worker order. Any failure raises."""
        answers = await self.front.gather(op)
        for answer in answers:
            if answer.error is not None:
                raise answer.error
        return [(a.worker, orjson.loads(a.body or b"null")) for a in answers]

    async def _streaming(
        self,
        op: Op,
        http_request: Request,
        frame: Any,
        done_marker: bytes | None,
        media_type: str,
        tags: Sequence[str],
    ) -> Response:
        chunks = self.front.stream(op, http_request, tags=tags)
        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            first = None
        except BaseException:
            await chunks.aclose()  # type: ignore[attr-defined]
            raise

        async def body() -> AsyncIterator[bytes]:
            try:
                if first is not None:
                    yield frame(first)
                async for chunk in chunks:
                    yield frame(chunk)
            except ServerError as exc:
                logger.warning("stream failed after its first byte: %s", exc.detail)
                yield frame(bytes(self.error_response(exc).body))
            finally:
                await chunks.aclose()  # type: ignore[attr-defined]
            if done_marker is not None:
                yield done_marker

        return StreamingResponse(body(), media_type=media_type, headers=SSE_HEADERS)

    async def _run(
        self, kind: OpKind, body: Any, stream: bool, http_request: Request, tags: Sequence[str]
    ) -> Response:
        """Every generation request runs as a stream in a worker, tagged with its engine request ids
        so that ``/abort_request`` reaches the worker that runs it."""
        op = Op(kind, body)
        if stream:
            return await self._streaming(op, http_request, sse_event, DONE, "text/event-stream", tags)
        return Response(await self._first_item(op, http_request, tags=tags), media_type="application/json")

    # ------------------------------------------------------------------------------- OpenAI
    @documented(ChatCompletionRequest, STREAMED)
    async def chat_completions(self, request: Request) -> Response:
        body: ChatCompletionRequest = await self._parse(request, ChatCompletionRequest)
        await self._check_model(body.model)
        body.request_id = body.request_id or new_id("chatcmpl")
        return await self._run("chat", body, bool(body.stream), request, tags=[body.request_id])

    @documented(CompletionRequest, STREAMED)
    async def completions(self, request: Request) -> Response:
        body: CompletionRequest = await self._parse(request, CompletionRequest)
        await self._check_model(body.model)
        body.request_id = body.request_id or new_id("cmpl")
        return await self._run("completion", body, bool(body.stream), request, tags=[body.request_id])

    async def list_models(self, request: Request) -> Response:
        info = await self._info()
        return _json({"object": "list", "data": [model_card(info)]})

    async def get_model(self, request: Request) -> Response:
        model_id = request.path_params["model_id"]
        await self._check_model(model_id)
        return _json(model_card(await self._info()))

    @documented(EmbeddingRequest)
    async def embeddings(self, request: Request) -> Response:
        await self._parse(request, EmbeddingRequest)  # a malformed body is told so first
        info = await self._info()
        raise invalid(
            f"The model `{info['model_name']}` is a generation model, not an embedding model.",
            "model",
            code="model_not_supported",
        )

    # ------------------------------------------------------------------------------- native
    @documented(GenerateRequest, STREAMED)
    async def generate(self, request: Request) -> Response:
        body: GenerateRequest = await self._parse(request, GenerateRequest)
        rids = [body.rid] if isinstance(body.rid, str) else list(body.rid or [])
        return await self._run("generate", body, body.stream, request, tags=rids)

    @documented(InteractiveRequest, NDJSON)
    async def chat_interactive(self, request: Request) -> Response:
        body: InteractiveRequest = await self._parse(request, InteractiveRequest)
        store = self._sessions
        if body.cancel:
            request_id = store.running_request(body.session_id)
            aborted = request_id is not None and await self._abort(request_id)
            return _json({"session_id": body.session_id, "cancelled": aborted, "finish_reason": "abort"})
        if body.end or (not body.interactive_mode and not body.prompt and store.exists(body.session_id)):
            store.end(body.session_id)
            self.front.release_affinity(_session_key(body.session_id))
            return _json({"session_id": body.session_id, "ended": True, "text": "", "finish_reason": None})
        turn = store.begin(body)
        chat = turn.chat_request(body)
        # Every turn of a session runs on the worker that holds the KV cache of the earlier ones.
        affinity = _session_key(body.session_id) if turn.interactive else None
        chunks = self.front.stream(Op("chat", chat), request, affinity=affinity, tags=[turn.request_id])
        try:
            first = await until_disconnected(anext(chunks), request)
        except BaseException:
            store.abandon(turn)
            await chunks.aclose()  # type: ignore[attr-defined]
            raise
        if not body.stream:
            await chunks.aclose()  # type: ignore[attr-defined]
            return _json(store.complete(turn, orjson.loads(first)))
        return self._interactive_stream(turn, first, chunks)

    def _interactive_stream(self, turn: Any, first: bytes, chunks: AsyncIterator[bytes]) -> Response:
        store = self._sessions

        async def body() -> AsyncIterator[bytes]:
            completed = False
            try:
                for line in store.stream_items(turn, orjson.loads(first)):
                    yield _ndjson(orjson.dumps(line))
                async for raw in chunks:
                    for line in store.stream_items(turn, orjson.loads(raw)):
                        yield _ndjson(orjson.dumps(line))
                completed = True
            except ServerError as exc:
                yield _ndjson(bytes(self.error_response(exc).body))
            finally:
                await chunks.aclose()  # type: ignore[attr-defined]
                if completed:
                    store.finish_stream(turn)
                else:
                    store.abandon(turn)

        return StreamingResponse(body(), media_type="application/x-ndjson")

    async def _abort(self, request_id: str) -> bool:
        """Abort a running request by its engine id, at the worker that runs it. A request this
        front did not send (another front's) is looked for at every worker."""
        owner = self.front.owner(request_id)
        if owner is not None:
            return bool((await self._call(Op("abort", request_id), worker=owner))["aborted"])
        return any(item["aborted"] for _, item in await self._gather(Op("abort", request_id)))

    @documented(AbortRequest)
    async def abort_request(self, request: Request) -> Response:
        body: AbortRequest = await self._parse(request, AbortRequest)
        return _json({"aborted": await self._abort(body.rid)})

    async def flush_cache(self, request: Request) -> Response:
        """Empties every worker's prefix cache, and reports each."""
        answers = await self.front.gather(Op("flush_cache"))
        failed = [a for a in answers if a.error is not None]
        if failed:
            flushed = [str(a.worker) for a in answers if a.error is None]
            reasons = "; ".join(
                f"worker {a.worker}: {detail_message(a.error.detail)}" for a in failed if a.error
            )
            raise OpenAIError(
                400, f"{reasons} (flushed: {', '.join(flushed) or 'none'})", code="flush_failed"
            )
        workers = [{"worker": a.worker, **orjson.loads(a.body or b"{}")} for a in answers]
        return _json({"flushed": True, "workers": workers})

    @documented(TokenizeRequest)
    async def tokenize(self, request: Request) -> Response:
        body: TokenizeRequest = await self._parse(request, TokenizeRequest)
        await self._check_model(body.model)
        return _json(await self._call(Op("tokenize", body)))

    @documented(DetokenizeRequest)
    async def detokenize(self, request: Request) -> Response:
        body: DetokenizeRequest = await self._parse(request, DetokenizeRequest)
        await self._check_model(body.model)
        return _json(await self._call(Op("detokenize", body)))

    @documented(EncodeRequest)
    async def encode(self, request: Request) -> Response:
        body: EncodeRequest = await self._parse(request, EncodeRequest)
        return _json(await self._call(Op("encode", body)))

    async def model_info(self, request: Request) -> Response:
        return _json(await self._info())

    async def server_info(self, request: Request) -> Response:
        from servekit import __version__

        stats = merge_worker_stats(await self._gather(Op("stats")))
        return _json(
            {
                "version": __version__,
                "config": self.config.redacted(),
                "model": await self._info(),
                "engine": stats["engine"],
                "workers": stats["workers"],
                "sessions": self._sessions.count(),
            }
        )

    async def metrics_text(self) -> str:
        stats = merge_worker_stats(await self._gather(Op("stats")))
        info = await self._info()
        return render_metrics(stats, info["model_name"])


def model_card(info: dict[str, Any]) -> dict[str, Any]:
    """A model's entry in ``GET /v1/models``, from the worker's ``model_info``."""
    return {
        "id": info["model_name"],
        "object": "model",
        "created": info.get("created", 0),
        "owned_by": "servekit",
        "root": info.get("model_path") or info["model_name"],
        "parent": None,
        "max_model_len": info["max_model_len"],
    }


def _session_key(session_id: int) -> str:
    return f"interactive-session-{session_id}"


def _json(value: Any) -> Response:
    return Response(orjson.dumps(value), media_type="application/json")
