"""OpenAI's chat completions: the request (with vLLM's extra fields), the response and its chunks."""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from servekit.llm.sampling_params import SamplingParams
from servekit.openai.errors import invalid
from servekit.openai.sampling import SamplingFields
from servekit.openai.sse import new_id
from servekit.openai.types import (
    ChatMessage,
    ChoiceDelta,
    Tool,
    ToolChoice,
    ToolChoiceFunction,
    UsageInfo,
)


class ChatCompletionRequest(SamplingFields):
    """The body of ``POST /v1/chat/completions``."""

    # top_logprobs (but 0) needs logprobs: true, as to_sampling_params checks.
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"properties": {"top_logprobs": {"enum": [None, 0]}}},
                {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
            ]
        }
    )

    prompt_param: ClassVar[str] = "messages"

    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(0.7, ge=0, le=2)
    # 0 is a valid value on the wire; the engine, which cannot generate 0 tokens, refuses it itself.
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | ToolChoiceFunction | None = ToolChoice.auto
    parallel_tool_calls: bool | None = None
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    metadata: dict[str, str] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # The pattern declares what the validator below checks (schema-valid means accepted).
    chat_template: str | None = Field(None, json_schema_extra={"pattern": r"\{\{|\{%"})
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, Any]] | None = None

    @field_validator("chat_template")
    @classmethod
    def _template_not_path(cls, value: str | None) -> str | None:
        """A client sends the template itself: a path would let it read the server's files."""
        if value is not None and "{{" not in value and "{%" not in value:
            raise ValueError("must be a jinja2 template (with {{ }} or {% %}), not a file path")
        return value

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != ToolChoice.none

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        """The tools as the chat template gets them (None when tools are off)."""
        if not self.uses_tools or not self.tools:
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools]

    def to_sampling_params(self) -> SamplingParams:
        logprobs: int | None = None
        if self.logprobs:
            logprobs = self.top_logprobs or 0
        elif self.top_logprobs:
            raise invalid("top_logprobs needs logprobs set to true", "top_logprobs")
        limit = self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens
        return self._sampling_params(limit, logprobs)

    def param_name(self, engine_param: str) -> str:
        if engine_param == "max_tokens" and self.max_completion_tokens is not None:
            return "max_completion_tokens"
        return super().param_name(engine_param)


FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


class ChatCompletionResponseChoice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: FinishReason | None = "stop"
    logprobs: dict[str, Any] | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo


class ChatCompletionStreamingChoice(BaseModel):
    index: int
    delta: ChoiceDelta
    finish_reason: FinishReason | None = None
    logprobs: dict[str, Any] | None = None


class ChatCompletionChunk(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatCompletionStreamingChoice]
    usage: UsageInfo | None = None
