"""MCP: an API built with ``LitAPI(mcp=ls.mcp.MCP(...))`` is a tool at /mcp/, for a real MCP client."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.serving import serve_script

mcp = pytest.importorskip("mcp")
httpx2 = pytest.importorskip("httpx2")  # the mcp client's HTTP client

pytestmark = pytest.mark.timeout(120)


async def _session(url: str) -> tuple[list[Any], Any, Any, Any]:
    async with mcp.Client(url) as client:
        tools = (await client.list_tools()).tools
        power = await client.call_tool("predict", {"request": {"input": 3.0}})
        echo = await client.call_tool("echo-tool", {"any": ["thing", 1]})
        invalid = await client.call_tool("predict", {"request": {"input": "not a number"}})
        return tools, power, echo, invalid


def test_mcp_client_lists_and_calls_the_api_tools(tmp_path: Path) -> None:
    with serve_script("mcp_tool.py", tmp_path) as server:
        tools, power, echo, invalid = asyncio.run(_session(f"{server.url}/mcp/"))
        # The plain HTTP routes are unchanged.
        assert httpx.post(f"{server.url}/predict", json={"input": 4.0}).json() == {"output": 16.0}

    by_name = {tool.name: tool for tool in tools}
    assert sorted(by_name) == ["echo-tool", "predict"]  # /plain has no MCP
    predict = by_name["predict"]
    assert predict.description == "Returns the square of a number."
    # The input schema comes from decode_request's pydantic annotation.
    assert predict.input_schema["required"] == ["request"]
    assert predict.input_schema["properties"]["request"] == {"$ref": "#/$defs/PowerRequest"}
    assert predict.input_schema["$defs"]["PowerRequest"]["properties"]["input"]["type"] == "number"
    assert by_name["echo-tool"].description == "Echoes its request."

    # The call reached the worker: decode_request, predict and encode_response ran.
    assert not power.is_error
    assert power.structured_content == {"output": 9.0}
    assert power.content[0].text == '{"output":9.0}'
    # With an explicit schema, the arguments are the request body as they are.
    assert echo.structured_content == {"any": ["thing", 1]}
    # A request the API rejects is a tool error with the API's message, not a protocol failure.
    assert invalid.is_error
    assert "input" in invalid.content[0].text


def test_mcp_endpoint_requires_the_api_key_when_one_is_set(tmp_path: Path) -> None:
    headers = {"X-API-Key": "secret"}
    with serve_script("mcp_tool.py", tmp_path, env={"API_KEY": "secret"}, health_headers=headers) as server:
        refused = httpx.post(f"{server.url}/mcp/", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        assert refused.status_code == 401

        async def list_with_key() -> list[str]:
            async with httpx2.AsyncClient(headers=headers) as http:
                transport = mcp.client.streamable_http.streamable_http_client(
                    f"{server.url}/mcp/", http_client=http
                )
                async with mcp.Client(transport) as client:
                    return [tool.name for tool in (await client.list_tools()).tools]

        assert sorted(asyncio.run(list_with_key())) == ["echo-tool", "predict"]
