"""MCP tool descriptions: names, descriptions, input schemas derived from decode_request."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from pydantic import BaseModel, Field

import servekit as ls
from servekit.mcp import extract_input_schema, json_schema_type, mcp_tools

pytest.importorskip("mcp")


class Point(BaseModel):
    x: int
    y: int = Field(default=0, ge=0)


class PointAPI(ls.LitAPI):
    """Moves a point."""

    def decode_request(self, request: Point, context: Any = None) -> Point:
        return request

    def predict(self, x: Point) -> Point:
        return x


def test_schema_of_a_pydantic_annotated_decode_request() -> None:
    schema = extract_input_schema(PointAPI.decode_request)
    assert schema["required"] == ["request"]
    assert schema["properties"] == {"request": {"$ref": "#/$defs/Point"}}
    point = schema["$defs"]["Point"]
    assert point["required"] == ["x"]
    assert point["properties"]["y"] == {"default": 0, "minimum": 0, "title": "Y", "type": "integer"}


def test_schema_of_plain_parameters_and_of_a_model() -> None:
    def tool(name: str, count: int | None = None, tags: list[str] | None = None, blob: bytes = b"") -> None:
        return None

    schema = extract_input_schema(tool)
    assert schema["required"] == ["name"]
    assert schema["properties"]["name"] == {"title": "Name", "type": "string"}
    assert schema["properties"]["count"] == {"title": "Count", "type": "integer", "nullable": True}
    assert schema["properties"]["tags"]["type"] == "array"
    assert schema["properties"]["blob"]["type"] == "string"  # unknown types are strings
    assert "$defs" not in schema
    assert extract_input_schema(Point)["properties"] == {"point": {"$ref": "#/$defs/Point"}}
    assert json_schema_type(dict[str, int]) == {"type": "object"}


def test_tool_name_description_and_validation() -> None:
    apis = [
        PointAPI(api_path="/v1/move", mcp=ls.mcp.MCP()),
        PointAPI(api_path="/other", mcp=ls.mcp.MCP(name="/custom/name", description="  Custom.  ")),
        PointAPI(api_path="/none"),
    ]
    tools = mcp_tools(apis)
    assert [(t.name, t.description, t.api_index, t.request_argument) for t in tools] == [
        ("v1_move", "Moves a point.", 0, "request"),
        ("custom_name", "Custom.", 1, "request"),
    ]

    class Undocumented(ls.LitAPI):
        def predict(self, x: Any) -> Any:
            return x

    with pytest.raises(ValueError, match="needs a description"):
        ls.LitServer(Undocumented(mcp=ls.mcp.MCP()), accelerator="cpu")
    with pytest.raises(ValueError, match="already uses the MCP tool name 'same'"):
        mcp_tools(
            [PointAPI(mcp=ls.mcp.MCP(name="same")), PointAPI(api_path="/b", mcp=ls.mcp.MCP(name="same"))]
        )


def test_importing_servekit_does_not_import_the_mcp_package() -> None:
    code = "import sys, servekit as ls; ls.mcp.MCP; assert 'mcp' not in sys.modules, 'mcp imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_an_api_path_on_the_mcp_endpoint_is_refused() -> None:
    tool = PointAPI(mcp=ls.mcp.MCP(description="d"))
    for path in ("/mcp", "/mcp/"):
        with pytest.raises(ValueError, match="already in use by the MCP endpoint"):
            ls.LitServer([tool, PointAPI(api_path=path)])
    ls.LitServer(PointAPI(api_path="/mcp"))  # without an MCP tool the path is free
