"""Security promises, one test each: auth on every documented route (serve, core, proxy), keys compared
in constant time, body/header/JSON-depth limits (serve and proxy), no server-side fetch of URLs in
requests, chat templates sandboxed, template paths refused from the API, secrets redacted in
/server_info, and the client's key never forwarded by the proxy to a node."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request

from servekit.errors import ServerError
from tests.e2e.fake_node import FakeNode, running_node
from tests.e2e.proxying import admitted, proxy_process, wait_for
from tests.e2e.serving import RunningServer, serve_script

pytestmark = pytest.mark.timeout(300)

KEY = "serve-key-5b1f"
PROXY_KEY = "proxy-key-77aa"
NODE_KEY = "node-key-c3d9"
HF_TOKEN = "hf_secret_token_9e1d"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
SERVER_ENV = {
    "SERVEKIT_NUM_THREADS": "1",
    "SERVEKIT_MAX_MODEL_LEN": "256",
    "SERVEKIT_API_KEY": KEY,
    "SERVEKIT_PROXY_API_KEY": PROXY_KEY,
    "SERVEKIT_MAX_REQUEST_BODY_SIZE": "64KB",
    "HF_TOKEN": HF_TOKEN,
}


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with serve_script(
        "llm_serve.py",
        tmp_path_factory.mktemp("secure"),
        env=SERVER_ENV,
        args=[str(tiny_model)],
    ) as running:
        yield running


def documented_operations(document: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (method.upper(), path.replace("{model_id}", "x").replace("{model}", "x"))
        for path, operations in document["paths"].items()
        for method in operations
        if path != "/health"
    ]


def assert_every_route_needs(url: str, document: dict[str, Any], key: str, at_least: int = 11) -> None:
    operations = documented_operations(document)
    assert len(operations) >= at_least
    for method, path in operations:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": key + "x"}):
            answer = httpx.request(method, f"{url}{path}", json={}, headers=headers, timeout=30)
            assert answer.status_code == 401, (method, path, headers, answer.text)
            error = answer.json()  # spec routes in OpenAI's envelope, core routes in {"detail"}
            assert error.get("detail") or error["error"]["type"] == "authentication_error", error


def test_auth_on_every_documented_route_of_serve(server: RunningServer) -> None:
    document = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    assert_every_route_needs(server.url, document, KEY)
    assert httpx.get(f"{server.url}/v1/models", headers={"X-API-Key": KEY}, timeout=10).status_code == 200


@pytest.mark.parametrize(
    ("app", "env", "paths"),
    [
        ("plain_apis.py", {"LIT_SERVER_API_KEY": KEY}, {"/order", "/echo"}),
        ("openai_echo.py", {"ECHO_API_KEY": KEY}, {"/v1/chat/completions"}),
    ],
)
def test_auth_on_every_documented_route_of_the_core(
    app: str, env: dict[str, str], paths: set[str], tmp_path: Path
) -> None:
    with serve_script(Path(__file__).parent / "apps" / app, tmp_path, env=env) as server:
        document = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
        assert paths <= set(document["paths"])
        assert_every_route_needs(server.url, document, KEY, at_least=len(paths))
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import servekit.http.auth as auth

    compared: list[tuple[bytes, bytes]] = []

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return a == b

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    check = auth.APIKeyCheck("k1")
    check(Request({"type": "http", "headers": [(b"x-api-key", b"k1")]}))
    with pytest.raises(ServerError):
        check(Request({"type": "http", "headers": [(b"authorization", b"Bearer k2")]}))
    assert compared == [(b"k1", b"k1"), (b"k2", b"k1")]


def check_limits(url: str, headers: dict[str, str]) -> None:
    big = httpx.post(
        f"{url}/v1/completions", content=b"{" + b" " * 70_000 + b"}", headers=headers, timeout=30
    )
    assert big.status_code == 413 and "larger than the limit" in big.json()["error"]["message"]
    huge_headers = {**headers, "X-Filler": "x" * 70_000}
    too_many = httpx.get(f"{url}/v1/models", headers=huge_headers, timeout=30)
    assert too_many.status_code == 431 and "headers" in too_many.json()["error"]["message"]
    deep = '{"prompt": ' + "[" * 3000 + "]" * 3000 + "}"
    nested = httpx.post(f"{url}/v1/completions", content=deep, headers=headers, timeout=30)
    assert nested.status_code == 400 and nested.json()["error"]["type"] == "invalid_request_error"


def test_body_header_and_depth_limits_of_serve(server: RunningServer) -> None:
    check_limits(server.url, AUTH)
    assert (
        httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, headers=AUTH, timeout=60).status_code
        == 200
    )


class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:
        self.hits.append(self.path)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def recording_server() -> Iterator[tuple[str, list[str]]]:
    hits: list[str] = []
    handler = type("Recorder", (_Recorder,), {"hits": hits})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", hits
    finally:
        httpd.shutdown()
        thread.join(10)


def test_no_server_side_fetch_of_urls_in_requests(server: RunningServer) -> None:
    with recording_server() as (base, hits):
        image = {"type": "image_url", "image_url": {"url": f"{base}/cat.png"}}
        body = {"messages": [{"role": "user", "content": [image]}], "max_tokens": 2}
        refused = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages[0].content"
        remote_ref = {**CHAT, "guided_json": {"$ref": f"{base}/schema.json"}}
        answer = httpx.post(f"{server.url}/v1/chat/completions", json=remote_ref, headers=AUTH, timeout=60)
        assert answer.status_code in (200, 400), answer.text
        assert hits == []


def test_template_paths_from_the_api_are_refused(server: RunningServer, tiny_model: Path) -> None:
    for path in ("/etc/passwd", str(tiny_model / "tokenizer_config.json")):
        body = {**CHAT, "chat_template": path}
        refused = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "chat_template"
    inline = {**CHAT, "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}
    assert (
        httpx.post(f"{server.url}/v1/chat/completions", json=inline, headers=AUTH, timeout=60).status_code
        == 200
    )


ESCAPE = "{{ cycler.__init__.__globals__.os.popen('touch %s').read() }}"


def test_chat_templates_are_sandboxed(server: RunningServer, tiny_model: Path, tmp_path: Path) -> None:
    marker = tmp_path / "escaped"
    body = {**CHAT, "chat_template": ESCAPE % marker}
    refused = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert refused.status_code == 400 and "unsafe" in refused.json()["error"]["message"]
    template = tmp_path / "evil.jinja"
    template.write_text(ESCAPE % marker)
    env = {"SERVEKIT_NUM_THREADS": "1", "SERVEKIT_MAX_MODEL_LEN": "256"}
    args = [str(tiny_model), "--chat-template", str(template)]
    with serve_script("llm_serve.py", tmp_path, env=env, args=args) as flagged:
        answer = httpx.post(f"{flagged.url}/v1/chat/completions", json=CHAT, timeout=60)
        assert answer.status_code == 400 and "unsafe" in answer.json()["error"]["message"]
    assert not marker.exists()


def test_server_info_redacts_every_secret(server: RunningServer) -> None:
    info = httpx.get(f"{server.url}/server_info", headers=AUTH, timeout=30)
    assert info.status_code == 200
    config = info.json()["config"]
    assert config["api_key"] == "***" and config["proxy_api_key"] == "***"
    for secret in (KEY, PROXY_KEY, HF_TOKEN):
        assert secret not in info.text
    assert HF_TOKEN not in httpx.get(f"{server.url}/info", headers=AUTH, timeout=30).text


def test_proxy_auth_limits_and_keys(tmp_path: Path) -> None:
    auth = {"Authorization": f"Bearer {PROXY_KEY}"}
    with (
        running_node(FakeNode(model="m", api_key=NODE_KEY)) as node,
        proxy_process(
            tmp_path, "--no-state-file", "--api-key", PROXY_KEY, "--max-request-body-size", "64KB"
        ) as proxy,
    ):
        added = {"url": node.url, "api_key": NODE_KEY}
        assert httpx.post(f"{proxy.url}/nodes/add", json=added, headers=auth, timeout=10).status_code == 200
        wait_for(lambda: admitted(proxy.url, auth) == [node.url])
        document = httpx.get(f"{proxy.url}/openapi.json", headers=auth, timeout=10).json()
        assert_every_route_needs(proxy.url, document, PROXY_KEY)
        check_limits(proxy.url, auth)
        for headers in (auth, {"X-API-Key": PROXY_KEY}):
            reply = httpx.post(
                f"{proxy.url}/v1/chat/completions", json={**CHAT, "model": "m"}, headers=headers, timeout=10
            )
            assert reply.status_code == 200
        seen = [request["headers"] for request in node.requests]
        assert seen and all(h.get("authorization") == f"Bearer {NODE_KEY}" for h in seen)
        assert all(PROXY_KEY not in json.dumps(h) for h in seen)  # the client's key stays at the proxy
        status = httpx.get(f"{proxy.url}/nodes/status", headers=auth, timeout=10).text
        assert NODE_KEY not in status
