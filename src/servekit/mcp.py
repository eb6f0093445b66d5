"""MCP: expose a LitAPI as a Model Context Protocol tool (``LitAPI(mcp=ls.mcp.MCP(...))``).

This module only describes the tools (name, description, input schema); the MCP endpoint itself
(``/mcp/``, streamable HTTP, served by the ``mcp`` package) lives in ``servekit.http.mcp`` and is
imported only when an API asks for it.
"""

from __future__ import annotations

import importlib.util
import inspect
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:
    from servekit.api import LitAPI

MCP_PATH = "/mcp/"


def _mcp_installed() -> bool:
    return importlib.util.find_spec("mcp") is not None


class MCP:
    """How a LitAPI appears as an MCP tool.

    ``name`` defaults to the API's path (``/predict`` becomes ``predict``; ``/`` becomes ``_``),
    ``description`` to the API class's docstring, ``input_schema`` to a JSON schema derived from
    ``decode_request``'s annotations (a pydantic model gives its full schema).
    """

    def __init__(
        self,
        description: str | None = None,
        input_schema: dict[str, Any] | None = None,
        name: str | None = None,
    ) -> None:
        if not _mcp_installed():
            raise RuntimeError(
                "the mcp package is required for MCP support: pip install 'servekit[mcp]' (or pip install mcp)"
            )
        self.name = _tool_name(name) if name else None
        self.description = description
        self.input_schema = input_schema


@dataclass(frozen=True)
class MCPTool:
    """One API as an MCP tool. A call's arguments become the API's request body: the value of
    ``request_argument`` when the schema was derived from ``decode_request`` (its arguments are
    keyed by the hook's parameter name), else the whole arguments object."""

    name: str
    description: str
    input_schema: dict[str, Any]
    api_index: int
    request_argument: str | None
    stream: bool


def _tool_name(name: str) -> str:
    return name.removeprefix("/").replace("/", "_")


def mcp_tools(apis: Sequence[LitAPI]) -> list[MCPTool]:
    """The MCP tools of the APIs that ask for one; raises ValueError for an API that cannot be one."""
    tools: list[MCPTool] = []
    for index, api in enumerate(apis):
        config = getattr(api, "mcp", None)
        if config is None:
            continue
        api_name = type(api).__name__
        if api.spec is not None:
            raise ValueError(f"{api_name}: MCP tools are for APIs without a spec ({type(api.spec).__name__})")
        name = config.name or _tool_name(api.api_path)
        description = config.description or type(api).__doc__
        if not name:
            raise ValueError(f"{api_name}: the MCP tool needs a name (MCP(name=...))")
        if not description:
            raise ValueError(
                f"{api_name}: the MCP tool needs a description: MCP(description=...) or a class docstring"
            )
        if name in {tool.name for tool in tools}:
            raise ValueError(f"{api_name}: another API already uses the MCP tool name {name!r}")
        if config.input_schema is not None:
            schema, argument = config.input_schema, None
        else:
            schema = extract_input_schema(type(api).decode_request)
            argument = _first_parameter(type(api).decode_request)
        tools.append(
            MCPTool(name, inspect.cleandoc(description).strip(), schema, index, argument, api.stream)
        )
    return tools


def _parameters(function: Callable[..., Any]) -> list[inspect.Parameter]:
    parameters = [
        p
        for p in inspect.signature(function).parameters.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    # Hooks are read off the class: skip ``self``; ``context`` is the server's, not the caller's.
    return [p for p in parameters if p.name not in ("self", "context")]


def _first_parameter(function: Callable[..., Any]) -> str | None:
    parameters = _parameters(function)
    return parameters[0].name if parameters else None


def _model_schema(model: type[BaseModel], defs: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema()
    defs.update(schema.pop("$defs", {}))
    defs[model.__name__] = schema
    return {"$ref": f"#/$defs/{model.__name__}"}


def extract_input_schema(function: Callable[..., Any] | type[BaseModel]) -> dict[str, Any]:
    """A tool input schema (a JSON-schema object) for a function's parameters, or for a pydantic
    model taken as the single parameter named after it, as LitServe derives it."""
    properties: dict[str, Any] = {}
    required: list[str] = []
    defs: dict[str, Any] = {}
    if isinstance(function, type) and issubclass(function, BaseModel):
        key = function.__name__.lower()
        properties[key] = _model_schema(function, defs)
        required.append(key)
    else:
        try:
            hints = typing.get_type_hints(function)
        except Exception:
            hints = {}
        for parameter in _parameters(function):
            annotation = hints.get(parameter.name, parameter.annotation)
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                properties[parameter.name] = _model_schema(annotation, defs)
            else:
                properties[parameter.name] = {
                    "title": parameter.name.replace("_", " ").title(),
                    **json_schema_type(annotation),
                }
            if parameter.default is inspect.Parameter.empty:
                required.append(parameter.name)
    schema: dict[str, Any] = {
        "properties": properties,
        "required": required,
        "title": f"{getattr(function, '__name__', 'Tool')}Arguments",
        "type": "object",
    }
    if defs:
        schema["$defs"] = defs
    return schema


_JSON_TYPES: dict[Any, str] = {
    int: "integer",
    float: "number",
    str: "string",
    bool: "boolean",
    list: "array",
    tuple: "array",
    dict: "object",
}


def json_schema_type(annotation: Any) -> dict[str, Any]:
    """The JSON-schema type of a Python annotation; anything unknown (or none) is a string."""
    if annotation in _JSON_TYPES:
        return {"type": _JSON_TYPES[annotation]}
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return {**json_schema_type(members[0]), "nullable": True}
    if origin in _JSON_TYPES:
        return {"type": _JSON_TYPES[origin]}
    return {"type": "string"}
