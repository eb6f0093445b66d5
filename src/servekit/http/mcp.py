"""The MCP endpoint of an HTTP front: ``/mcp/``, streamable HTTP (stateless, JSON responses).

``tools/list`` lists the APIs built with ``LitAPI(mcp=...)``; ``tools/call`` sends the call's
arguments to the API's workers as a request body, exactly as a POST to its route would, and
returns the API's response as text (and as structured content when it is a JSON object).
Imported only when an API asks for MCP: it imports the ``mcp`` package.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import mcp_types as types
import orjson
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from servekit.errors import ServerError
from servekit.mcp import MCPTool
from servekit.specs.base import FrontHandle

logger = logging.getLogger(__name__)


async def _call(front: FrontHandle, body: bytes, stream: bool) -> bytes:
    if not stream:
        return await front.call(body)
    return b"".join([chunk async for chunk in front.stream(body)])


def _result(body: bytes) -> types.CallToolResult:
    text = body.decode(errors="replace")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        value = None
    structured = value if isinstance(value, dict) else None
    return types.CallToolResult(content=[types.TextContent(text=text)], structured_content=structured)


def _error(detail: Any) -> types.CallToolResult:
    text = detail if isinstance(detail, str) else orjson.dumps(detail).decode()
    return types.CallToolResult(content=[types.TextContent(text=text)], is_error=True)


def build_mcp_server(tools: Sequence[MCPTool], fronts: Sequence[FrontHandle]) -> Server[Any]:
    """``fronts[i]`` sends requests to the workers of API ``i``."""
    by_name = {tool.name: tool for tool in tools}
    listed = [
        types.Tool(name=tool.name, description=tool.description, input_schema=tool.input_schema)
        for tool in tools
    ]

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=listed)

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        tool = by_name.get(params.name)
        if tool is None:
            return _error(f"unknown tool {params.name!r}; tools: {', '.join(sorted(by_name))}")
        arguments = dict(params.arguments or {})
        request = arguments.get(tool.request_argument, arguments) if tool.request_argument else arguments
        try:
            body = await _call(fronts[tool.api_index], orjson.dumps(request), tool.stream)
        except ServerError as error:
            return _error(error.detail)
        return _result(body)

    return Server("servekit", on_list_tools=list_tools, on_call_tool=call_tool)


class MCPEndpoint:
    """The ASGI app mounted at ``/mcp/``; ``lifespan()`` must be entered while the front serves."""

    def __init__(
        self,
        tools: Sequence[MCPTool],
        fronts: Sequence[FrontHandle],
        check_request: Callable[[Request], None] | None = None,
    ) -> None:
        self._manager = StreamableHTTPSessionManager(
            app=build_mcp_server(tools, fronts), json_response=True, stateless=True
        )
        self._check_request = check_request

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        async with self._manager.run():
            yield

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._check_request is not None:
            try:
                self._check_request(Request(scope))
            except ServerError as error:
                response = JSONResponse(
                    {"detail": error.detail}, status_code=error.status_code, headers=error.headers
                )
                await response(scope, receive, send)
                return
        await self._manager.handle_request(scope, receive, send)
