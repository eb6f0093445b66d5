"""Parsers of model output: tool calls and reasoning text."""

from servekit.llm.parsers.reasoning import (
    ReasoningParser,
    StreamingReasoningParser,
    ThinkReasoningParser,
    get_reasoning_parser,
)
from servekit.llm.parsers.tool_calls import (
    TOOL_CALL_STYLE,
    HermesToolCallParser,
    Llama3JsonToolCallParser,
    ParsedToolCall,
    StreamingToolCallParser,
    ToolCallDelta,
    ToolCallParser,
    default_tool_call_parser,
    get_tool_call_parser,
)

__all__ = [
    "TOOL_CALL_STYLE",
    "HermesToolCallParser",
    "Llama3JsonToolCallParser",
    "ParsedToolCall",
    "ReasoningParser",
    "StreamingReasoningParser",
    "StreamingToolCallParser",
    "ThinkReasoningParser",
    "ToolCallDelta",
    "ToolCallParser",
    "default_tool_call_parser",
    "get_reasoning_parser",
    "get_tool_call_parser",
]
