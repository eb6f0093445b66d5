"""The pieces OpenAI's request and response bodies share: messages and their content parts, tools,
tool calls, response formats, stream options, usage, model cards."""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


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
    type: Literal["text"]  # required: it picks the part (a discriminator)
    text: str


class ImageDetail(StrEnum):
    auto = "auto"
    low = "low"
    high = "high"


class ImageContentURL(BaseModel):
    url: str
    detail: ImageDetail = ImageDetail.auto


class ImageContent(BaseModel):
    type: Literal["image_url"]
    image_url: str | ImageContentURL


class InputAudio(BaseModel):
    data: str  # base64
    format: Literal["wav", "mp3"]


class AudioContent(BaseModel):
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[TextContent | ImageContent | AudioContent, Field(discriminator="type")]


# ------------------------------------------------------------------------- tools
class Function(BaseModel):
    name: str = Field(min_length=1)
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

    role: str = Field(min_length=1)
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class ChatMessageWithUsage(ChatMessage):
    prompt_tokens: int | None = 0
    completion_tokens: int | None = 0
    total_tokens: int | None = 0


class ChoiceDelta(BaseModel):
    role: Literal["system", "user", "assistant", "tool"] | None = None
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


# --------------------------------------------------------------- response formats
class ResponseFormatText(BaseModel):
    type: Literal["text"]


class ResponseFormatJSONObject(BaseModel):
    type: Literal["json_object"]


class JSONSchema(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = False


class ResponseFormatJSONSchema(BaseModel):
    type: Literal["json_schema"]
    json_schema: JSONSchema


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema, Field(discriminator="type")
]


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


# ------------------------------------------------------------------------ models
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "servekit"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
