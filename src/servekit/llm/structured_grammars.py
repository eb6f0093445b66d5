"""The grammars of structured output: any JSON object, a JSON schema, a tool call in a model's syntax.

Each builder returns an ``xgrammar.Grammar`` and a key that identifies it (for the compiled-grammar
cache); invalid input raises ``StructuredOutputError`` naming the request parameter at fault.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import xgrammar

# Whitespace runs inside JSON are bounded: unbounded runs let a small model loop on newlines forever.
MAX_WHITESPACE_RUN = 16

TOOL_CALL_STYLES = ("hermes", "llama3")
# Parser names and model families that write their calls in one of the styles above.
TOOL_CALL_STYLE_ALIASES = {"hermes": "hermes", "qwen": "hermes", "llama3": "llama3", "llama3_json": "llama3"}


class StructuredOutputError(ValueError):
    """A structured-output request that cannot be honoured; ``param`` names the request field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class GrammarSpec:
    """A grammar to compile: ``key`` identifies it (cache key), ``build`` makes it (the slow part)."""

    key: str
    build: Callable[[], xgrammar.Grammar]


def json_object_grammar() -> GrammarSpec:
    """Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""
    return GrammarSpec(
        "json_object", lambda: _schema_grammar({"type": "object"}, param="response_format", strict=False)
    )


def json_schema_grammar(schema: dict[str, Any]) -> GrammarSpec:
    """A JSON value valid against ``schema``; properties the schema does not name are not generated."""
    if not isinstance(schema, dict):
        raise StructuredOutputError("response_format.json_schema.schema must be an object", "response_format")
    text = _schema_text(schema, "response_format")
    return GrammarSpec(
        f"json_schema:{text}", lambda: _schema_grammar(schema, param="response_format", strict=True)
    )


def tool_call_grammar(tools: list[dict[str, Any]], *, tool_name: str | None, style: str) -> GrammarSpec:
    """One call of ``tool_name`` (or of any of ``tools`` when None) written in the model's ``style``:
    ``hermes``: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``;
    ``llama3``: ``{"name": ..., "parameters": {...}}``."""
    canonical = TOOL_CALL_STYLE_ALIASES.get(style)
    if canonical is None:
        raise StructuredOutputError(
            f"unknown tool-call style {style!r}; known: {', '.join(sorted(TOOL_CALL_STYLE_ALIASES))}",
            "tool_choice",
        )
    functions = _functions(tools)
    if tool_name is not None:
        if tool_name not in functions:
            raise StructuredOutputError(
                f"tool_choice names {tool_name!r}, which is not among the tools", "tool_choice"
            )
        functions = {tool_name: functions[tool_name]}
    arguments_key = "arguments" if canonical == "hermes" else "parameters"
    call_schemas = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, arguments_key: parameters},
            "required": ["name", arguments_key],
        }
        for name, parameters in functions.items()
    ]
    schema = call_schemas[0] if len(call_schemas) == 1 else {"anyOf": call_schemas}
    text = _schema_text(schema, "tools")

    def build() -> xgrammar.Grammar:
        call = _schema_grammar(schema, param="tools", strict=True)
        if canonical == "hermes":
            call = xgrammar.Grammar.concat(_literal("<tool_call>\n"), call, _literal("\n</tool_call>"))
        return call

    return GrammarSpec(f"tool_call:{canonical}:{text}", build)


def _functions(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Tool name -> its parameters schema, from OpenAI-shaped ``tools``."""
    if not isinstance(tools, list) or not tools:
        raise StructuredOutputError("tools must be a non-empty list when a tool call is required", "tools")
    functions: dict[str, dict[str, Any]] = {}
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise StructuredOutputError("each tool needs a function with a name", "tools")
        parameters = function.get("parameters") if isinstance(function, dict) else None
        if parameters is None:
            parameters = {"type": "object"}
        if not isinstance(parameters, dict):
            raise StructuredOutputError(f"the parameters of tool {name!r} must be a JSON schema", "tools")
        functions[name] = parameters
    return functions


def _schema_text(schema: dict[str, Any], param: str) -> str:
    try:
        return json.dumps(schema, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise StructuredOutputError(f"the JSON schema is not serialisable: {exc}", param) from exc


# xgrammar 0.2.8 writes the characters of a length-bounded string (minLength/maxLength) as
# [^"\\\r\n], which lets raw control characters into the string: JSON forbids them.
_LOOSE_STRING_CHAR = r"[^\"\\\r\n]"
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\\r\n]"


def _schema_grammar(schema: dict[str, Any], *, param: str, strict: bool) -> xgrammar.Grammar:
    try:
        grammar = xgrammar.Grammar.from_json_schema(
            json.dumps(schema),
            any_whitespace=True,
            strict_mode=strict,
            max_whitespace_cnt=MAX_WHITESPACE_RUN,
        )
    except Exception as exc:  # xgrammar raises RuntimeError/ValueError subclasses for bad schemas
        raise StructuredOutputError(f"invalid JSON schema: {exc}", param) from exc
    ebnf = str(grammar)
    if _LOOSE_STRING_CHAR in ebnf:
        grammar = xgrammar.Grammar.from_ebnf(ebnf.replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR))
    return grammar


def _literal(text: str) -> xgrammar.Grammar:
    return xgrammar.Grammar.from_ebnf(f"root ::= {json.dumps(text)}")
