"""Reasoning text (``<think>...</think>``) separated from the reply, as DeepSeek-R1 and Qwen3 write it.

``parse`` returns ``(reasoning_content, content)``; ``reasoning_content`` is None when the reply has no
reasoning part. The streaming parser yields ``("reasoning" | "content", text)`` pieces whose joined
parts equal what ``parse`` returns for the whole text.
"""

from __future__ import annotations

from typing import Literal, Protocol

THINK_START = "<think>"
THINK_END = "</think>"

Channel = Literal["reasoning", "content"]


class StreamingReasoningParser(Protocol):
    def feed(self, delta: str) -> list[tuple[Channel, str]]: ...

    def finish(self) -> list[tuple[Channel, str]]: ...


class ReasoningParser(Protocol):
    def parse(self, text: str) -> tuple[str | None, str]: ...

    def streaming(self) -> StreamingReasoningParser: ...


class ThinkReasoningParser:
    """``implicit_start``: the chat template already opened ``<think>`` (DeepSeek-R1), so the reply is
    reasoning up to ``</think>`` even without an opening tag; otherwise (Qwen3) only a reply that
    opens with ``<think>`` has reasoning."""

    def __init__(self, *, implicit_start: bool) -> None:
        self.implicit_start = implicit_start

    def parse(self, text: str) -> tuple[str | None, str]:
        stream = self.streaming()
        pieces = stream.feed(text) + stream.finish()
        reasoning = [piece for channel, piece in pieces if channel == "reasoning"]
        content = "".join(piece for channel, piece in pieces if channel == "content")
        return ("".join(reasoning) if stream.saw_reasoning else None), content

    def streaming(self) -> ThinkStreamingParser:
        return ThinkStreamingParser(implicit_start=self.implicit_start)


class ThinkStreamingParser:
    def __init__(self, *, implicit_start: bool) -> None:
        self._implicit_start = implicit_start
        self._mode: Literal["start", "reasoning", "content"] = "start"
        self._buffer = ""
        self.saw_reasoning = False

    def feed(self, delta: str) -> list[tuple[Channel, str]]:
        self._buffer += delta
        pieces: list[tuple[Channel, str]] = []
        if self._mode == "start":
            opening = self._buffer.lstrip()
            if not opening or (THINK_START.startswith(opening) and opening != THINK_START):
                return pieces  # could still become "<think>"
            if opening.startswith(THINK_START):
                self._enter_reasoning(opening[len(THINK_START) :])
            elif self._implicit_start:
                self._enter_reasoning(self._buffer)
            else:
                self._mode = "content"
        if self._mode == "reasoning":
            end = self._buffer.find(THINK_END)
            if end >= 0:
                _append(pieces, "reasoning", self._buffer[:end])
                self._buffer = self._buffer[end + len(THINK_END) :]
                self._mode = "content"
            else:
                keep = _holdback(self._buffer, THINK_END)
                _append(pieces, "reasoning", self._buffer[: len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep :]
        if self._mode == "content":
            _append(pieces, "content", self._buffer)
            self._buffer = ""
        return pieces

    def finish(self) -> list[tuple[Channel, str]]:
        pieces: list[tuple[Channel, str]] = []
        if self._mode == "start" and self._implicit_start and self._buffer:
            self._enter_reasoning(self._buffer)
        channel: Channel = "reasoning" if self._mode == "reasoning" else "content"
        _append(pieces, channel, self._buffer)
        self._buffer = ""
        return pieces

    def _enter_reasoning(self, rest: str) -> None:
        self._mode = "reasoning"
        self._buffer = rest
        self.saw_reasoning = True


def _append(pieces: list[tuple[Channel, str]], channel: Channel, text: str) -> None:
    if text:
        pieces.append((channel, text))


def _holdback(text: str, tag: str) -> int:
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


_PARSERS = {"think": False, "qwen3": False, "deepseek_r1": True}


def get_reasoning_parser(name: str) -> ReasoningParser:
    """``think`` / ``qwen3``: reasoning only after an opening ``<think>``; ``deepseek_r1``: the reply
    starts inside the reasoning."""
    if name not in _PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}; known: {', '.join(sorted(_PARSERS))}")
    return ThinkReasoningParser(implicit_start=_PARSERS[name])
