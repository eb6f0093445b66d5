"""Pydantic models of OpenAI's chat completions API (requests, responses, stream chunks).

Re-exported by ``servekit.specs.openai``, where user code imports them from.
"""

from __future__ import annotations

import time
import uuid
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


def short_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int | None = 0
    total_tokens: int = 0

    def __add__(self, other: UsageInfo) -> UsageInfo:
        return UsageInfo(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=(self.completion_tokens or 0) + (other.completion_tokens or 0),
            total_tokens=self.total_tokens + other.total_tokens,
        )

    def __radd__(self, other: object) -> UsageInfo:
        if other == 0:  # sum() starts from 0
            return self
        if isinstance(other, UsageInfo):
            return other + self
        return NotImplemented


# ---------------------------------------------------------------- message content
class TextContent(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ImageDetail(StrEnum):
    auto = "auto"
    low = "low"
    high = "high"


class ImageContentURL(BaseModel):
    url: str
    detail: ImageDetail = ImageDetail.auto


class ImageContent(BaseModel):
    type: Literal["image_url"] = "image_url"
    image_url: str | ImageContentURL


class InputAudio(BaseModel):
    data: str  # base64
    format: Literal["wav", "mp3"]


class AudioContent(BaseModel):
    type: Literal["input_audio"] = "input_audio"
    input_audio: InputAudio


ContentPart = Annotated[TextContent | ImageContent | AudioContent, Field(discriminator="type")]


# ------------------------------------------------------------------------- tools
class Function(BaseModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: Function


class ToolChoice(StrEnum):
    auto = "auto"
    none = "none"
    required = "required"
    any = "any"


class ToolChoiceFunctionName(BaseModel):
    name: str


class ToolChoiceFunction(BaseModel):
    type: Literal["function"] = "function"
    function: ToolChoiceFunctionName


class FunctionCall(BaseModel):
    name: str | None = None
    arguments: str = ""


class ToolCall(BaseModel):
    # ``index`` is the call's position within its message; left unset, the spec numbers the calls.
    index: int | None = None
    id: str | None = None
    type: str = "function"
    function: FunctionCall


# ---------------------------------------------------------------------- messages
class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class ChatMessageWithUsage(ChatMessage):
    prompt_tokens: int | None = 0
    completion_tokens: int | None = 0
    total_tokens: int | None = 0


class ChoiceDelta(BaseModel):
    role: Literal["system", "user", "assistant", "tool"] | None = None
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


# ----------------------------------------------------------------------- request
class ResponseFormatText(BaseModel):
    type: Literal["text"]


class ResponseFormatJSONObject(BaseModel):
    type: Literal["json_object"]


class JSONSchema(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = False


class ResponseFormatJSONSchema(BaseModel):
    type: Literal["json_schema"]
    json_schema: JSONSchema


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema, Field(discriminator="type")
]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The body of ``POST /v1/chat/completions``. Fields this model does not name are kept as extras."""

    model_config = ConfigDict(extra="allow")

    model: str | None = ""
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(0.7, ge=0, le=2)
    top_p: float | None = Field(1.0, ge=0, le=1)
    n: int | None = Field(1, ge=1, le=128)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(0.0, ge=-2, le=2)
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    seed: int | None = None
    user: str | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | ToolChoiceFunction | None = ToolChoice.auto
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    metadata: dict[str, str] | None = None


# ---------------------------------------------------------------------- response
FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


class ChatCompletionResponseChoice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: FinishReason | None = "stop"
    logprobs: dict[str, Any] | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: short_id("chatcmpl"))
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
    id: str = Field(default_factory=lambda: short_id("chatcmpl"))
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatCompletionStreamingChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "servekit"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
