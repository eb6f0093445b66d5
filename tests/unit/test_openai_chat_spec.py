"""OpenAISpec's pieces without a server: request validation, output shapes, choice assembly, merging."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

import servekit as ls
from servekit.openai.errors import OpenAIError, field_path
from servekit.specs.openai import ChatCompletionRequest, ChatMessage, FunctionCall, OpenAISpec, ToolCall
from servekit.specs.openai_chat_stream import (
    ChoiceState,
    ChunkWriter,
    completion_body,
    merge_streams,
    usage_of,
)


def test_exported_where_litserve_users_look() -> None:
    assert ls.OpenAISpec is OpenAISpec
    assert ls.specs.OpenAISpec is OpenAISpec


def test_invalid_request_names_the_field() -> None:
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": [{"type": "video"}]}]})
    error = OpenAIError.from_validation_error(caught.value)
    assert error.status_code == 400
    assert error.param == "messages[0].content"
    body = error.body()["error"]
    assert body["type"] == "invalid_request_error" and "messages[0].content" in body["message"]
    assert field_path(("messages", 2, "tool_calls", 0, "function")) == "messages[2].tool_calls[0].function"


def test_request_keeps_unknown_fields_and_parses_content_parts() -> None:
    request = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    ],
                }
            ],
            "seed": 3,
            "some_vendor_field": {"x": 1},
        }
    )
    assert request.model_extra == {"some_vendor_field": {"x": 1}}
    decoded = OpenAISpec().decode_request(request)
    assert decoded is request  # LitServe 0.2.17: predict gets the ChatCompletionRequest itself
    assert decoded.messages[0].model_dump(mode="json", exclude_none=True) == {
        "role": "user",
        "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "auto"}},
        ],
    }
    context: dict[str, Any] = {}
    OpenAISpec().populate_context(context, request)
    assert context["seed"] == 3 and context["temperature"] == 0.7 and "messages" not in context


@pytest.mark.parametrize(
    ("output", "content"),
    [
        ("Canberra", "Canberra"),
        ({"content": "c"}, "c"),
        ([{"content": "c"}], "c"),
        ({"role": "assistant", "content": "c"}, "c"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "c"}], "c"),
        (ChatMessage(role="assistant", content="c"), "c"),
        (None, None),
    ],
)
def test_every_predict_output_shape(output: Any, content: str | None) -> None:
    spec = OpenAISpec()
    if not isinstance(output, list):  # a returned list is a list of messages (below)
        assert list(spec.encode_response(output)) == [{"role": "assistant", "content": content}]

    def generator() -> Iterator[Any]:
        yield output
        yield output

    assert [m["content"] for m in spec.encode_response(generator())] == [content, content]


def test_a_list_is_one_message_per_item_as_in_litserve() -> None:
    words = ["This", "is", "a", "LLM", "generated", "text"]
    assert [m["content"] for m in OpenAISpec().encode_response(words)] == words
    assert [m["content"] for m in OpenAISpec().encode_response(("a", {"content": "b"}))] == ["a", "b"]


def test_malformed_output_is_an_error() -> None:
    with pytest.raises(ValueError, match="Malformed output"):
        list(OpenAISpec().encode_response(42))
    with pytest.raises(ValueError, match="Malformed output"):
        list(OpenAISpec().encode_response({"text": "no content key"}))


def test_choice_state_assembles_content_tool_calls_and_usage() -> None:
    state = ChoiceState(0)
    assert state.add({"role": "assistant", "content": "Hel"}) == {"content": "Hel"}
    assert state.add({"content": "lo", "prompt_tokens": 4, "completion_tokens": 1}) == {"content": "lo"}
    assert state.add({"content": "", "completion_tokens": 1}) == {}
    assert state.message() == {"role": "assistant", "content": "Hello"}
    assert state.finish_reason == "stop"
    call = ToolCall(id="call_x", function=FunctionCall(name="f", arguments="{}")).model_dump(mode="json")
    delta = state.add({"content": None, "tool_calls": [call, {"function": {"name": "g"}}]})
    assert [c["index"] for c in delta["tool_calls"]] == [0, 1]
    assert delta["tool_calls"][0]["id"] == "call_x" and delta["tool_calls"][1]["id"].startswith("call_")
    assert state.finish_reason == "tool_calls"
    other = ChoiceState(1)
    other.add({"content": "x", "prompt_tokens": 4, "completion_tokens": 3, "finish_reason": "length"})
    assert other.finish_reason == "length"
    assert usage_of([state, other]) == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
    body = orjson.loads(completion_body("m", [state, other]))
    assert body["object"] == "chat.completion"
    assert [c["finish_reason"] for c in body["choices"]] == ["tool_calls", "length"]
    assert body["choices"][0]["message"]["tool_calls"][1]["function"] == {"name": "g", "arguments": ""}


def test_tool_call_only_message_has_null_content() -> None:
    state = ChoiceState(0)
    state.add({"content": None, "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}]})
    assert state.message()["content"] is None


def test_chunk_writer_frames_server_sent_events() -> None:
    writer = ChunkWriter("m", include_usage=True)
    event = writer.delta(0, {"content": "hi"})
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    chunk = orjson.loads(event[len(b"data: ") :])
    assert chunk["object"] == "chat.completion.chunk" and chunk["usage"] is None
    assert chunk["choices"] == [
        {"index": 0, "delta": {"content": "hi"}, "logprobs": None, "finish_reason": None}
    ]
    no_usage = orjson.loads(ChunkWriter("m", include_usage=False).delta(0, {})[len(b"data: ") :])
    assert "usage" not in no_usage


async def _source(
    items: list[bytes], closed: list[int], index: int, fail: bool = False
) -> AsyncIterator[bytes]:
    try:
        for item in items:
            await asyncio.sleep(0)
            yield item
        if fail:
            raise RuntimeError(f"source {index} failed")
    finally:
        closed.append(index)


def test_merge_streams_interleaves_and_closes_every_source() -> None:
    async def run() -> tuple[list[tuple[int, bytes]], list[int]]:
        closed: list[int] = []
        merged = merge_streams([_source([b"a", b"b"], closed, 0), _source([b"c"], closed, 1)])
        return [item async for item in merged], closed

    items, closed = asyncio.run(run())
    assert sorted(items) == [(0, b"a"), (0, b"b"), (1, b"c")]
    assert [b for i, b in items if i == 0] == [b"a", b"b"]
    assert sorted(closed) == [0, 1]


def test_merge_streams_propagates_a_failure_and_cancels_the_others() -> None:
    async def run() -> list[int]:
        closed: list[int] = []
        endless = _source([b"x"] * 10_000, closed, 1)
        merged = merge_streams([_source([b"a"], closed, 0, fail=True), endless])
        with pytest.raises(RuntimeError, match="source 0 failed"):
            async for _ in merged:
                pass
        return closed

    assert sorted(asyncio.run(run())) == [0, 1]


def test_pre_setup_registers_routes_and_checks_encode_response() -> None:
    class Good(ls.LitAPI):
        def predict(self, messages: Any) -> Any:
            yield "x"

    class ReturnsInsteadOfYielding(ls.LitAPI):
        def predict(self, messages: Any) -> Any:
            return "x"

        def encode_response(self, output: Any) -> Any:
            return ChatMessage(role="assistant", content=output)

    spec = OpenAISpec()
    api = Good(spec=spec)
    assert api.stream is True
    spec.pre_setup(api)
    spec.pre_setup(api)  # idempotent
    assert sorted((e.path, tuple(e.methods)) for e in spec.endpoints) == [
        ("/v1/chat/completions", ("POST",)),
        ("/v1/models", ("GET",)),
        ("/v1/models/{model_id:path}", ("GET",)),
    ]
    assert spec.model_name == "Good"
    with pytest.raises(ValueError, match="must be a generator"):
        bad = ReturnsInsteadOfYielding(spec=OpenAISpec())
        assert bad.spec is not None
        bad.spec.pre_setup(bad)


def test_custom_api_path_replaces_the_default() -> None:
    class Chat(ls.LitAPI):
        def predict(self, messages: Any) -> Any:
            yield "x"

    spec = OpenAISpec()
    api = Chat(api_path="/chat", spec=spec)
    with pytest.warns(UserWarning, match="Custom API path detected"):
        spec.pre_setup(api)
    assert "/chat" in [e.path for e in spec.endpoints]
    assert api.api_path == "/chat"
