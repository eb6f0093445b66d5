"""Tool-call and reasoning parsers: whole texts, and the same texts streamed in every possible split."""

from __future__ import annotations

import json
from typing import Any

import pytest

from servekit.llm.parsers import (
    ParsedToolCall,
    ToolCallDelta,
    default_tool_call_parser,
    get_reasoning_parser,
    get_tool_call_parser,
)

CALL_A = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
CALL_B = '{"name": "add", "arguments": {"a": 1, "b": {"nested": [1, 2, "}"]}}}'

# (text, expected content, expected [(name, arguments as a value)])
HERMES_CASES: list[tuple[str, str, list[tuple[str, Any]]]] = [
    ("Just an answer.", "Just an answer.", []),
    ("", "", []),
    (f"<tool_call>\n{CALL_A}\n</tool_call>", "", [("get_weather", {"city": "Paris", "unit": "celsius"})]),
    (
        f"Let me check.\n<tool_call>\n{CALL_A}\n</tool_call>\n<tool_call>{CALL_B}</tool_call>\n",
        "Let me check.",
        [
            ("get_weather", {"city": "Paris", "unit": "celsius"}),
            ("add", {"a": 1, "b": {"nested": [1, 2, "}"]}}),
        ],
    ),
    # Malformed JSON stays in the content, as written; the good call around it is still a call.
    (
        f"<tool_call>{{not json}}</tool_call> then <tool_call>{CALL_A}</tool_call>",
        "<tool_call>{not json}</tool_call> then",
        [("get_weather", {"city": "Paris", "unit": "celsius"})],
    ),
    # The model stopped before the closing tag: a complete call is still a call ...
    (f"<tool_call>\n{CALL_A}", "", [("get_weather", {"city": "Paris", "unit": "celsius"})]),
    # ... an incomplete one is content.
    ('<tool_call>\n{"name": "get_we', '<tool_call>\n{"name": "get_we', []),
    # Text that only looks like the start of a tag, and a lone "<".
    ("a < b and <tool_ is not a tag", "a < b and <tool_ is not a tag", []),
    ("ends with <tool_c", "ends with <tool_c", []),
    # Arguments given as a JSON string are passed on as they are.
    (
        '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>',
        "",
        [("f", {"x": 1})],
    ),
    # Content after the calls is kept.
    (
        f"<tool_call>{CALL_A}</tool_call>\nDone!",
        "\nDone!",
        [("get_weather", {"city": "Paris", "unit": "celsius"})],
    ),
]

LLAMA3_CASES: list[tuple[str, str, list[tuple[str, Any]]]] = [
    ("The answer is 4.", "The answer is 4.", []),
    ('{"name": "add", "parameters": {"a": 1, "b": 2}}', "", [("add", {"a": 1, "b": 2})]),
    ('<|python_tag|>{"name": "add", "parameters": {"a": 1}}', "", [("add", {"a": 1})]),
    (
        '{"name": "add", "parameters": {"a": 1}}; {"name": "get_weather", "parameters": {"city": "Oslo"}}',
        "",
        [("add", {"a": 1}), ("get_weather", {"city": "Oslo"})],
    ),
    ('{"name": "add", "parameters": {"a": 1}', '{"name": "add", "parameters": {"a": 1}', []),
    ('{"not_a_call": true}', '{"not_a_call": true}', []),
    ("  \n", "  \n", []),
]


def summary(content: str, calls: list[ParsedToolCall]) -> tuple[str, list[tuple[str, Any]]]:
    return content, [(call.name, json.loads(call.arguments)) for call in calls]


def stream(parser_name: str, pieces: list[str]) -> tuple[str, list[ParsedToolCall]]:
    """Feed ``pieces`` to a fresh streaming parser and join its output like an OpenAI client does."""
    streaming = get_tool_call_parser(parser_name).streaming()
    items = [item for piece in pieces for item in streaming.feed(piece)] + streaming.finish()
    content = "".join(item for item in items if isinstance(item, str))
    calls: dict[int, ParsedToolCall] = {}
    for item in items:
        if isinstance(item, ToolCallDelta):
            if item.index not in calls:
                assert item.id and item.name, "the first delta of a call carries its id and name"
                calls[item.index] = ParsedToolCall(item.id, item.name, "")
            calls[item.index].arguments += item.arguments_delta
    assert list(calls) == list(range(len(calls)))
    return content, list(calls.values())


def splits(text: str) -> list[list[str]]:
    """The text whole, in single characters, and cut in two at every position."""
    return [[text], list(text)] + [[text[:i], text[i:]] for i in range(1, len(text))]


