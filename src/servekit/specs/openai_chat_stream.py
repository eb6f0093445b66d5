"""Front-side assembly of chat completions: the worker's encoded messages -> OpenAI responses and chunks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from servekit.openai.responses import chat_choice_delta, chat_chunk, chat_response
from servekit.openai.sse import new_call_id, new_id, now, sse_json

FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


def parse_message(raw: bytes) -> dict[str, Any]:
    """One item the worker sent (the JSON of what ``encode_response`` yielded) as a message dict."""
    item = orjson.loads(raw)
    if isinstance(item, dict):
        return item
    if item is None or isinstance(item, str):
        return {"role": "assistant", "content": item}
    raise ValueError(f"encode_response yielded {type(item).__name__}; expected a message or a string")


def text_of(content: Any) -> str | None:
    """Message content as text: a string, or the texts of a list of content parts joined."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return str(content)


@dataclass
class ChoiceState:
    """What one choice has produced so far: content, tool calls, finish reason, token counts."""

    index: int
    contents: list[str] = field(default_factory=list)
    saw_content: bool = False
    reasoning: list[str] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    reported_finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def add(self, message: dict[str, Any]) -> dict[str, Any]:
        """Record one message; return its delta (empty when it carried nothing to show)."""
        delta: dict[str, Any] = {}
        content = text_of(message.get("content"))
        if content is not None:
            self.saw_content = True
            if content:
                self.contents.append(content)
                delta["content"] = content
        reasoning = message.get("reasoning_content")
        if isinstance(reasoning, str) and reasoning:
            self.reasoning.append(reasoning)
            delta["reasoning_content"] = reasoning
        calls = message.get("tool_calls")
        if calls:
            new_calls = [self._tool_call(call, len(self.tool_calls) + i) for i, call in enumerate(calls)]
            self.tool_calls.extend(new_calls)
            delta["tool_calls"] = new_calls
        finish_reason = message.get("finish_reason")
        if finish_reason in FINISH_REASONS:
            self.reported_finish_reason = finish_reason
        for key in USAGE_KEYS:
            value = message.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(self, key, getattr(self, key) + value)
        return delta

    def _tool_call(self, call: dict[str, Any], position: int) -> dict[str, Any]:
        function = call.get("function") or {}
        index = call.get("index")
        return {
            "index": index if isinstance(index, int) else position,
            "id": call.get("id") or new_call_id(),
            "type": call.get("type") or "function",
            "function": {"name": function.get("name"), "arguments": function.get("arguments") or ""},
        }

    @property
    def finish_reason(self) -> str:
        if self.tool_calls:
            return "tool_calls"
        return self.reported_finish_reason or "stop"

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(self.contents) if self.saw_content or not self.tool_calls else None,
        }
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message


def usage_of(states: list[ChoiceState]) -> dict[str, int]:
    """Usage over all choices: the prompt is counted once, completions are summed."""
    prompt = max((s.prompt_tokens for s in states), default=0)
    completion = sum(s.completion_tokens for s in states)
    total = max(sum(s.total_tokens for s in states), prompt + completion)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}


class ChunkWriter:
    """Frames the server-sent events of one streamed chat completion."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.id = new_id("chatcmpl")
        self.created = now()
        self.model = model
        self.include_usage = include_usage

    def event(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
        return sse_json(chat_chunk(self.id, self.model, self.created, choices, self.include_usage, usage))

    def delta(self, index: int, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        return self.event([chat_choice_delta(index, delta, finish_reason)])


def completion_body(model: str, states: list[ChoiceState]) -> bytes:
    choices = [
        {"index": s.index, "message": s.message(), "logprobs": None, "finish_reason": s.finish_reason}
        for s in states
    ]
    return orjson.dumps(chat_response(new_id("chatcmpl"), model, now(), choices, usage_of(states)))


async def merge_streams(streams: list[AsyncIterator[bytes]]) -> AsyncGenerator[tuple[int, bytes], None]:
    """Items of several streams as they arrive, tagged with their stream's index.

    Closing the merged stream closes every source (which cancels their requests in the workers).
    """
    if len(streams) == 1:
        source = streams[0]
        try:
            async for raw in source:
                yield 0, raw
        finally:
            await source.aclose()  # type: ignore[attr-defined]
        return
    queue: asyncio.Queue[tuple[int, bytes | None, Exception | None]] = asyncio.Queue()

    async def pump(index: int, source: AsyncIterator[bytes]) -> None:
        try:
            async for raw in source:
                queue.put_nowait((index, raw, None))
            queue.put_nowait((index, None, None))
        except Exception as error:
            queue.put_nowait((index, None, error))

    tasks = [asyncio.create_task(pump(i, source)) for i, source in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item, error = await queue.get()
            if error is not None:
                raise error
            if item is None:
                running -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for source in streams:
            await source.aclose()  # type: ignore[attr-defined]
