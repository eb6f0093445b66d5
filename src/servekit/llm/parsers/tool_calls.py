"""Tool calls in a model's output: found, cut out of the content, and returned as OpenAI tool calls.

Two syntaxes: Hermes / Qwen (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, any number
of calls) and Llama 3 JSON (the whole reply is ``{"name": ..., "parameters": {...}}``, optionally after
``<|python_tag|>``, several calls separated by ``;``). A call whose JSON does not parse stays in the
content as written. The streaming parsers emit a call when it is complete, so a streamed reply gives
exactly the calls and content of the same reply parsed whole.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Protocol

HERMES_START = "<tool_call>"
HERMES_END = "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass
class ParsedToolCall:
    id: str
    name: str
    arguments: str  # a JSON string, as OpenAI sends it


@dataclass
class ToolCallDelta:
    """A piece of the ``index``-th tool call of a streamed choice (OpenAI ``delta.tool_calls[i]``)."""

    index: int
    id: str | None
    name: str | None
    arguments_delta: str


StreamItem = ToolCallDelta | str


class StreamingToolCallParser(Protocol):
    def feed(self, delta: str) -> list[StreamItem]: ...

    def finish(self) -> list[StreamItem]: ...


class ToolCallParser(Protocol):
    def parse(self, text: str) -> tuple[str, list[ParsedToolCall]]: ...

    def streaming(self) -> StreamingToolCallParser: ...


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def call_from_json(text: str) -> ParsedToolCall | None:
    """A call from one JSON object ``{"name": ..., "arguments"|"parameters": ...}``, or None.

    The arguments keep the model's own spelling of the JSON (its substring of ``text``).
    """
    text = text.strip()
    decoder = json.JSONDecoder()
    try:
        value, end = decoder.raw_decode(text)
    except ValueError:
        return None
    if end != len(text) or not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    key = next((k for k in ARGUMENT_KEYS if k in value), None)
    if key is None:
        return ParsedToolCall(new_call_id(), value["name"], "{}")
    arguments = value[key]
    if isinstance(arguments, str):
        return ParsedToolCall(new_call_id(), value["name"], arguments)
    return ParsedToolCall(
        new_call_id(), value["name"], _raw_value(text, key, decoder) or json.dumps(arguments)
    )


def _raw_value(text: str, key: str, decoder: json.JSONDecoder) -> str | None:
    """The text of the top-level ``key``'s value in the JSON object ``text``."""
    for match in re.finditer(rf'"{key}"\s*:\s*', text):
        try:
            _, end = decoder.raw_decode(text, match.end())
        except ValueError:
            continue
        return text[match.end() : end]
    return None