@pytest.mark.parametrize(("text", "content", "calls"), HERMES_CASES)
def test_hermes_parse(text: str, content: str, calls: list[tuple[str, Any]]) -> None:
    parsed_content, parsed_calls = get_tool_call_parser("hermes").parse(text)
    assert summary(parsed_content, parsed_calls) == (content, calls)
    assert all(call.id.startswith("call_") for call in parsed_calls)
    assert len({call.id for call in parsed_calls}) == len(parsed_calls)


@pytest.mark.parametrize(("text", "content", "calls"), HERMES_CASES)
def test_hermes_streaming_equals_parse_for_every_split(text: str, content: str, calls: list[Any]) -> None:
    for pieces in splits(text):
        assert summary(*stream("hermes", pieces)) == (content, calls), pieces


@pytest.mark.parametrize(("text", "content", "calls"), LLAMA3_CASES)
def test_llama3_json_parse_and_stream(text: str, content: str, calls: list[tuple[str, Any]]) -> None:
    assert summary(*get_tool_call_parser("llama3_json").parse(text)) == (content, calls)
    for pieces in splits(text):
        assert summary(*stream("llama3_json", pieces)) == (content, calls), pieces


def test_streamed_content_arrives_before_the_reply_ends() -> None:
    streaming = get_tool_call_parser("hermes").streaming()
    assert streaming.feed("Hello ") == ["Hello"]  # the trailing space waits: a call may follow
    assert streaming.feed("world <tool") == [" world"]
    assert streaming.feed("_call>") == []
    out = streaming.feed(CALL_A + "</tool_call>")
    assert len(out) == 1 and isinstance(out[0], ToolCallDelta) and out[0].name == "get_weather"
    assert streaming.finish() == []
    llama = get_tool_call_parser("llama3_json").streaming()
    assert llama.feed("Sure") == ["Sure"]


def test_arguments_keep_the_models_json_text() -> None:
    _, calls = get_tool_call_parser("hermes").parse(
        '<tool_call>{"name": "f", "arguments": {"x":  1}}</tool_call>'
    )
    assert calls[0].arguments == '{"x":  1}'


def test_unknown_parsers_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        get_tool_call_parser("nope")
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        get_reasoning_parser("nope")


@pytest.mark.parametrize(
    ("model", "template", "expected"),
    [
        ("Qwen/Qwen2.5-7B-Instruct", None, "hermes"),
        ("anything", "{{ '<tool_call>' }}", "hermes"),
        ("meta-llama/Llama-3.1-8B-Instruct", None, "llama3_json"),
        ("my-model", "{{ '<|python_tag|>' }}", "llama3_json"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "{{ messages }}", None),
    ],
)
def test_default_tool_call_parser(model: str, template: str | None, expected: str | None) -> None:
    assert default_tool_call_parser(model, template) == expected


# -- reasoning ------------------------------------------------------------------------------------

REASONING_CASES: list[tuple[str, str, str | None, str]] = [
    ("think", "<think>2+2 is 4.</think>The answer is 4.", "2+2 is 4.", "The answer is 4."),
    ("think", "\n<think>\nhmm\n</think>\n\nYes.", "\nhmm\n", "\n\nYes."),
    ("think", "No reasoning here.", None, "No reasoning here."),
    ("think", "<think>still thinking", "still thinking", ""),
    ("think", "<thin", None, "<thin"),
    ("think", "", None, ""),
    ("qwen3", "<think></think>Hi", "", "Hi"),
    ("think", "a </think> b", None, "a </think> b"),
    ("deepseek_r1", "First, add.</think>4", "First, add.", "4"),
    ("deepseek_r1", "<think>x</think>y", "x", "y"),
    ("deepseek_r1", "never closed", "never closed", ""),
]


@pytest.mark.parametrize(("name", "text", "reasoning", "content"), REASONING_CASES)
def test_reasoning_parse_and_stream(name: str, text: str, reasoning: str | None, content: str) -> None:
    parser = get_reasoning_parser(name)
    assert parser.parse(text) == (reasoning, content)
    for pieces in splits(text):
        streaming = parser.streaming()
        out = [item for piece in pieces for item in streaming.feed(piece)] + streaming.finish()
        assert all(text for _, text in out)
        joined_reasoning = "".join(t for channel, t in out if channel == "reasoning")
        joined_content = "".join(t for channel, t in out if channel == "content")
        assert joined_reasoning == (reasoning or "") and joined_content == content, pieces


def test_reasoning_streams_as_it_arrives() -> None:
    streaming = get_reasoning_parser("think").streaming()
    assert streaming.feed("<thi") == []
    assert streaming.feed("nk>Let me see</th") == [("reasoning", "Let me see")]
    assert streaming.feed("ink>Four") == [("content", "Four")]
