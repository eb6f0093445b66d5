"""Structured output, tool calls and reasoning for the chat route, on the ``llm`` parsers and grammars.

``servekit.llm.structured`` and ``servekit.llm.parsers`` are imported only when a request needs them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from servekit.llm.tokenizer import Tokenizer
from servekit.openai.chat import ChatCompletionRequest
from servekit.openai.errors import invalid
from servekit.openai.sampling import SamplingFields
from servekit.openai.types import ToolChoiceFunction

ProcessorFactory = Callable[[], Any]

# Tool-call syntax per parser name, for the grammar that enforces tool_choice required/named.
_GRAMMAR_STYLES = {"hermes": "hermes", "qwen": "hermes", "llama3_json": "llama3", "llama3": "llama3"}


def response_format_factory(tokenizer: Tokenizer, request: SamplingFields) -> ProcessorFactory | None:
    """A per-sequence grammar processor factory for ``response_format``/``guided_json``, or None."""
    fmt = request.response_format
    schema: dict[str, Any] | None = None
    kind: str | None = None
    if request.guided_json is not None:
        kind = "json_schema"
        guided = request.guided_json
        schema = json.loads(guided) if isinstance(guided, str) else guided
    elif fmt is not None and fmt.type != "text":
        kind = fmt.type
        if fmt.type == "json_schema":
            schema = fmt.json_schema.schema_
    if kind is None:
        return None
    from servekit.llm import structured

    try:
        if kind == "json_object":
            structured.json_object_processor(tokenizer)  # compile (and cache) now: errors are 400s
            return lambda: structured.json_object_processor(tokenizer)
        assert schema is not None
        structured.json_schema_processor(tokenizer, schema)
        return lambda: structured.json_schema_processor(tokenizer, schema)
    except ValueError as error:
        param = getattr(error, "param", None) or "response_format"
        raise invalid(f"invalid response_format: {error}", param) from None


def tool_choice_factory(
    tokenizer: Tokenizer, request: ChatCompletionRequest, parser_name: str | None
) -> ProcessorFactory | None:
    """For ``tool_choice`` "required" or named: a grammar that forces a valid call."""
    choice = request.tool_choice
    if choice is None or choice in ("auto", "none"):
        return None
    if not request.tools:
        raise invalid("tool_choice needs tools", "tool_choice")
    tools = [t.model_dump(exclude_none=True) for t in request.tools]
    tool_name: str | None = None
    if isinstance(choice, ToolChoiceFunction):
        tool_name = choice.function.name
        if tool_name not in {t.function.name for t in request.tools}:
            raise invalid(f"tool_choice names an unknown tool {tool_name!r}", "tool_choice")
    style = _GRAMMAR_STYLES.get(parser_name or "hermes", "hermes")
    from servekit.llm import structured

    try:
        structured.tool_call_processor(tokenizer, tools, tool_name=tool_name, style=style)
    except ValueError as error:
        raise invalid(f"invalid tool parameters schema: {error}", "tools") from None
    return lambda: structured.tool_call_processor(tokenizer, tools, tool_name=tool_name, style=style)


def pick_tool_parser_name(configured: str | None, model_name: str, chat_template: str | None) -> str | None:
    if configured:
        return configured
    try:
        from servekit.llm.parsers.tool_calls import default_tool_call_parser
    except ImportError:
        return "hermes"
    return default_tool_call_parser(model_name, chat_template) or "hermes"


def get_tool_parser(name: str) -> Any:
    from servekit.llm.parsers.tool_calls import get_tool_call_parser

    return get_tool_call_parser(name)


def get_reasoning(name: str) -> Any:
    from servekit.llm.parsers.reasoning import get_reasoning_parser

    return get_reasoning_parser(name)


def tool_call_dict(index: int, call: Any) -> dict[str, Any]:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
        **({"index": index} if index >= 0 else {}),
    }


@dataclass
class ChoiceStream:
    """Per-choice streaming state: reasoning split, then tool-call extraction."""

    reasoning: Any = None  # a streaming reasoning parser, or None
    tools: Any = None  # a streaming tool-call parser, or None
    saw_tool_call: bool = False
    sent_ids: set[int] = field(default_factory=set)

    def feed(self, text: str, final: bool) -> dict[str, Any]:
        """The delta fields (content, reasoning_content, tool_calls) for ``text`` (new output)."""
        reasoning_text = ""
        content_text = ""
        if self.reasoning is not None:
            parts = list(self.reasoning.feed(text)) if text else []
            if final:
                parts += list(self.reasoning.finish()) if hasattr(self.reasoning, "finish") else []
            for kind, piece in parts:
                if kind == "reasoning":
                    reasoning_text += piece
                else:
                    content_text += piece
        else:
            content_text = text
        calls: list[dict[str, Any]] = []
        if self.tools is not None:
            items = list(self.tools.feed(content_text)) if content_text else []
            if final:
                items += list(self.tools.finish())
            content_text = ""
            for item in items:
                if isinstance(item, str):
                    content_text += item
                    continue
                self.saw_tool_call = True
                calls.append(self._call_delta(item))
        delta: dict[str, Any] = {}
        if reasoning_text:
            delta["reasoning_content"] = reasoning_text
        if content_text:
            delta["content"] = content_text
        if calls:
            delta["tool_calls"] = calls
        return delta

    def _call_delta(self, item: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"index": item.index}
        function: dict[str, Any] = {}
        if item.id is not None:
            body["id"] = item.id
            body["type"] = "function"
        if item.name is not None:
            function["name"] = item.name
        function["arguments"] = item.arguments_delta or ""
        body["function"] = function
        return body