def _holdback(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that could be the start of ``tag``."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


# -- Hermes / Qwen -------------------------------------------------------------------------------


class HermesToolCallParser:
    """``<tool_call>{...}</tool_call>`` blocks; the text around them is the content.

    Content rules (shared by ``parse`` and ``streaming``): whitespace right before a call and
    whitespace-only text after a call are dropped.
    """

    def parse(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        stream = self.streaming()
        items = stream.feed(text) + stream.finish()
        content = "".join(item for item in items if isinstance(item, str))
        calls = [
            ParsedToolCall(item.id or new_call_id(), item.name or "", item.arguments_delta)
            for item in items
            if isinstance(item, ToolCallDelta)
        ]
        return content, calls

    def streaming(self) -> HermesStreamingParser:
        return HermesStreamingParser()


class HermesStreamingParser:
    def __init__(self) -> None:
        self._buffer = ""
        self._in_call = False
        self._after_call = False  # content since the last call is whitespace so far
        self._calls = 0

    def feed(self, delta: str) -> list[StreamItem]:
        self._buffer += delta
        items: list[StreamItem] = []
        while True:
            if self._in_call:
                end = self._buffer.find(HERMES_END)
                if end < 0:
                    return items
                body = self._buffer[:end]
                self._buffer = self._buffer[end + len(HERMES_END) :]
                self._in_call = False
                items.extend(self._close_call(body, closed=True))
                continue
            start = self._buffer.find(HERMES_START)
            if start >= 0:
                self._emit_content(items, self._buffer[:start].rstrip())
                self._buffer = self._buffer[start + len(HERMES_START) :]
                self._in_call = True
                continue
            # Hold back what may start a tag, and trailing whitespace (dropped if a call follows).
            keep = _holdback(self._buffer, HERMES_START)
            head = self._buffer[: len(self._buffer) - keep]
            ready = head.rstrip()
            self._emit_content(items, ready)
            self._buffer = self._buffer[len(ready) :]
            return items

    def finish(self) -> list[StreamItem]:
        items: list[StreamItem] = []
        if self._in_call:
            # The model ended inside a call (e.g. without the closing tag).
            items.extend(self._close_call(self._buffer, closed=False))
        else:
            self._emit_content(items, self._buffer)
        self._buffer = ""
        self._in_call = False
        return items

    def _emit_content(self, items: list[StreamItem], text: str) -> None:
        if not text:
            return
        if self._after_call:
            if not text.strip():
                return
            self._after_call = False
        items.append(text)

    def _close_call(self, body: str, *, closed: bool) -> list[StreamItem]:
        call = call_from_json(body)
        if call is None:
            raw = HERMES_START + body + (HERMES_END if closed else "")
            self._after_call = False
            return [raw]
        index = self._calls
        self._calls += 1
        self._after_call = True
        return [ToolCallDelta(index, call.id, call.name, call.arguments)]


# -- Llama 3 JSON ---------------------------------------------------------------------------------


class Llama3JsonToolCallParser:
    """The whole reply is one or more JSON calls (``;``-separated), optionally after ``<|python_tag|>``."""

    def parse(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        body = text.strip()
        body = body.removeprefix(PYTHON_TAG).strip()
        if not body.startswith("{"):
            return text, []
        calls: list[ParsedToolCall] = []
        decoder = json.JSONDecoder()
        position = 0
        while position < len(body):
            try:
                _, end = decoder.raw_decode(body, position)
            except ValueError:
                return text, []
            call = call_from_json(body[position:end])
            if call is None:
                return text, []
            calls.append(call)
            position = end
            while position < len(body) and body[position] in " \t\r\n;":
                position += 1
        return "", calls

    def streaming(self) -> Llama3JsonStreamingParser:
        return Llama3JsonStreamingParser(self)


class Llama3JsonStreamingParser:
    """Content streams at once; a reply that starts like a call is held until the end and parsed whole."""

    def __init__(self, parser: Llama3JsonToolCallParser) -> None:
        self._parser = parser
        self._buffer = ""
        self._mode = "undecided"  # -> "content" or "call"

    def feed(self, delta: str) -> list[StreamItem]:
        self._buffer += delta
        if self._mode == "undecided":
            start = self._buffer.lstrip()
            if not start or (PYTHON_TAG.startswith(start) and start != PYTHON_TAG):
                return []
            self._mode = "call" if start.startswith(("{", PYTHON_TAG)) else "content"
        if self._mode == "content":
            text, self._buffer = self._buffer, ""
            return [text] if text else []
        return []

    def finish(self) -> list[StreamItem]:
        text, self._buffer = self._buffer, ""
        if self._mode == "content" or not text:
            return [text] if text else []
        content, calls = self._parser.parse(text)
        if not calls:
            return [content] if content else []
        return [ToolCallDelta(i, call.id, call.name, call.arguments) for i, call in enumerate(calls)]


# -- choosing a parser ----------------------------------------------------------------------------

_PARSERS: dict[str, type[HermesToolCallParser] | type[Llama3JsonToolCallParser]] = {
    "hermes": HermesToolCallParser,
    "qwen": HermesToolCallParser,
    "qwen2_5": HermesToolCallParser,
    "llama3_json": Llama3JsonToolCallParser,
    "llama3": Llama3JsonToolCallParser,
}

# The grammar style (``structured.tool_call_processor``) matching each parser.
TOOL_CALL_STYLE = {
    name: "hermes" if cls is HermesToolCallParser else "llama3" for name, cls in _PARSERS.items()
}


def get_tool_call_parser(name: str) -> ToolCallParser:
    parser = _PARSERS.get(name)
    if parser is None:
        raise ValueError(f"unknown tool-call parser {name!r}; known: {', '.join(sorted(_PARSERS))}")
    return parser()


def default_tool_call_parser(model_name: str, chat_template: str | None) -> str | None:
    """The parser for a model: from its chat template's tool syntax, else from its name."""
    template = chat_template or ""
    lowered = model_name.lower()
    if HERMES_START in template:
        return "hermes"
    if PYTHON_TAG in template or ('"parameters"' in template and "llama" in lowered):
        return "llama3_json"
    if any(family in lowered for family in ("qwen", "hermes")):
        return "hermes"
    if re.search(r"llama[-_]?3", lowered):
        return "llama3_json"
    return None
