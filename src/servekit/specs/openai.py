"""OpenAISpec: serve a LitAPI as OpenAI's chat completions API (``POST /v1/chat/completions``).

``predict`` receives the messages (a list of dicts, content parts included) and returns or yields
any of: ``"text"``, ``{"content": ...}``, ``{"role": "assistant", "content": ...}``, or a list of
messages whose last one is the reply. A message may carry ``tool_calls``, a ``finish_reason``
and token counts (``prompt_tokens``, ``completion_tokens``), which fill ``usage``: counts are
summed over the items of a choice, and over choices the prompt is counted once.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from servekit.errors import INTERNAL_ERROR, ServerError
from servekit.openai import (
    DONE,
    AudioContent,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamingChoice,
    ChatMessage,
    ChatMessageWithUsage,
    ChoiceDelta,
    ContentPart,
    Function,
    FunctionCall,
    ImageContent,
    ImageContentURL,
    ImageDetail,
    InputAudio,
    JSONSchema,
    ModelCard,
    ModelList,
    OpenAIError,
    ResponseFormat,
    ResponseFormatJSONObject,
    ResponseFormatJSONSchema,
    ResponseFormatText,
    StreamOptions,
    TextContent,
    Tool,
    ToolCall,
    ToolChoice,
    ToolChoiceFunction,
    UsageInfo,
)
from servekit.specs.base import documented, until_disconnected
from servekit.specs.openai_base import OpenAIBaseSpec, read_json_body
from servekit.specs.openai_chat_stream import (
    ChoiceState,
    ChunkWriter,
    completion_body,
    merge_streams,
    parse_message,
    usage_of,
)

if TYPE_CHECKING:
    from servekit.api import LitAPI

logger = logging.getLogger(__name__)

_ENCODE_RESPONSE_MUST_YIELD = """\
{api}.encode_response must be a generator when the API uses OpenAISpec
(encode_response is not a generator; it is neither a generator nor an async generator): it receives predict's output and yields one message per chunk,
for example

    def encode_response(self, output):
        for text in output:
            yield ChatMessage(role="assistant", content=text)

or, with an async predict, an async generator:

    async def encode_response(self, output):
        async for text in output:
            yield ChatMessage(role="assistant", content=text)
