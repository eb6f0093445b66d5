"""/openapi.json describes what every route validates, and schemathesis (``--checks all``, seeded,
bounded) finds no 5xx, no undocumented status and no response outside its declared schema against
`servekit serve` (tiny model), a LitServer app with OpenAISpec, and `servekit proxy` with a node."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.proxying import admitted, proxy_process, wait_for
from tests.e2e.serving import serve_script
from tests.reliability.fuzzing import schemathesis

pytestmark = pytest.mark.timeout(600)

SERVER_ENV = {"SERVEKIT_NUM_THREADS": "1", "SERVEKIT_MAX_MODEL_LEN": "256"}
APPS = Path(__file__).parent / "apps"
BODIES = {
    "/generate": "GenerateRequest",
    "/v1/chat/completions": "ChatCompletionRequest",
    "/v1/completions": "CompletionRequest",
    "/v1/chat/interactive": "InteractiveRequest",
    "/tokenize": "TokenizeRequest",
    "/detokenize": "DetokenizeRequest",
    "/abort_request": "AbortRequest",
    "/v1/encode": "EncodeRequest",
}


def body_schema(document: dict[str, Any], path: str) -> dict[str, Any]:
    body = document["paths"][path]["post"]["requestBody"]
    return dict(body["content"]["application/json"]["schema"])


def assert_passed(result: Any) -> None:
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]


def test_serve_declares_every_body_and_parameter(tiny_model: Path, tmp_path: Path) -> None:
    with serve_script("llm_serve.py", tmp_path, env=SERVER_ENV, args=[str(tiny_model)]) as server:
        document = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
        info = httpx.get(f"{server.url}/model_info", timeout=10).json()
    schemas = document["components"]["schemas"]
    for path, model in BODIES.items():
        assert body_schema(document, path) == {"$ref": f"#/components/schemas/{model}"}, path
        assert schemas[model]["type"] == "object"
    assert "messages" in schemas["ChatCompletionRequest"]["required"]
    # The loaded model's bounds: its vocabulary (600 ids), its chat template's roles, text parts only.
    ids = schemas["DetokenizeRequest"]["properties"]["tokens"]["items"]
    assert (ids["minimum"], ids["maximum"]) == (0, info["vocab_size"] - 1) == (0, 599)
    role = schemas["ChatMessage"]["properties"]["role"]
    assert role["enum"] == info["chat_roles"] == ["system", "user", "assistant", "tool"]
    parts = schemas["ChatMessage"]["properties"]["content"]["anyOf"][1]["items"]
    assert parts == {"$ref": "#/components/schemas/TextContent"}
    assert {"required": ["text"], "properties": {"text": {"not": {"type": "null"}}}} in schemas[
        "GenerateRequest"
    ]["anyOf"]
    # A generation model answers every embeddings body with a 400: not an operation it offers.
    assert "/v1/embeddings" not in document["paths"]
    parameters = document["paths"]["/v1/models/{model_id}"]["get"]["parameters"]
    assert [(p["name"], p["in"], p["required"]) for p in parameters] == [("model_id", "path", True)]
    chat = document["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}
    error = chat["400"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/OpenAIErrorResponse"}


def test_fuzz_serve(tiny_model: Path, tmp_path: Path) -> None:
    with serve_script("llm_serve.py", tmp_path, env=SERVER_ENV, args=[str(tiny_model)]) as server:
        # Every check, positive_data_acceptance too (hooks: only what JSON Schema cannot express).
        assert_passed(schemathesis(server.url, tmp_path))
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_fuzz_litserver_openai_spec(tmp_path: Path) -> None:
    with serve_script(APPS / "openai_echo.py", tmp_path) as server:
        document = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
        assert body_schema(document, "/v1/chat/completions") == {
            "$ref": "#/components/schemas/ChatCompletionRequest"
        }
        # No model behind it: every schema-valid body must be accepted too (positive_data_acceptance).
        assert_passed(schemathesis(server.url, tmp_path))


def test_plain_routes_declare_and_validate_their_bodies(tmp_path: Path) -> None:
    with serve_script(APPS / "plain_apis.py", tmp_path) as server:
        document = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
        assert body_schema(document, "/order") == {"$ref": "#/components/schemas/Order"}
        order = document["components"]["schemas"]["Order"]
        assert set(order["required"]) == {"item", "quantity"}
        assert order["properties"]["quantity"]["maximum"] == 100
        free = body_schema(document, "/echo")
        assert "type" not in free and "$ref" not in free and "Any JSON value" in free["description"]
        responses = document["paths"]["/order"]["post"]["responses"]
        assert responses["422"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/HTTPErrorResponse"
        }

        good = httpx.post(f"{server.url}/order", json={"item": "tea", "quantity": 2}, timeout=30)
        assert good.status_code == 200 and good.json() == {"total": 6, "gift": False}
        bad = httpx.post(f"{server.url}/order", json={"item": "tea", "quantity": 101}, timeout=30)
        assert bad.status_code == 422
        assert [e["loc"] for e in bad.json()["detail"]] == [["body", "quantity"]]
        form = httpx.post(f"{server.url}/order", data={"item": "tea"}, timeout=30)
        assert form.status_code == 422 and ["body", "quantity"] in [e["loc"] for e in form.json()["detail"]]
        echoed = httpx.post(f"{server.url}/echo", json=[1, {"a": None}], timeout=30)
        assert echoed.status_code == 200 and echoed.json() == {"echo": [1, {"a": None}]}

        assert_passed(schemathesis(server.url, tmp_path))


def test_fuzz_proxy_with_a_node(tiny_model: Path, tmp_path: Path) -> None:
    with proxy_process(tmp_path, "--no-state-file") as proxy:
        args = [str(tiny_model), "--proxy-url", proxy.url]
        with serve_script("llm_serve.py", tmp_path, env=SERVER_ENV, args=args) as node:
            wait_for(lambda: admitted(proxy.url) == [node.url], timeout=30)
            document = httpx.get(f"{proxy.url}/openapi.json", timeout=10).json()
            assert body_schema(document, "/generate") == {"$ref": "#/components/schemas/GenerateRequest"}
            # The node's bodies, its model's bounds in them: the same schemas, not a copy.
            node_schemas = httpx.get(f"{node.url}/openapi.json", timeout=10).json()["components"]["schemas"]
            for name in ("GenerateRequest", "ChatCompletionRequest", "ChatMessage", "CompletionRequest"):
                assert document["components"]["schemas"][name] == node_schemas[name], name
            assert "/v1/embeddings" not in document["paths"]
            # The registry's writes would take the node away (or register fuzzed URLs): not fuzzed.
            result = schemathesis(
                proxy.url, tmp_path, "--exclude-path-regex", "^/nodes/(add|remove|terminate)"
            )
            assert_passed(result)
            assert admitted(proxy.url) == [node.url]
