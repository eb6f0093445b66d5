"""The one OpenAI protocol of servekit: request/response/chunk models, the error envelope and the
mapping of exceptions to it, server-sent events framing, ids.

``OpenAISpec``, ``OpenAIEmbeddingSpec``, ``OpenAIImageSpec`` and ``servekit serve`` all use it.
"""

from __future__ import annotations

from servekit.openai.chat import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamingChoice,
)
from servekit.openai.completions import CompletionRequest
from servekit.openai.embeddings import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from servekit.openai.errors import OpenAIError, invalid, openai_error
from servekit.openai.images import ImageData, ImageGenerationRequest, ImageGenerationResponse
from servekit.openai.sampling import SamplingFields
from servekit.openai.sse import DONE, new_id, sse_event, sse_json
from servekit.openai.types import (
    AudioContent,
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

__all__ = [
    "DONE",
    "AudioContent",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatCompletionResponseChoice",
    "ChatCompletionStreamingChoice",
    "ChatMessage",
    "ChatMessageWithUsage",
    "ChoiceDelta",
    "CompletionRequest",
    "ContentPart",
    "Embedding",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "EmbeddingUsage",
    "Function",
    "FunctionCall",
    "ImageContent",
    "ImageContentURL",
    "ImageData",
    "ImageDetail",
    "ImageGenerationRequest",
    "ImageGenerationResponse",
    "InputAudio",
    "JSONSchema",
    "ModelCard",
    "ModelList",
    "OpenAIError",
    "ResponseFormat",
    "ResponseFormatJSONObject",
    "ResponseFormatJSONSchema",
    "ResponseFormatText",
    "SamplingFields",
    "StreamOptions",
    "TextContent",
    "Tool",
    "ToolCall",
    "ToolChoice",
    "ToolChoiceFunction",
    "UsageInfo",
    "invalid",
    "new_id",
    "openai_error",
    "sse_event",
    "sse_json",
]