"""


class OpenAISpec(OpenAIBaseSpec):
    """OpenAI chat completions (streamed or not, ``n`` choices, tools, usage) and ``GET /v1/models``."""

    default_api_path = "/v1/chat/completions"
    stream = True  # the workers stream messages; the front answers whole or as server-sent events

    def __init__(self, model_name: str | None = None) -> None:
        super().__init__()
        self.model_name = model_name

    # ------------------------------------------------------ main process
    def pre_setup(self, lit_api: LitAPI) -> None:
        super().pre_setup(lit_api)
        if self.model_name is None:
            self.model_name = type(lit_api).__name__
        from servekit.api import LitAPI

        encode = type(lit_api).encode_response
        yields = inspect.isgeneratorfunction(encode) or inspect.isasyncgenfunction(encode)
        if encode is not LitAPI.encode_response and not yields:
            raise ValueError(_ENCODE_RESPONSE_MUST_YIELD.format(api=type(lit_api).__name__))

    def routes(self) -> list[tuple[str, Callable[..., Any], list[str]]]:
        return [
            (self.api_path or self.default_api_path, self.chat_completion, ["POST"]),
            ("/v1/models", self.list_models, ["GET"]),
            ("/v1/models/{model_id:path}", self.retrieve_model, ["GET"]),
        ]

    # ----------------------------------------------------------- workers
    def populate_context(self, context: dict[str, Any], request: Any) -> None:
        if isinstance(request, BaseModel):
            context.update(request.model_dump(exclude={"messages"}))

    def decode_request(self, request: Any, context_kwargs: dict[str, Any] | None = None) -> Any:
        """The ``ChatCompletionRequest`` itself, as in LitServe: ``predict`` reads ``request.messages``
        (and any other field)."""
        return request

    def encode_response(
        self, output: Any, context_kwargs: dict[str, Any] | None = None
    ) -> Iterator[dict[str, Any]]:
        """One message per item of predict's output (a generator, a list or a tuple); a single string,
        dict, ``ChatMessage`` or ``None`` that predict returned is one message."""
        if isinstance(output, Iterator | list | tuple):
            for item in output:
                yield self.encode_message(item)
        else:
            yield self.encode_message(output)

    def encode_message(self, output: Any) -> dict[str, Any]:
        if isinstance(output, BaseModel):
            output = output.model_dump(mode="json", exclude_none=True)
        if output is None or isinstance(output, str):
            return {"role": "assistant", "content": output}
        if isinstance(output, list) and output:
            output = output[-1]  # a conversation: its last message is the reply
            if isinstance(output, BaseModel):
                output = output.model_dump(mode="json", exclude_none=True)
        if isinstance(output, dict) and ("content" in output or "tool_calls" in output):
            message = dict(output)
            message.setdefault("role", "assistant")
            calls = message.get("tool_calls")
            if calls:
                message["tool_calls"] = [
                    c.model_dump(mode="json") if isinstance(c, BaseModel) else c for c in calls
                ]
            return message
        raise ValueError(
            "Malformed output from LitAPI.predict: expected a string, {'content': ...}, "
            f"{{'role': ..., 'content': ...}} or a list of such messages, got {output!r}"
        )

    # ------------------------------------------------------------- front
    @documented(ChatCompletionRequest, ("application/json", "text/event-stream"))
    async def chat_completion(self, request: Request) -> Response:
        try:
            chat_request = await read_json_body(request, ChatCompletionRequest)
            n = chat_request.n or 1
            model = chat_request.model or self.model_name or ""
            one_choice = chat_request.model_copy(update={"n": 1})
            streams = [self.front.stream(one_choice, request) for _ in range(n)]
            if chat_request.stream:
                return await self._streaming_completion(request, streams, model, chat_request.include_usage)
            states = await until_disconnected(self._collect(streams), request)
            return Response(completion_body(model, states), media_type="application/json")
        except OpenAIError as error:
            return error.response()

    async def _collect(self, streams: list[AsyncIterator[bytes]]) -> list[ChoiceState]:
        states = [ChoiceState(i) for i in range(len(streams))]
        merged = merge_streams(streams)
        try:
            async for index, raw in merged:
                states[index].add(_decode_item(raw))
        except ServerError as error:
            raise OpenAIError.from_server_error(error) from None
        finally:
            await merged.aclose()
        return states

    async def _streaming_completion(
        self, request: Request, streams: list[AsyncIterator[bytes]], model: str, include_usage: bool
    ) -> Response:
        merged = merge_streams(streams)
        # Wait for the first item so that a request the worker rejects gets a real status code.
        try:
            first: tuple[int, bytes] | None = await until_disconnected(anext(merged), request)
        except StopAsyncIteration:
            first = None
        except ServerError as error:
            await merged.aclose()
            raise OpenAIError.from_server_error(error) from None
        except BaseException:
            await merged.aclose()
            raise
        writer = ChunkWriter(model, include_usage)
        events = _server_sent_events(writer, len(streams), first, merged)
        return StreamingResponse(events, media_type="text/event-stream")

    async def list_models(self, request: Request) -> Response:
        models = ModelList(data=[ModelCard(id=self.model_name or "")])
        return Response(models.model_dump_json(), media_type="application/json")

    async def retrieve_model(self, request: Request) -> Response:
        model_id = request.path_params.get("model_id", "")
        if model_id != self.model_name:
            return OpenAIError(
                404, f"The model {model_id!r} does not exist", param="model", code="model_not_found"
            ).response()
        return Response(ModelCard(id=model_id).model_dump_json(), media_type="application/json")


def _decode_item(raw: bytes) -> dict[str, Any]:
    try:
        return parse_message(raw)
    except (ValueError, orjson.JSONDecodeError) as error:
        raise OpenAIError(500, f"Malformed output from encode_response: {error}") from None


async def _server_sent_events(
    writer: ChunkWriter,
    n: int,
    first: tuple[int, bytes] | None,
    rest: AsyncGenerator[tuple[int, bytes], None],
) -> AsyncIterator[bytes]:
    """role chunks, content/tool-call deltas, finish chunks, the usage chunk, ``[DONE]``."""
    states = [ChoiceState(i) for i in range(n)]
    try:
        for i in range(n):
            yield writer.delta(i, {"role": "assistant", "content": ""})
        if first is not None:
            index, raw = first
            delta = states[index].add(_decode_item(raw))
            if delta:
                yield writer.delta(index, delta)
            async for index, raw in rest:
                delta = states[index].add(_decode_item(raw))
                if delta:
                    yield writer.delta(index, delta)
        for state in states:
            yield writer.delta(state.index, {}, state.finish_reason)
        if writer.include_usage:
            yield writer.event([], usage_of(states))
    except ServerError as error:
        logger.warning("chat completion stream failed after its first byte: %s", error.detail)
        yield OpenAIError.from_server_error(error).sse_event()
    except OpenAIError as error:
        logger.warning("chat completion stream failed after its first byte: %s", error.message)
        yield error.sse_event()
    except Exception:
        logger.exception("chat completion stream failed after its first byte")
        yield OpenAIError(500, INTERNAL_ERROR).sse_event()
    finally:
        await rest.aclose()
    yield DONE


__all__ = [
    "AudioContent",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatCompletionResponseChoice",
    "ChatCompletionStreamingChoice",
    "ChatMessage",
    "ChatMessageWithUsage",
    "ChoiceDelta",
    "ContentPart",
    "Function",
    "FunctionCall",
    "ImageContent",
    "ImageContentURL",
    "ImageDetail",
    "InputAudio",
    "JSONSchema",
    "ModelCard",
    "ModelList",
    "OpenAISpec",
    "ResponseFormat",
    "ResponseFormatJSONObject",
    "ResponseFormatJSONSchema",
    "ResponseFormatText",
    "StreamOptions",
    "TextContent",
    "Tool",
    "ToolCall",
    "ToolChoice",
    "ToolChoiceFunction",
    "UsageInfo",
]
